"""A worker's link to shared tensors, and a center variable on top of it.

:class:`Link` moves one shared entry (see shared.py) between the CPU's shared pages and a
worker's device. Workers on CUDA page-lock the shared pages in place with
``cudaHostRegister``: ``Tensor.pin_memory()`` would not do, it returns a pinned *copy*, which
other processes do not see. With the pages registered, copies between an entry and a GPU are
DMA transfers that run asynchronously on the worker's stream.

:class:`SharedCenter` is a center variable and its update clock, entries of a SharedState under
one lock; an algorithm adds the state it writes with it beside it (DOWNPOUR's master momentum
and running average: algorithms/downpour.py). :class:`CenterLink` is a worker's side of the
elastic exchange, in two parts (the difference, then the moves) so that a synchronous
algorithm can wait for the others in between (algorithms/sync.py).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import Tensor

from . import rules
from .shared import ProcessLock, SharedState, SharedTensor

__all__ = ["CenterLink", "Diverged", "Link", "ProcessLock", "SharedCenter", "finite", "page_lock"]

log = logging.getLogger(__name__)


class Diverged(ArithmeticError):
    """A worker's contribution to shared state is not finite; nothing of it was applied."""


class SharedCenter:
    """The center tensor plus the lock that makes its update atomic. Picklable for spawn.

    Its entries, in a SharedState (its own, or the algorithm's, under ``name``): the center
    ``name`` (in ``stripes`` stripes, each with its own lock, for the elastic exchange's
    additions: see shared.SharedTensor) and ``name.clock`` (updates so far, written under the
    center's lock). An algorithm that writes more with the center adds it beside it, under the
    same lock (``state.add(f"{name}.average", ..., lock=name)``).
    ``n_params``: the first entries of the center are parameters, the rest float buffers
    (batch-norm statistics); by default every entry is a parameter.
    """

    def __init__(self, init: Tensor | None = None, lock: bool = True, *,
                 n_params: int | None = None, state: SharedState | None = None,
                 name: str = "center", stripes: int = 1):
        self.state = state if state is not None else SharedState(locked=lock)
        self.name = name
        if init is not None:  # allocate; otherwise a view of entries that exist
            self.state.add(name, init, stripes=stripes)
            self.state.add(f"{name}.clock", torch.zeros(1), lock=name, dtype=torch.int64)
        self.entry = self.state[name]
        self.n_params = self.entry.numel if n_params is None else n_params

    def beside(self, suffix: str) -> Tensor | None:
        """The entry ``name.suffix`` an algorithm keeps beside the center, or None."""
        key = f"{self.name}.{suffix}"
        return self.state[key].data if key in self.state else None

    @property
    def data(self) -> Tensor:
        return self.entry.data

    @property
    def clock(self) -> Tensor:
        return self.state[f"{self.name}.clock"].data

    @property
    def lock(self) -> ProcessLock | None:
        return self.entry.lock

    @property
    def crash_in_lock(self) -> bool | int:
        return self.entry.crash_in_lock

    @crash_in_lock.setter
    def crash_in_lock(self, value: bool | int) -> None:
        self.entry.crash_in_lock = value

    @property
    def numel(self) -> int:
        return self.entry.numel

    def close(self) -> None:
        """Release the lock's descriptor (the tensors go with the last process that maps them)."""
        self.state.close()

    def guard(self) -> contextlib.AbstractContextManager:
        return self.entry.guard()

    def add_(self, d: Tensor, under_lock: Any = None) -> Any:
        """center += d, atomically with respect to other workers' additions when locked;
        ``under_lock`` runs in the same critical section (its result is returned)."""
        return self.entry.add_(d, under_lock)

    def snapshot(self) -> Tensor:
        """A consistent copy of the center (taken under the lock, so no half-applied update)."""
        return self.entry.snapshot()


def page_lock(t: Tensor) -> bool:
    """Page-lock ``t``'s memory in place (cudaHostRegister). False, with a warning, where the
    driver refuses: copies are then pageable, which only costs speed.

    A failed call also leaves its error as CUDA's "last error", which the next kernel launch
    check would raise as if that kernel had failed. It is cleared here, with the runtime's own
    cudaGetLastError (not bound by torch, so taken from the loaded libcudart); where that cannot
    be done, the worker stops with one clear line instead of failing later at random.
    """
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
    if err == 0:  # cudaSuccess
        return True
    if not _clear_cuda_error():
        raise RuntimeError(f"could not page-lock the shared center (cudaError {err}) nor clear "
                           "CUDA's error state afterwards; check the memlock limit (ulimit -l)")
    log.warning("could not page-lock the shared center (cudaError %d); copies will be pageable", err)
    return False


def _clear_cuda_error() -> bool:
    """Reset CUDA's last error through the libcudart this process has loaded."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "libcudart" in line), None)
        if path is None:
            return False
        ctypes.CDLL(path).cudaGetLastError()
        return True
    except OSError:
        return False


class Link:
    """A worker's view of one shared entry from its device, with staging buffers there.

    Reads are not locked: each float is read whole, and a read that overlaps another worker's
    write sees some entries before it and some after, the usual asynchronous setting. Writes
    (additions, copies) take the entry's lock: ``+=`` is a read-modify-write, and two unguarded
    ones on the same entries can lose one of them.
    """

    def __init__(self, entry: SharedTensor, device: torch.device | str):
        self.entry = entry
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.exchanges = 0
        self.bytes = 0
        n = entry.numel
        self._registered = False
        self.d = torch.empty(n, device=self.device)  # what this worker sends (on its device)
        if self.cuda:
            self._registered = page_lock(entry.data)
            self.c_dev = torch.empty(n, device=self.device)  # the entry, read onto the GPU
            self.d_host = torch.empty(n, pin_memory=True)  # staging for the way back
            self.done = torch.cuda.Event()

    def close(self) -> None:
        if self._registered:
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(self.entry.data.data_ptr())
            self._registered = False

    def read(self) -> Tensor:
        """The entry where the worker computes: itself on the CPU; on a GPU, a copy made by
        host-to-device DMA from the registered shared pages, ordered on this stream before what
        reads it."""
        if not self.cuda:
            return self.entry.data
        return self.c_dev.copy_(self.entry.data, non_blocking=True)

    def to_host(self, d: Tensor) -> Tensor:
        """``d`` where the CPU can apply it to the entry: on a GPU, copied to pinned staging and
        waited for, so that the write is complete when the caller returns."""
        if not self.cuda:
            return d
        self.d_host.copy_(d, non_blocking=True)
        self.done.record()
        self.done.synchronize()
        return self.d_host

    def wait(self) -> None:
        """Wait for this link's copies issued so far (before letting go of a lock)."""
        if self.cuda:
            self.done.record()
            self.done.synchronize()

    def read_whole(self) -> Tensor:
        """A copy of the entry on the worker's device, taken under its lock: never part of one
        write and part of another. (On a GPU the copy is waited for before the lock is let go.)
        The returned tensor is reused by the next read."""
        with self.entry.guard():
            if not self.cuda:
                return self.entry.data.clone()
            self.c_dev.copy_(self.entry.data, non_blocking=True)
            self.done.record()
            self.done.synchronize()
            return self.c_dev

    def count(self, entries_each_way: int | None = None) -> None:
        """One exchange: the entry read, and as much written back."""
        self.exchanges += 1
        self.bytes += 2 * (self.entry.numel if entries_each_way is None else entries_each_way) * 4

    @torch.no_grad()
    def pull(self, y: Tensor) -> None:
        """y = the entry (a consistent copy)."""
        y.copy_(self.entry.snapshot())

    @torch.no_grad()
    def publish(self, y: Tensor) -> None:
        """entry = y, whole (readers under the lock never see half of it)."""
        if not bool(torch.isfinite(y).all()):
            raise Diverged("non-finite parameters")
        self.entry.copy_(self.to_host(y))


def finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite (one synchronization on a GPU)."""
    return bool(torch.isfinite(t).all())


class CenterLink(Link):
    """A worker's side of the elastic exchange with a :class:`SharedCenter`, whole
    (:meth:`exchange`) or in its two parts (:meth:`difference`, then :meth:`move_`)."""

    def __init__(self, center: SharedCenter, device: torch.device | str):
        super().__init__(center.entry, device)
        self.center = center

    @torch.no_grad()
    def exchange(self, y: Tensor, alpha: float, v: Tensor | None = None, momentum: float = 0.0,
                 under_lock: Any = None) -> Any:
        """Elastic exchange: d = alpha (x - center); y -= d; center += d.

        ``under_lock`` runs while the center's lock is held for the addition; its result is
        returned. Nothing moves when d is not finite (Diverged)."""
        host = self.difference(y, alpha, v=v, momentum=momentum)
        if not finite(host):
            raise Diverged("non-finite elastic difference")
        return self.move_(y, host, under_lock)

    @torch.no_grad()
    def difference(self, y: Tensor, alpha: float, v: Tensor | None = None,
                   momentum: float = 0.0) -> Tensor:
        """The exchange's first part: d = alpha (x - center) from a read of the center without
        the lock (as in the paper), into ``self.d``; returns d where the CPU can add it
        (``to_host``). Nothing has moved yet."""
        d = rules.elastic_difference(y, self.read(), alpha, v=v, momentum=momentum, out=self.d)
        return self.to_host(d)

    @torch.no_grad()
    def move_(self, y: Tensor, host: Tensor, under_lock: Any = None) -> Any:
        """The exchange's second part, for a finite d from :meth:`difference`: y -= d;
        center += d under the lock (``under_lock`` in the same critical section, its result
        returned); counted as one exchange."""
        y.sub_(self.d)
        result = self.center.add_(host, under_lock)
        self.count()
        return result
