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

from .config import ConfigError


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


class FlatError(ConfigError):
    """A model whose state cannot live in one float32 buffer; ``str()`` is one line naming the
    parameter or buffer and why."""


def check_flattenable(module: nn.Module, exact: bool = False) -> None:
    """FlatError naming the first parameter or float buffer that cannot be a view of one float32
    buffer: sparse, complex, or (``exact``) not float32."""
    for kind, items in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in items:
            if kind == "buffer" and not (t.is_floating_point() or t.is_complex()):
                continue  # integer buffers (num_batches_tracked) stay per worker
            if t.layout != torch.strided:
                raise FlatError(f"{kind} {name} is {t.layout}: only dense tensors can be views of "
                                "the one flat buffer the workers exchange")
            if t.is_complex() or (exact and t.dtype != torch.float32):
                raise FlatError(f"{kind} {name} is {t.dtype}: the state the workers exchange is "
                                "one float32 buffer (make the model float32)")


@torch.no_grad()
def flatten_(module: nn.Module, device: torch.device | str = "cpu") -> FlatState:
    """Move ``module`` to ``device`` with its float state re-housed as views of one buffer.

    Parameters that are trained come first (the first ``n_params`` entries, with their
    gradients as views of ``grad``); then parameters that do not require grad and float
    buffers, which are carried (and exchanged) but never stepped. A parameter used in several
    places (tied weights) is one parameter, so one entry.
    """
    module.to(device)
    check_flattenable(module, exact=True)
    named = list(module.named_parameters())  # each parameter once, however often it is used
    trained = [p for _, p in named if p.requires_grad]
    frozen = [p for _, p in named if not p.requires_grad]
    buffers = _float_buffers(module)
    n_params = sum(p.numel() for p in trained)
    numel = n_params + sum(p.numel() for p in frozen) + sum(b.numel() for *_, b in buffers)
    flat = torch.empty(numel, dtype=torch.float32, device=device)
    grad = torch.zeros(n_params, dtype=torch.float32, device=device)
    offset = 0
    for p in trained:
        k = p.numel()
        flat[offset: offset + k].copy_(p.reshape(-1))
        p.data = flat[offset: offset + k].view_as(p)
        # Autograd accumulates into an existing .grad in place, so gradients land in `grad`.
        p.grad = grad[offset: offset + k].view_as(p)
        offset += k
    for p in frozen:
        k = p.numel()
        flat[offset: offset + k].copy_(p.reshape(-1))
        p.data = flat[offset: offset + k].view_as(p)
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
    return detached(state) is None


def detached(state: FlatState) -> str | None:
    """The name of the first parameter, gradient or float buffer that no longer aliases the
    flat tensors (None: all do)."""
    flat_ptr, grad_ptr = state.flat.data_ptr(), state.grad.data_ptr()
    end = flat_ptr + state.flat.numel() * 4
    for name, p in state.module.named_parameters():
        if not (flat_ptr <= p.data_ptr() < end):
            return f"parameter {name}"
        if p.requires_grad and (p.grad is None or not (
                grad_ptr <= p.grad.data_ptr() < grad_ptr + state.grad.numel() * 4)):
            return f"the gradient of {name}"
    for mod, name, b in _float_buffers(state.module):
        if not flat_ptr <= b.data_ptr() < end:
            return f"buffer {name}"
    return None
