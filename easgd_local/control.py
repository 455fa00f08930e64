"""The control plane between the main process and its workers: flags, counters, messages.

Flags live in a small shared int64 tensor that the workers read without any lock (a worker
killed mid-read cannot leave anything held, unlike an Event's internal lock). Each worker
reports through a pipe of its own, with the small message types below; a pipe that closes
without a :class:`Done` or :class:`Failed` means its worker died.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from .config import TrainConfig

# Flags of ``WorkerChannels.control``. CHECKPOINT: the sequence number of the checkpoint asked
# for; RESUME: the last one taken, after which the workers that paused for it go on.
GO, STOP, CHECKPOINT, RESUME = 0, 1, 2, 3
CONTROL_SIZE = 4
# What the barrier of the synchronous algorithms decides for everyone (int64 [2]).
AGREED_STOP, AGREED_CHECKPOINT = 0, 1
# Per-worker cumulative counters (float64 [workers, 4]), kept across restarts of a worker.
EXCHANGES, BYTES, EXCHANGE_SECONDS, DIVERGENCES = 0, 1, 2, 3
COUNTERS = 4


# --- messages from a worker to the main process ------------------------------------------------

@dataclass
class Ready:
    """Started, data loaded, waiting for GO."""
    rank: int
    train_size: int


@dataclass
class Event:
    """Something the user should hear about (a divergence); the run goes on."""
    rank: int
    text: str


@dataclass
class State:
    """The worker's state, answering checkpoint ``seq`` (the worker pauses until RESUME)."""
    rank: int
    seq: int
    state: bytes


@dataclass
class Done:
    """Finished; its final state."""
    rank: int
    state: bytes


@dataclass
class Failed:
    """An error ended the worker; ``error`` is one line, ``traceback`` for the debug log."""
    rank: int
    error: str
    traceback: str


class ParentGone(Exception):
    """The main process is gone: nobody to report to."""


def check_parent(parent_pid: int) -> None:
    # A worker re-parented away from the main process means the main process died.
    if os.getppid() != parent_pid:
        raise ParentGone()


# --- what the main process shares with every worker ------------------------------------------

@dataclass
class WorkerChannels:
    """Everything shared with the workers besides their configuration (picklable for spawn)."""

    shared: Any  # the algorithm's SharedState
    steps: torch.Tensor  # int64 [workers]: local steps done, written by each worker
    losses: torch.Tensor  # float64 [workers]: mean training loss since the last report
    control: torch.Tensor  # int64 [CONTROL_SIZE]: GO, STOP, CHECKPOINT (asked for), RESUME (taken)
    counters: torch.Tensor  # float64 [workers, COUNTERS]: EXCHANGES, BYTES, EXCHANGE_SECONDS, DIVERGENCES
    barrier: Any = None  # barrier.Barrier of the synchronous algorithms (its action fills `agreed`)
    agreed: torch.Tensor | None = None  # int64 [2]: stop and checkpoint, decided at the barrier
    rendezvous: str | None = None  # DDP: where the process group meets

    @classmethod
    def create(cls, config: TrainConfig, shared: Any, ctx: Any, synchronous: bool,
               resume: dict[str, Any] | None = None) -> "WorkerChannels":
        steps = torch.zeros(config.workers, dtype=torch.int64)
        counters = torch.zeros(config.workers, COUNTERS, dtype=torch.float64)
        losses = torch.full((config.workers,), float("nan"), dtype=torch.float64)
        if resume is not None:
            steps.copy_(resume["steps"])
            counters.copy_(resume["counters"])
            losses.copy_(resume["losses"])
        control = torch.zeros(CONTROL_SIZE, dtype=torch.int64).share_memory_()
        agreed = torch.zeros(2, dtype=torch.int64).share_memory_()
        barrier = None
        if synchronous:
            import functools

            from .barrier import Barrier

            # In shared memory, not multiprocessing's: nothing left in /dev/shm, a broken barrier
            # never blocks the main process, and the watchdog sees who waits (barrier.py).
            barrier = Barrier(config.workers, action=functools.partial(decide_stop, control, agreed))
        return cls(shared=shared, steps=steps.share_memory_(), losses=losses.share_memory_(),
                   control=control, counters=counters.share_memory_(), barrier=barrier,
                   agreed=agreed)

    def stopping(self) -> bool:
        return bool(self.control[STOP])

    def checkpoint_asked(self, synchronous: bool) -> int:
        """The newest checkpoint this worker must answer. Synchronous workers take it from
        their barrier, so that all of them answer after the same step."""
        if synchronous and self.agreed is not None:
            return int(self.agreed[AGREED_CHECKPOINT])
        return int(self.control[CHECKPOINT])

    def await_resume(self, seq: int, parent_pid: int) -> None:
        """Pause after answering checkpoint ``seq`` until the main process has taken it: the
        shared state and every worker's state are then from one instant (no exchange in
        between)."""
        while int(self.control[RESUME]) < seq and not self.stopping():
            check_parent(parent_pid)
            time.sleep(0.001)

    def wait_for_go(self, parent_pid: int) -> None:
        while not self.control[GO]:
            check_parent(parent_pid)
            time.sleep(0.01)


def decide_stop(control: torch.Tensor, agreed: torch.Tensor) -> None:
    """Barrier action (run by one worker once all have arrived): fix the stop decision, and the
    checkpoint the workers answer after this step (all at the same step, so none waits at a
    barrier for a peer that has paused for the checkpoint)."""
    agreed[AGREED_STOP] = int(control[STOP])
    agreed[AGREED_CHECKPOINT] = int(control[CHECKPOINT])


def steps_budget(config: TrainConfig, train_size: int) -> int | None:
    """Local steps per worker implied by --steps and --epochs (the smaller), None if neither."""
    budgets = []
    if config.steps is not None:
        budgets.append(config.steps)
    epochs = config.epochs
    if epochs is None and config.steps is None and config.time_limit is None:
        epochs = config.DEFAULT_EPOCHS
    if epochs is not None:
        # An epoch is one pass over the training set by all workers together.
        budgets.append(max(1, math.ceil(epochs * train_size / (config.workers * config.batch_size))))
    return min(budgets) if budgets else None
