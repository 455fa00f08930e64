"""One flat float32 buffer behind a model's whole floating-point state.

Parameters come first, then floating-point buffers (batch-norm running statistics); every
parameter, buffer and gradient becomes a view into a flat tensor, so an elastic exchange or a
local step is a handful of fused ops on one tensor instead of a Python loop over layers.
Integer buffers (``num_batches_tracked``) stay as they are: they are counters, not state to
average, and are not part of the center.

The layout depends only on the module's structure (``named_parameters`` then
``named_buffers`` order), so every process that builds the same model gets the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class FlatState:
    module: nn.Module
    flat: Tensor  # [numel] parameters then float buffers; what the module computes with
    grad: Tensor  # [n_params] gradients of the parameters, views handed to autograd
    n_params: int

    @property
    def numel(self) -> int:
        return self.flat.numel()


def _float_buffers(module: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    found = []
    for mod in module.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and buf.is_floating_point():
                found.append((mod, name, buf))
    return found


@torch.no_grad()
def flatten_(module: nn.Module, device: torch.device | str = "cpu") -> FlatState:
    """Move ``module`` to ``device`` with its float state re-housed as views of one buffer."""
    module.to(device)
    params = list(module.parameters())
    buffers = _float_buffers(module)
    if any(p.dtype != torch.float32 for p in params) or any(b.dtype != torch.float32 for *_, b in buffers):
        raise TypeError("flatten_ expects a float32 model")
    n_params = sum(p.numel() for p in params)
    numel = n_params + sum(b.numel() for *_, b in buffers)
    flat = torch.empty(numel, dtype=torch.float32, device=device)
    grad = torch.zeros(n_params, dtype=torch.float32, device=device)
    offset = 0
    for p in params:
        k = p.numel()
        flat[offset: offset + k].copy_(p.reshape(-1))
        p.data = flat[offset: offset + k].view_as(p)
        # Autograd accumulates into an existing .grad in place, so gradients land in `grad`.
        p.grad = grad[offset: offset + k].view_as(p)
        offset += k
    for mod, name, b in buffers:
        k = b.numel()
        flat[offset: offset + k].copy_(b.reshape(-1))
        mod._buffers[name] = flat[offset: offset + k].view_as(b)
        offset += k
    return FlatState(module=module, flat=flat, grad=grad, n_params=n_params)


def check_views(state: FlatState) -> bool:
    """True while every parameter, gradient and float buffer still aliases the flat tensors.

    Something that rebinds ``p.data`` or sets ``p.grad = None`` would silently detach the
    model from the buffers the rules update; the worker checks this once after its first step.
    """
    flat_ptr, grad_ptr = state.flat.data_ptr(), state.grad.data_ptr()
    end = flat_ptr + state.flat.numel() * 4
    for p in state.module.parameters():
        if not (flat_ptr <= p.data_ptr() < end) or p.grad is None:
            return False
        if not (grad_ptr <= p.grad.data_ptr() < grad_ptr + state.grad.numel() * 4):
            return False
    return all(flat_ptr <= b.data_ptr() < end for *_, b in _float_buffers(state.module))
