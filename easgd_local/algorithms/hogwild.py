"""Hogwild (Recht et al., 2011), as PyTorch's mnist_hogwild example runs it: one model in shared
memory, which every worker steps in place, with no lock.

On the CPU a worker's flat buffer *is* the shared model: ``start`` re-houses the worker's flat
tensor, and its module's parameters and float buffers, onto the shared pages at the same
offsets, so the worker's local step (rules.local_step_, the step of every algorithm here) lands
on the one model, and each forward reads the other workers' steps as they happen. Each worker
keeps its own gradient and, with --momentum, its own velocity (as each process of the example
has its own torch.optim.SGD and momentum buffer; its 0.5 is ``--momentum 0.5``, Nesterov here
as for every momentum algorithm). Nothing is exchanged, so nothing is counted.

A worker on a GPU cannot compute on the CPU's pages: it adds each step's move to the shared
model and reads it back (DOWNPOUR's push and pull with tau = 1), unlocked as well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Algorithm, Communicator, WorkerContext, deferred
from .downpour import Downpour, Master

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from .. import center
    from ..shared import SharedState
else:  # loaded when a run starts (base.py)
    torch, center = deferred("torch", "..center", package=__package__)

ENTRY = "center"  # the shared model's entry (a SharedCenter's, so that a GPU worker can push)


def share_flat_(module: "nn.Module", flat: "Tensor", shared: "Tensor") -> None:
    """Make ``flat`` (a model's flat buffer, flat.py) a view of ``shared``, and every parameter
    and float buffer of ``module`` that is a view of ``flat`` a view of ``shared`` at the same
    offset. ``shared``'s values are kept: the model becomes the shared one."""
    if shared.numel() != flat.numel() or shared.dtype != flat.dtype:
        raise ValueError(f"the shared model has {shared.numel()} {shared.dtype} values, the "
                         f"worker's {flat.numel()} {flat.dtype}")
    size = flat.element_size()
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * size

    def moved(t: "Tensor") -> "Tensor":
        offset = (t.data_ptr() - start) // size
        return shared[offset: offset + t.numel()].view_as(t)

    with torch.no_grad():
        for p in module.parameters():  # tied weights are one parameter: moved once
            if start <= p.data_ptr() < end:
                p.data = moved(p)  # .grad stays the worker's own (flat.py's grad buffer)
        for mod in module.modules():
            for name, b in mod._buffers.items():
                if b is not None and start <= b.data_ptr() < end:
                    mod._buffers[name] = moved(b)
        flat.set_(shared)  # the same tensor object, which the worker steps, now the shared pages


class SharedModel(Communicator):
    """A CPU worker's side: its model is the shared model, so there is nothing to exchange (no
    period: the template never calls a hook)."""

    def __init__(self, shared: "Tensor"):
        self.shared = shared
        self.module: nn.Module | None = None

    def wrap(self, model: "nn.Module") -> "nn.Module":
        self.module = model  # re-housed in start, once the worker hands over its flat buffer
        return model

    def start(self, y: "Tensor") -> None:
        if y.data_ptr() != self.shared.data_ptr():
            if self.module is None:
                raise RuntimeError("hogwild: start before wrap; the module is unknown")
            share_flat_(self.module, y, self.shared)

    def reset(self, y: "Tensor") -> None:
        pass  # y is the shared model: there is no copy of its own to start again from


class Hogwild(Algorithm):
    name = "hogwild"
    summary = "Hogwild: one model in shared memory, stepped in place by every worker, no lock"
    local_momentum = True  # each worker's own velocity; --momentum 0 is plain SGD
    has_tau = False
    # As msgd's: each worker steps as the one-worker reference does (no sweep of its own yet).
    default_step = 0.2
    reports = "the shared model"

    def shared_state(self, config: Any, init: "Tensor", n_params: int) -> "SharedState":
        # Never locked, whatever --lock says: steps without a lock are the algorithm.
        return center.SharedCenter(init, lock=False, n_params=n_params, name=ENTRY).state

    def reported(self, shared: "SharedState", config: Any) -> "Tensor":
        # A copy taken while workers step: it may hold part of a step, as any read does here.
        return shared[ENTRY].snapshot()

    def communicator(self, ctx: WorkerContext) -> Communicator:
        if ctx.device.type == "cpu":
            return SharedModel(ctx.shared[ENTRY].data)
        return pushing(ctx.shared, ctx.n_params, ctx.device)


def pushing(shared: "SharedState", n_params: int, device: Any) -> Communicator:
    """A worker that computes on a copy (on a GPU): every step's move added to the shared model,
    which is then read back; unlocked, as the shared state has no lock."""
    view = center.SharedCenter(state=shared, n_params=n_params, name=ENTRY)
    return Downpour(center.CenterLink(view, device), Master(view), 1, None)
