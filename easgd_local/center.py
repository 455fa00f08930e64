"""The center variable: one flat float32 tensor in shared memory, and a worker's link to it.

The main process allocates the center before any worker starts (``share_memory_`` with
PyTorch's default ``file_descriptor`` strategy: the segment is unlinked as soon as it is
mapped, so it cannot outlive the processes that hold it). Workers receive it through spawn
arguments and map the same pages.

Workers on CUDA page-lock the shared pages in place with ``cudaHostRegister``.
``Tensor.pin_memory()`` would not do: it returns a pinned *copy*, which other processes do
not see. With the pages registered, copies between the center and a GPU are DMA transfers
that run asynchronously on the worker's stream.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import Tensor

from . import rules

log = logging.getLogger(__name__)


class SharedCenter:
    """The center tensor plus the lock that makes its update atomic. Picklable for spawn."""

    def __init__(self, init: Tensor, ctx: Any, lock: bool = True):
        self.data = init.detach().to("cpu", torch.float32).clone().share_memory_()
        # The lock must come from the spawn context the workers are started with.
        self.lock = ctx.Lock() if lock else None

    @property
    def numel(self) -> int:
        return self.data.numel()

    def guard(self) -> contextlib.AbstractContextManager:
        return self.lock if self.lock is not None else contextlib.nullcontext()

    def add_(self, d: Tensor) -> None:
        """center += d, atomically with respect to other workers' additions when locked."""
        with self.guard():
            self.data.add_(d)

    def snapshot(self) -> Tensor:
        """A consistent copy of the center (taken under the lock, so no half-applied update)."""
        with self.guard():
            return self.data.clone()


class CenterLink:
    """A worker's side of the elastic exchange, with its staging buffers on the worker's device.

    The read of the center is not locked: each float is read whole, and a read that overlaps
    another worker's addition sees some entries before it and some after, which is the usual
    asynchronous setting of the algorithm. The addition is what the lock protects: ``+=`` is a
    read-modify-write, and two unguarded ones on the same entries can lose one of them.
    """

    def __init__(self, center: SharedCenter, device: torch.device):
        self.center = center
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.exchanges = 0
        self.bytes = 0
        n = center.numel
        self._registered = False
        if self.cuda:
            self._register()
            self.c_dev = torch.empty(n, device=self.device)  # the center, read onto the GPU
            self.d_dev = torch.empty(n, device=self.device)
            self.d_host = torch.empty(n, pin_memory=True)  # staging for the way back
            self.done = torch.cuda.Event()
        else:
            self.d = torch.empty(n)

    def _register(self) -> None:
        t = self.center.data
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        # 0 = cudaSuccess. Failing to pin only costs speed (pageable copies), so warn and go on.
        if int(err) != 0:
            log.warning("could not page-lock the shared center (cudaError %s); copies will be pageable", int(err))
        else:
            self._registered = True

    def close(self) -> None:
        if self._registered:
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(self.center.data.data_ptr())
            self._registered = False

    @torch.no_grad()
    def exchange(self, y: Tensor, alpha: float, v: Tensor | None = None, momentum: float = 0.0) -> None:
        """Asynchronous elastic exchange: d = alpha (x - center); y -= d; center += d."""
        if self.cuda:
            # Host-to-device DMA from the registered shared pages, ordered on this stream
            # before the kernels that read c_dev.
            self.c_dev.copy_(self.center.data, non_blocking=True)
            d = rules.elastic_difference(y, self.c_dev, alpha, v=v, momentum=momentum, out=self.d_dev)
            y.sub_(d)
            self.d_host.copy_(d, non_blocking=True)
            # The CPU addition below must see the finished copy: wait for it here, so the
            # exchange is complete when this method returns.
            self.done.record()
            self.done.synchronize()
            self.center.add_(self.d_host)
        else:
            d = rules.elastic_difference(y, self.center.data, alpha, v=v, momentum=momentum, out=self.d)
            y.sub_(d)
            self.center.add_(d)
        self.exchanges += 1
        self.bytes += 2 * self.center.numel * 4  # the center read in, the difference written back

    @torch.no_grad()
    def pull(self, y: Tensor) -> None:
        """y = center (a worker's start)."""
        y.copy_(self.center.snapshot())

    @torch.no_grad()
    def publish(self, y: Tensor) -> None:
        """center = y, for single-worker runs without a center: the evaluator reads it there."""
        with self.center.guard():
            self.center.data.copy_(y)
