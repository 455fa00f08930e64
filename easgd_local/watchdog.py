"""The stall watchdog: a worker that makes no step for too long is declared dead.

Before STOP, a worker that makes no step for the stall timeout is killed, and replaced like any
dead worker (supervise.py); after STOP, one that does not finish within a grace is killed and the
run ends with what it has. Only one is killed at a time, the one stuck (``culprit``): the others
may only be waiting for it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .control import STOP, WorkerChannels
from .reporting import TrainError
from .supervise import WorkerProcess

log = logging.getLogger(__name__)

# A worker that makes no step for this long is declared dead (killed, replaced): at least
# STALL_FLOOR seconds, and STALL_FACTOR times the longest pause between steps seen so far.
STALL_FLOOR_SECONDS = 20.0
STALL_FACTOR = 20.0
# After STOP, workers get this long (or 3 of the longest pauses seen) to finish their step.
STOP_GRACE_SECONDS = 5.0


class Watchdog:
    """Progress of each worker: (process, steps, when they last changed), and the longest pause
    between steps seen while workers were healthy. ``where`` (the checkpoint directory) is named
    in the line that ends a run."""

    def __init__(self, config: TrainConfig, ch: WorkerChannels, where: Path):
        self.config, self.ch, self.where = config, ch, where
        self.progress: dict[int, tuple[Any, int, float]] = {}
        self.longest_pause = 0.0
        self.stop_seen: float | None = None  # when STOP was first seen by the supervisor

    def stall_timeout(self) -> float:
        if self.config.stall_timeout is not None:
            return self.config.stall_timeout
        return max(STALL_FLOOR_SECONDS, STALL_FACTOR * self.longest_pause)

    def forget_pauses(self, but: set[int] | frozenset[int] = frozenset()) -> None:
        """Restart the no-progress clock of every worker (after a pause the main process caused)
        but the ranks in ``but``."""
        now = time.perf_counter()
        self.progress = {r: (proc, steps, since if r in but else now)
                         for r, (proc, steps, since) in self.progress.items()}

    def watch(self, now: float, workers: list[WorkerProcess]) -> None:
        """Workers that make no progress (the module's docstring): killed after STOP past the
        grace, or the culprit among them declared dead past the stall timeout."""
        steps = self.ch.steps.tolist()
        stalled = []
        for w in workers:
            if w.done or not w.ready:
                continue
            seen = self.progress.get(w.rank)
            if seen is None or seen[0] is not w.proc or steps[w.rank] != seen[1]:
                if seen is not None and seen[0] is w.proc:
                    self.longest_pause = max(self.longest_pause, now - seen[2])
                self.progress[w.rank] = (w.proc, steps[w.rank], now)
            else:
                stalled.append((now - seen[2], w))
        if self.ch.control[STOP]:
            self.past_grace(now, workers)
            return
        timeout = self.stall_timeout()
        if stalled and max(pause for pause, _ in stalled) > timeout:
            pause, w = self.culprit(stalled)
            if pause > timeout:
                log.warning("worker %d made no step for %.0f s (--stall-timeout %.0f s); "
                            "declaring it dead", w.rank, pause, timeout)
                w.proc.kill()
                if self.config.algorithm.synchronous:  # the others wait for it: the run ends
                    raise TrainError(f"worker {w.rank} made no step for {pause:.0f} s and was "
                                     f"declared dead; {self.config.algo} moves all workers "
                                     "together and cannot go on without it; checkpoint in "
                                     f"{self.where}")
                self.forget_pauses()

    def past_grace(self, now: float, workers: list[WorkerProcess]) -> None:
        """After STOP: kill every worker not done within the grace."""
        if self.stop_seen is None:
            self.stop_seen = now
        grace = max(STOP_GRACE_SECONDS, 3 * self.longest_pause)
        if now - self.stop_seen > grace:
            for w in workers:
                if not w.done and w.proc.is_alive():
                    log.warning("worker %d did not stop within %.0f s; killing it (its state "
                                "from the last checkpoint is kept)", w.rank, grace)
                    w.proc.kill()

    def culprit(self, stalled: list[tuple[float, WorkerProcess]]) -> tuple[float, WorkerProcess]:
        """Which of the workers that make no step is stuck, as (its pause, it): one stopped by a
        signal (kill -STOP) first, then one holding a lock of shared state (the others may be
        waiting for it), then one not waiting for the others (in a synchronous algorithm they
        all stop stepping, those at the barrier or in ddp's all-reduce for the one that is not),
        then the one with the fewest steps, then the one stalled longest."""
        holders = self.ch.shared.lock_holders()
        waiting = self.ch.barrier.waiting() if self.ch.barrier is not None else set()
        steps = self.ch.steps.tolist()

        def suspicion(item: tuple[float, WorkerProcess]) -> tuple:
            pause, w = item
            return (_stopped(w.proc.pid), w.proc.pid in holders, w.rank not in waiting,
                    -steps[w.rank], pause)

        return max(stalled, key=suspicion)


def _stopped(pid: int | None) -> bool:
    """Whether process ``pid`` is stopped (kill -STOP, or a debugger), from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False
