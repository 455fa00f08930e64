"""The barrier of the synchronous algorithms (sync-easgd, ddp), in shared memory.

multiprocessing's Barrier is a Condition over named POSIX semaphores: they stay in /dev/shm
until the process that created them unlinks them (a process killed with -9 never does), and a
waiter killed in the middle of its wait leaves the Condition expecting its acknowledgement, so
that breaking the barrier from the main process blocks for ever. This one is a few counters in
a shared int64 tensor (``share_memory_``: nothing in /dev/shm outlives the processes) and a
record lock (shared.ProcessLock, which the kernel releases when its holder dies), held only to
count an arrival. Waiters poll the generation counter, sleeping a little longer between looks
(up to a millisecond), and check that the main process is still there.

Each party records in shared memory that it waits (:meth:`Party.mark`; ddp also marks a
worker waiting in its all-reduce): when every worker stops stepping, the main process's watchdog
blames the one that is not waiting for the others. The main process breaks the barrier without
taking any lock (:meth:`Barrier.abort`): every waiter and every later arrival raises
``threading.BrokenBarrierError``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from threading import BrokenBarrierError
from typing import Any

import torch

from .shared import ProcessLock

__all__ = ["Barrier", "BrokenBarrierError", "Party"]

ARRIVED, GENERATION, BROKEN = 0, 1, 2  # the header of the shared tensor, then one flag per rank
HEADER = 3
FIRST_SLEEP, LONGEST_SLEEP = 2e-5, 1e-3  # seconds between two looks at the generation
CHECK_EVERY = 0.5  # seconds between two calls of a waiter's ``alive`` check


class Barrier:
    """A reusable barrier of ``parties`` processes; the last to arrive runs ``action`` (under
    the lock, before anyone leaves). Picklable for spawn."""

    def __init__(self, parties: int, action: Callable[[], Any] | None = None):
        self.parties, self.action = parties, action
        self.state = torch.zeros(HEADER + parties, dtype=torch.int64).share_memory_()
        self.lock = ProcessLock()

    def party(self, rank: int, alive: Callable[[], Any] | None = None) -> "Party":
        """Worker ``rank``'s side; ``alive`` is called now and then while it waits (it raises
        to end the wait, e.g. when the main process is gone)."""
        return Party(self, rank, alive)

    def waiting(self) -> set[int]:
        """The ranks that wait for the others now (at the barrier, or in ddp's all-reduce)."""
        return {rank for rank, flag in enumerate(self.state[HEADER:].tolist()) if flag}

    def abort(self) -> None:
        """Break the barrier for good: a single store, no lock (a holder may be stopped)."""
        self.state[BROKEN] = 1

    @property
    def broken(self) -> bool:
        return bool(self.state[BROKEN])

    def close(self) -> None:
        self.lock.close()


class Party:
    """One worker's side of a :class:`Barrier`."""

    def __init__(self, barrier: Barrier, rank: int, alive: Callable[[], Any] | None):
        self.barrier, self.rank, self.alive = barrier, rank, alive

    def mark(self, waiting: bool) -> None:
        """Record whether this worker waits for the others (read by the watchdog)."""
        self.barrier.state[HEADER + self.rank] = int(waiting)

    def wait(self) -> None:
        generation = self._arrive()
        if generation is not None:
            self._await(generation)

    def _arrive(self) -> int | None:
        """Count this arrival; the last one runs the action and releases everyone (None)."""
        barrier, state = self.barrier, self.barrier.state
        with barrier.lock:
            if state[BROKEN]:
                raise BrokenBarrierError
            generation = int(state[GENERATION])
            arrived = int(state[ARRIVED]) + 1
            if arrived < barrier.parties:
                state[ARRIVED] = arrived
                state[HEADER + self.rank] = 1
                return generation
            try:
                if barrier.action is not None:
                    barrier.action()
            except BaseException:
                state[BROKEN] = 1
                raise
            state[ARRIVED] = 0
            state[HEADER:] = 0
            state[GENERATION] = generation + 1
            return None

    def _await(self, generation: int) -> None:
        state = self.barrier.state
        sleep, check_at = FIRST_SLEEP, time.monotonic() + CHECK_EVERY
        try:
            while int(state[GENERATION]) == generation:
                if state[BROKEN]:
                    raise BrokenBarrierError
                time.sleep(sleep)
                sleep = min(2 * sleep, LONGEST_SLEEP)
                if self.alive is not None and time.monotonic() >= check_at:
                    self.alive()
                    check_at = time.monotonic() + CHECK_EVERY
        except BaseException:
            self.mark(False)
            raise
