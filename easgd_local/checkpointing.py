"""The checkpoint protocol of a run, on the main process's side (checkpoint.py writes the file).

A checkpoint of one instant (``Checkpoints.now``): the main process sets CHECKPOINT to a new
sequence number; every worker answers with its state (a State message, which supervise.py keeps)
and pauses; once all have answered, the shared state, the counters and the level above the box
are copied, RESUME lets the workers go on, and the copy is written. At the end of a run, or when
it is interrupted or fails, ``save`` keeps what there is without asking the workers (their last
states). ``load_resume`` is the way back: a saved shared state into a new run's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .boxes import BoxLevel
from .checkpoint import REFUSED, Checkpointer, CheckpointError, check_layout, made_by
from .config import TrainConfig
from .control import CHECKPOINT, RESUME, WorkerChannels
from .shared import LockTimeout
from .supervise import POLL_SECONDS, Supervisor

log = logging.getLogger(__name__)

STATE_TIMEOUT_SECONDS = 10.0  # how long a checkpoint waits for the workers' states


def load_resume(config: TrainConfig, shared: Any, resume: dict[str, Any]) -> None:
    """The saved shared state into ``shared``; CheckpointError (one line, nothing started)
    when it is not of this configuration: entries this one lacks or of other sizes, another
    number of workers, an entry this one needs missing. ``shared`` is closed when it fails."""
    where = config.out
    try:
        check_layout(resume, {name: shared[name].numel for name in shared}, config.workers, where)
        config.algorithm.load_state_dict(shared, resume["algorithm"])
    except KeyError as e:  # an entry that this configuration needs and the checkpoint lacks
        shared.close()
        missing = " ".join(str(e.args[0] if e.args else e).split())
        raise CheckpointError(f"--resume {where}: its checkpoint does not match its "
                              f"config.json ({missing}); {REFUSED}") from None
    except BaseException:
        shared.close()
        raise


class Checkpoints:
    """The checkpoints of one run, written by ``checkpointer`` (in its ``dir``)."""

    def __init__(self, config: TrainConfig, ch: WorkerChannels, crew: Supervisor,
                 box: BoxLevel, checkpointer: Checkpointer):
        self.config, self.ch, self.crew, self.box = config, ch, crew, box
        self.checkpointer = checkpointer
        self.seq = 0  # the last checkpoint asked of the workers

    @property
    def dir(self) -> Path:
        return self.checkpointer.dir

    @property
    def current(self) -> Path:
        return self.checkpointer.current

    def now(self, elapsed: float) -> set[int]:
        """A checkpoint of one instant (the module's docstring).

        A worker that does not answer within STATE_TIMEOUT_SECONDS keeps its older state in the
        checkpoint, which is then not of one instant; this is logged. Returns those ranks (they
        did not pause for it: their stall clocks go on)."""
        crew = self.crew
        self.seq += 1
        seq = self.seq
        self.ch.control[CHECKPOINT] = seq
        waiting = {w.rank: w for w in crew.workers if not w.done and w.ready}
        deadline = time.perf_counter() + STATE_TIMEOUT_SECONDS
        try:
            while waiting and time.perf_counter() < deadline:
                crew.receive(POLL_SECONDS)
                # A rank whose process died (and was replaced) no longer owes this checkpoint.
                waiting = {r: w for r, w in waiting.items()
                           if crew.workers[r] is w and not w.done and crew.state_seq.get(r) != seq}
            if waiting:
                log.warning("checkpoint: worker(s) %s did not answer within %.0f s; their older "
                            "states are kept", sorted(waiting), STATE_TIMEOUT_SECONDS)
            payload = self.payload(elapsed)
        except LockTimeout as e:
            log.warning("checkpoint skipped: %s", e)
            return set(waiting)
        finally:
            self.ch.control[RESUME] = seq  # the copies are taken: the workers go on
        self.write(payload)
        return set(waiting)

    def payload(self, elapsed: float) -> dict[str, Any]:
        state = self.config.algorithm.state_dict(self.ch.shared)
        return {"algorithm": state, "made_by": made_by(self.config, state),
                "steps": self.ch.steps.clone(), "counters": self.ch.counters.clone(),
                "losses": self.ch.losses.clone(), "workers": dict(self.crew.states),
                "elapsed": elapsed, "restarts": self.crew.total_restarts,
                **self.box.checkpoint_part()}

    def save(self, elapsed: float) -> None:
        """A checkpoint of the states there are, without asking the workers."""
        try:
            payload = self.payload(elapsed)
        except LockTimeout as e:
            log.warning("checkpoint skipped: %s", e)
            return
        self.write(payload)

    def write(self, payload: dict[str, Any]) -> None:
        """Write it; a full disk (or any write error) keeps the previous one and says so."""
        try:
            self.checkpointer.save(payload)
        except OSError as e:
            log.warning("checkpoint not written (%s); the previous one is kept in %s",
                        e.strerror or e, self.checkpointer.dir)
