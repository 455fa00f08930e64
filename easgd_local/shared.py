"""Shared state between the main process and the workers: named flat tensors in shared memory,
each guarded by a lock where it is written.

An algorithm declares what it shares (a center, group centers, one slot per worker, the master
momentum of DOWNPOUR...) as entries of a :class:`SharedState`; the main process allocates them
before any worker starts, and workers receive them through spawn arguments and map the same
pages (``share_memory_`` with PyTorch's ``file_descriptor`` strategy: a segment is unlinked as
soon as it is mapped, so it cannot outlive the processes that hold it).

Entries written together (the DOWNPOUR center, its master velocity and its running average)
share one lock; every other entry that is written has its own. A lock is a POSIX record lock
(:class:`ProcessLock`), which the kernel releases when its holder dies, however it dies.

An entry may be in stripes (``stripes`` > 1): an addition then locks one stripe at a time,
hand over hand, so that two workers add to different stripes at once; readers and whole writes
still lock the whole entry, and never see part of an addition.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor


# How long the main process waits for a lock before giving up (None: forever, as workers do).
# The main process supervises: a worker stopped (SIGSTOP) while holding a lock must not freeze it.
_lock_timeout: float | None = None


def set_lock_timeout(seconds: float | None) -> None:
    """Bound every lock wait of this process (the main process sets it; workers never do)."""
    global _lock_timeout
    _lock_timeout = seconds


class LockTimeout(RuntimeError):
    """A lock was not free within the main process's timeout; ``str()`` is one line."""


class _TimedGuard:
    def __init__(self, lock: "ProcessLock", timeout: float):
        self.lock, self.timeout = lock, timeout

    def __enter__(self) -> "ProcessLock":
        if not self.lock.acquire(self.timeout):
            raise LockTimeout(f"shared state stayed locked for {self.timeout:g} s (a worker "
                              "stopped or hung while holding it?)")
        return self.lock

    def __exit__(self, *exc: Any) -> None:
        self.lock.__exit__()


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
        fcntl.lockf(self.fd, fcntl.LOCK_EX)  # the whole file: every stripe
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)  # also every stripe this process still holds

    # Stripe i is byte i of the (empty) file: a record lock may cover bytes past its end. The
    # whole-file lock above overlaps every stripe, so it waits for all of them and holds them.
    def lock_stripe(self, i: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, i)

    def unlock_stripe(self, i: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, i)

    def acquire(self, timeout: float) -> bool:
        """Try for up to ``timeout`` seconds; True when held (release with ``__exit__``)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.001)

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


class SharedTensor:
    """One flat tensor in shared memory and the lock that guards writes to it (None: unguarded,
    Hogwild-style). Picklable for spawn."""

    def __init__(self, init: Tensor, lock: ProcessLock | None, dtype: torch.dtype = torch.float32,
                 stripes: int = 1):
        self.data = init.detach().to("cpu", dtype).clone().share_memory_()
        self.lock = lock
        self.stripes = max(1, min(int(stripes), self.data.numel() or 1))
        # Fault injection (tests): die (True, or 9) or freeze (19, SIGSTOP) halfway through an
        # addition, with the lock held.
        self.crash_in_lock: bool | int = False

    @property
    def numel(self) -> int:
        return self.data.numel()

    def guard(self) -> contextlib.AbstractContextManager:
        if self.lock is None:
            return contextlib.nullcontext()
        if _lock_timeout is not None:
            return _TimedGuard(self.lock, _lock_timeout)
        return self.lock

    def add_(self, d: Tensor, under_lock: Callable[[], Any] | None = None) -> Any:
        """data += d, atomically with respect to other guarded writers; ``under_lock`` runs in
        the same critical section (its result is returned)."""
        if self.stripes > 1 and self.lock is not None:
            return self._add_striped(d, under_lock)
        with self.guard():
            if self.crash_in_lock:
                crash_halfway(self.data, d, crash_signal(self.crash_in_lock))
            self.data.add_(d)
            return under_lock() if under_lock is not None else None

    def _add_striped(self, d: Tensor, under_lock: Callable[[], Any] | None) -> Any:
        """data += d stripe by stripe, hand over hand: stripe i+1 is taken before stripe i is
        let go, so the addition holds some stripe from start to end and a whole-entry lock
        (a reader, a snapshot) falls before or after it, never inside. Stripes are taken in
        increasing order by everyone, so no two additions wait on each other in a cycle.
        ``under_lock`` runs with the last stripe held: after the whole addition, and one at a
        time across workers."""
        lock, bounds = self.lock, stripe_bounds(self.numel, self.stripes)
        crash_at = len(bounds) // 2 if self.crash_in_lock else -1
        lock.lock_stripe(0)
        try:
            for i, (a, b) in enumerate(bounds):
                if i:
                    lock.lock_stripe(i)
                    lock.unlock_stripe(i - 1)
                if i == crash_at:  # die (or freeze) halfway through, holding stripe i
                    crash_halfway(self.data[a:b], d[a:b], crash_signal(self.crash_in_lock))
                self.data[a:b].add_(d[a:b])
            return under_lock() if under_lock is not None else None
        finally:
            lock.__exit__()  # every stripe this process holds

    def copy_(self, src: Tensor) -> None:
        """data = src, whole: a reader under the lock never sees half of it."""
        with self.guard():
            self.data.copy_(src)

    def snapshot(self) -> Tensor:
        """A consistent copy (taken under the lock, so no half-applied write)."""
        with self.guard():
            return self.data.clone()


def stripe_bounds(numel: int, stripes: int) -> list[tuple[int, int]]:
    """[start, end) of each of ``stripes`` nearly equal, contiguous stripes of ``numel``."""
    return [(numel * i // stripes, numel * (i + 1) // stripes) for i in range(stripes)]


def crash_halfway(data: Tensor, d: Tensor, signum: int = 9) -> None:
    """Fault injection: add half of ``d``, then SIGKILL (die) or SIGSTOP (freeze) with the lock
    held."""
    half = d.numel() // 2
    data[:half].add_(d[:half])
    os.kill(os.getpid(), signum)  # no handler, no cleanup, the lock still held


def crash_signal(crash: bool | int) -> int:
    return 9 if crash is True else int(crash)


class SharedState:
    """Named :class:`SharedTensor` entries. ``lock`` on :meth:`add` is True (a lock of its own),
    False (never written concurrently, or --no-lock), or the name of an entry whose lock it
    shares (written together with it)."""

    def __init__(self, locked: bool = True):
        self.locked = locked  # False: --no-lock, every entry unguarded
        self.entries: dict[str, SharedTensor] = {}

    def add(self, name: str, init: Tensor, *, lock: bool | str = True,
            dtype: torch.dtype = torch.float32, stripes: int = 1) -> SharedTensor:
        """``stripes`` > 1: additions to the entry go stripe by stripe (see SharedTensor)."""
        if name in self.entries:
            raise ValueError(f"shared entry {name!r} declared twice")
        if isinstance(lock, str):
            guard = self.entries[lock].lock
        else:
            guard = ProcessLock() if lock and self.locked else None
        entry = SharedTensor(init, guard, dtype, stripes)
        self.entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> SharedTensor:
        return self.entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def numel(self, names: list[str] | None = None) -> int:
        return sum(self.entries[n].numel for n in (names or self.entries))

    def state_dict(self) -> dict[str, Tensor]:
        """A copy of every entry, each taken under its lock."""
        return {name: entry.snapshot() for name, entry in self.entries.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = [n for n in self.entries if n not in state]
        if missing:
            raise KeyError(f"saved state has no {', '.join(missing)}")
        for name, entry in self.entries.items():
            entry.copy_(state[name])

    def lock_holders(self) -> set[int]:
        """The pids that hold one of this state's locks now, as the kernel lists them in
        /proc/locks (empty where that cannot be read)."""
        inodes = set()
        for entry in self.entries.values():
            if entry.lock is not None and entry.lock.fd >= 0:
                inodes.add(os.fstat(entry.lock.fd).st_ino)
        holders = set()
        try:
            with open("/proc/locks") as f:
                for line in f:
                    fields = line.split()
                    # "1: POSIX  ADVISORY  WRITE 4321 00:1a:12345 0 EOF" (blocked waiters: "->")
                    if len(fields) >= 6 and fields[1] != "->" and fields[4].isdigit():
                        if int(fields[5].rsplit(":", 1)[-1]) in inodes:
                            holders.add(int(fields[4]))
        except (OSError, ValueError):
            pass
        return holders

    def close(self) -> None:
        """Release the locks' descriptors (the tensors go with the last process that maps
        them)."""
        seen = set()
        for entry in self.entries.values():
            if entry.lock is not None and id(entry.lock) not in seen:
                seen.add(id(entry.lock))
                entry.lock.close()
