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
import fcntl
import logging
import os
import tempfile
from typing import Any

import torch
from torch import Tensor

from . import rules

log = logging.getLogger(__name__)


class Diverged(ArithmeticError):
    """A worker's contribution to the center is not finite; nothing of it was applied."""


class ProcessLock:
    """A lock between processes that a dead holder cannot keep: a POSIX record lock (fcntl).

    A multiprocessing.Lock is a semaphore: a worker killed while holding it leaves it held for
    good. A record lock belongs to the process, and the kernel drops it when the process dies,
    however it dies. The locked file is anonymous (created, then unlinked at once), so nothing
    is left on disk; each process gets its own descriptor to it through spawn (record locks of
    one process do not exclude each other, so one process must not lock it from two threads).
    """

    def __init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix="easgd-lock-")
        os.unlink(path)
        self.fd = fd

    def __enter__(self) -> "ProcessLock":
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def __reduce__(self) -> tuple:
        from multiprocessing import reduction

        # Only meaningful while spawning a child: the descriptor travels with the process.
        return (_rebuild_lock, (reduction.DupFd(self.fd),))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


def _rebuild_lock(dup: Any) -> ProcessLock:
    lock = ProcessLock.__new__(ProcessLock)
    lock.fd = dup.detach()
    return lock


class SharedCenter:
    """The center tensor plus the lock that makes its update atomic. Picklable for spawn.

    Master-side state of the DOWNPOUR variants lives beside it, in shared memory too, and is
    updated under the same lock: ``velocity`` (MDOWNPOUR's Nesterov momentum on the master, over
    the parameters only) and ``average`` with ``clock`` (ADOWNPOUR / MVADOWNPOUR report a running
    average of the center). ``n_params``: the first entries are parameters, the rest float
    buffers (batch-norm statistics), which a push replaces instead of adding to.
    """

    def __init__(self, init: Tensor, lock: bool = True, *, momentum: float = 0.0,
                 average: bool = False, n_params: int | None = None):
        self.data = init.detach().to("cpu", torch.float32).clone().share_memory_()
        self.n_params = self.data.numel() if n_params is None else n_params
        self.lock = ProcessLock() if lock else None
        self.momentum = momentum
        self.velocity = torch.zeros(self.n_params).share_memory_() if momentum else None
        self.average = self.data.clone().share_memory_() if average else None
        self.clock = torch.zeros(1, dtype=torch.int64).share_memory_()  # center updates so far
        self.crash_in_lock = False  # fault injection (tests): die halfway through an update

    @property
    def numel(self) -> int:
        return self.data.numel()

    def close(self) -> None:
        """Release the lock's descriptor (the tensors go with the last process that maps them)."""
        if self.lock is not None:
            self.lock.close()

    def guard(self) -> contextlib.AbstractContextManager:
        return self.lock if self.lock is not None else contextlib.nullcontext()

    def add_(self, d: Tensor) -> None:
        """center += d, atomically with respect to other workers' additions when locked."""
        with self.guard():
            if self.crash_in_lock:
                self._crash_halfway(d)
            self.data.add_(d)

    def _crash_halfway(self, d: Tensor) -> None:
        half = d.numel() // 2
        self.data[:half].add_(d[:half])
        os.kill(os.getpid(), 9)  # SIGKILL: no handler, no cleanup, the lock still held

    def snapshot(self) -> Tensor:
        """A consistent copy of the center (taken under the lock, so no half-applied update)."""
        with self.guard():
            return self.data.clone()

    def reported(self) -> Tensor:
        """A copy of the model the algorithm reports: the running average where there is one;
        with master momentum the iterate x = center - delta*v (the center is the look-ahead)."""
        with self.guard():
            if self.average is not None:
                return self.average.clone()
            if self.velocity is not None:
                x = self.data.clone()
                x[: self.n_params].sub_(self.velocity, alpha=self.momentum)
                return x
            return self.data.clone()

    def push_(self, u: Tensor, average_rate: float | None = None) -> None:
        """The master's side of a DOWNPOUR push, atomically: ``u`` holds the accumulated update
        of the parameters, then the pushing worker's own float buffers.

        Parameters: center += u. With momentum (MDOWNPOUR): Nesterov momentum on the master, in
        look-ahead form like the workers' (rules.local_step_): v = delta*v + u; center += u +
        delta*v, so workers pull the look-ahead point and take their gradients there.
        Buffers (running statistics) are not gradients' sums: added as deltas from p workers
        (and through momentum) they can grow without bound or turn a variance negative. The
        center takes the pushing worker's, a value some worker actually computed.
        average: z = (1 - a) z + a * center after the update, with a = average_rate, or
        a = 1/(t+1) at the t-th update when average_rate is None (z = mean of all centers).
        """
        n = self.n_params
        with self.guard():
            if self.crash_in_lock:
                self._crash_halfway(u)
            self.data[:n].add_(u[:n])
            self.data[n:].copy_(u[n:])
            if self.velocity is not None:
                self.velocity.mul_(self.momentum).add_(u[:n])
                self.data[:n].add_(self.velocity, alpha=self.momentum)
            self.clock += 1
            if self.average is not None:
                a = average_rate if average_rate is not None else 1.0 / (int(self.clock) + 1)
                self.average.lerp_(self.data, a)


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
        self.d = torch.empty(n, device=self.device)  # the difference (or update) to send
        if self.cuda:
            self._register()
            self.c_dev = torch.empty(n, device=self.device)  # the center, read onto the GPU
            self.d_host = torch.empty(n, pin_memory=True)  # staging for the way back
            self.done = torch.cuda.Event()

    def _register(self) -> None:
        self._registered = page_lock(self.center.data)

    def close(self) -> None:
        if self._registered:
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(self.center.data.data_ptr())
            self._registered = False

    def _center_here(self) -> Tensor:
        """The center where y lives: itself on the CPU; on a GPU, a copy made by host-to-device
        DMA from the registered shared pages, ordered on this stream before what reads it."""
        if not self.cuda:
            return self.center.data
        return self.c_dev.copy_(self.center.data, non_blocking=True)

    def _on_host(self, d: Tensor) -> Tensor:
        """``d`` where the CPU can add it to the center: on a GPU, copied to pinned staging and
        waited for, so that the exchange is complete when it returns."""
        if not self.cuda:
            return d
        self.d_host.copy_(d, non_blocking=True)
        self.done.record()
        self.done.synchronize()
        return self.d_host

    def _count(self) -> None:
        self.exchanges += 1
        self.bytes += 2 * self.center.numel * 4  # the center (or update) each way

    @torch.no_grad()
    def exchange(self, y: Tensor, alpha: float, v: Tensor | None = None, momentum: float = 0.0,
                 barrier: Any = None) -> None:
        """Elastic exchange: d = alpha (x - center); y -= d; center += d.

        With ``barrier`` (synchronous EASGD) every worker has read the center before any
        worker adds to it: all differences are taken from the same center.
        """
        d = rules.elastic_difference(y, self._center_here(), alpha, v=v, momentum=momentum, out=self.d)
        host = self._on_host(d)
        finite = bool(torch.isfinite(host).all())
        if barrier is not None:
            barrier.wait()  # passed even when not finite: the others are waiting
        if not finite:
            raise Diverged("non-finite elastic difference")
        y.sub_(d)
        self.center.add_(host)
        self._count()

    @torch.no_grad()
    def push_pull(self, y: Tensor, y_pulled: Tensor, average_rate: float | None = None) -> None:
        """DOWNPOUR: push u = y - y_pulled (the local updates of the parameters since the last
        pull, then the worker's buffers as they are) to the master, then pull the center:
        y = y_pulled = center."""
        n = self.center.n_params
        torch.sub(y[:n], y_pulled[:n], out=self.d[:n])
        self.d[n:].copy_(y[n:])
        host = self._on_host(self.d)
        if not bool(torch.isfinite(host).all()):
            raise Diverged("non-finite update")
        self.center.push_(host, average_rate)
        y.copy_(self.center.data, non_blocking=True)
        y_pulled.copy_(y)
        self._count()

    @torch.no_grad()
    def pull(self, y: Tensor) -> None:
        """y = center (a worker's start)."""
        y.copy_(self.center.snapshot())

    @torch.no_grad()
    def publish(self, y: Tensor) -> None:
        """center = y, for single-worker runs without a center: the evaluator reads it there."""
        if not bool(torch.isfinite(y).all()):
            raise Diverged("non-finite parameters")
        with self.center.guard():
            self.center.data.copy_(y)
