"""The level above one box, as a plug-in of the run: one box alone, or several (--multi-node).

A run talks to this level only through the BoxLevel protocol: ``start`` (agree on the root),
``round`` (a round between boxes when one is due), ``all_done``, ``reported`` (the model the
level reports, if it has one), ``checkpoint_part`` (what a checkpoint keeps of it), ``totals``
(the summary's figures of every box), ``boxes`` (how many), ``evaluates`` (whether this box
evaluates the job's model while it trains: box 0 alone), ``checkpoint_dir`` and ``close``.
OneBox does nothing at every step; Boxes drives this box's side of the rounds
(multinode.BoxLink) and turns the failure of another box into a TrainError of one line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from .center import Diverged
from .config import TrainConfig
from .control import EXCHANGES, WorkerChannels
from .reporting import TrainError, one_line
from .shared import LockTimeout

log = logging.getLogger(__name__)


class BoxLevel(Protocol):
    restarted: bool  # this start of the job follows a failure: it resumes its own checkpoint
    all_done: bool  # every box has finished training
    boxes: int  # the boxes of the job (the children of the level of the boxes)
    evaluates: bool  # this box evaluates the job's model while it trains

    def checkpoint_dir(self, out: Path) -> Path: ...
    def start(self, ch: WorkerChannels, resume: dict[str, Any] | None, where: Path) -> None: ...
    def round(self, done: bool) -> None: ...
    def reported(self) -> torch.Tensor | None: ...
    def checkpoint_part(self) -> dict[str, Any]: ...
    def totals(self, samples: int, counters: list[float],
               train_seconds: float) -> dict[str, Any]: ...
    def close(self) -> None: ...


class OneBox:
    """A run on one box: there is no level above it."""

    restarted = False
    all_done = True
    boxes = 1
    evaluates = True

    def checkpoint_dir(self, out: Path) -> Path:
        return out

    def start(self, ch: WorkerChannels, resume: dict[str, Any] | None, where: Path) -> None:
        pass

    def round(self, done: bool) -> None:
        pass

    def reported(self) -> torch.Tensor | None:
        return None

    def checkpoint_part(self) -> dict[str, Any]:
        return {}

    def totals(self, samples: int, counters: list[float], train_seconds: float) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class Boxes:
    """This box among several: its box center tied to a root shared by every box
    (multinode.py). ``link`` is its multinode.BoxLink."""

    def __init__(self, link: Any, config: TrainConfig):
        self.link, self.config = link, config
        self.ch: WorkerChannels | None = None
        self.where: Path | None = None  # the checkpoint directory, named when a round fails

    @property
    def restarted(self) -> bool:
        return self.link.restarted

    @property
    def all_done(self) -> bool:
        return self.link.all_done

    @property
    def boxes(self) -> int:
        return self.link.world

    @property
    def evaluates(self) -> bool:
        """Box 0 evaluates the job's model during training; the others train (each still
        evaluates the final model)."""
        return self.link.rank == 0

    def checkpoint_dir(self, out: Path) -> Path:
        """Box 0 keeps its checkpoints under box-0/ (the job's results are at the top)."""
        from .multinode import box_dir

        return box_dir(out, 0) if self.link.rank == 0 else out

    def center(self) -> Any:
        """This box's center entry of the shared state (a SharedTensor)."""
        return self.ch.shared[self.config.algorithm.box_center]

    def start(self, ch: WorkerChannels, resume: dict[str, Any] | None, where: Path) -> None:
        """Every box takes box 0's root (multinode.py); no answer ends the run."""
        self.ch, self.where = ch, where
        center = self.center().snapshot()
        saved = resume.get("box") if resume is not None else None
        try:
            self.link.start_root(center, saved)
        except Exception as e:  # a box that never came: gloo's error, or the timeout
            raise TrainError(f"box {self.link.rank}: the boxes could not agree on the root "
                             f"({one_line(e, 200)})") from None

    def round(self, done: bool) -> None:
        """A round between boxes when one is due (multinode.py); its failure ends the run."""
        link = self.link
        if link.orphaned():
            raise TrainError(f"box {link.rank}: torchrun's agent that started this box is "
                             f"gone; checkpoint in {self.where}")
        exchanges = float(self.ch.counters[:, EXCHANGES].sum())
        if not link.due(exchanges, done):
            return
        try:
            link.round(self.center(), exchanges, done)
        except LockTimeout:
            raise
        except Diverged:
            raise TrainError(f"box {link.rank}: its center is not finite, it cannot join the "
                             f"rounds between boxes; checkpoint in {self.where}") from None
        except Exception as e:  # a box died: gloo's error, or the timeout
            raise TrainError(f"box {link.rank}: the exchange between boxes failed "
                             f"({one_line(e, 200)}); another box is gone; checkpoint in "
                             f"{self.where}") from None

    def reported(self) -> torch.Tensor | None:
        """The root, as the last round left it (a copy); None before the boxes agreed on it."""
        return self.link.root.clone() if self.link.root is not None else None

    def checkpoint_part(self) -> dict[str, Any]:
        """The root and the rounds between boxes, once there is a root."""
        return {"box": self.link.state()} if self.link.root is not None else {}

    def totals(self, samples: int, counters: list[float], train_seconds: float) -> dict[str, Any]:
        """The summary's figures of every box together (one all-reduce, on every box at once,
        before box 0 evaluates)."""
        b = self.link
        all_samples, all_bytes, all_exchanges = b.totals([samples, b.bytes, counters[EXCHANGES]])
        rate = all_samples / train_seconds if train_seconds > 0 else 0.0
        return {"boxes": b.world, "box": b.rank, "total_samples_all_boxes": int(all_samples),
                "samples_per_second_all_boxes": rate,
                "exchanges_all_boxes": int(all_exchanges),
                "bytes_between_boxes": int(all_bytes), "root_rounds": b.rounds,
                "bytes_between_boxes_per_sample": all_bytes / all_samples if all_samples else None,
                "root_lock_seconds_max": max(b.lock_seconds, default=0.0),
                "root_lock_seconds_mean": _mean(b.lock_seconds),
                "root_round_seconds_mean": _mean(b.round_seconds),
                "alpha_root": b.alpha_root, "box_tau": b.tau,
                "box_beta": self.config.box_beta}

    def close(self) -> None:
        self.link.close()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def join(config: TrainConfig,
         resume: dict[str, Any] | None) -> tuple[TrainConfig, dict[str, Any] | None, BoxLevel]:
    """The level above this box: OneBox, or with --multi-node the other boxes joined (one line
    and exit 2 if they run another job), this box's global ranks and directory taken, and its
    own last checkpoint after a restart. ``config`` is a copy when it changes."""
    if not config.multi_node:
        return config, resume, OneBox()
    from .checkpoint import Checkpointer, CheckpointError
    from .multinode import BoxLink, box_dir

    config = dataclasses.replace(config, options=dict(config.options))
    config.validate()
    if config.out is None:
        config.out = Path("runs") / f"multinode-{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}"
    link = BoxLink.start(config)
    root = Path(config.out)
    config.rank_offset = link.rank * config.workers
    # Box 0 writes the job's results (the mean's metrics, center.pt, summary.json) at the top;
    # every box keeps its own state (checkpoints, its configuration) under box-k/. Box 0 alone
    # evaluates during training (Boxes.evaluates).
    config.out = root if link.rank == 0 else box_dir(root, link.rank)
    boxes = Boxes(link, config)
    if resume is None and link.restarted:  # torchrun started the job again: go on from here
        try:
            resume = Checkpointer(boxes.checkpoint_dir(Path(config.out))).load()
            log.warning("box %d resumes from its last checkpoint", link.rank)
        except CheckpointError:
            log.warning("box %d has no checkpoint yet; it starts from the beginning", link.rank)
    return config, resume, boxes
