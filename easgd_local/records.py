"""What a run writes of its model: the evaluation records (metrics.jsonl), center.pt, the
summary, and the checks that fail a run by its results (divergences, chance).

The reported model is the algorithm's (its center, or an average), or the root of the level
above the box when there is one (boxes.py). Snapshots of it are evaluated by an EvalScheduler
(evaluate.py) while the workers train; each evaluated one comes back through ``record``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from .boxes import BoxLevel
from .config import TrainConfig
from .control import BYTES, DIVERGENCES, EXCHANGE_SECONDS, EXCHANGES, STOP, WorkerChannels
from .evaluate import EXTRA, Cancelled, EvalScheduler, Evaluator, compute_units, evaluate_record
from .hierarchy import hierarchy_of
from .output import RunDir
from .reporting import Reporter, TrainError, one_line
from .shared import LockTimeout

log = logging.getLogger(__name__)

# A run whose workers keep diverging has failed (exit 1, the last finite center kept): more
# than DIVERGENCES_PER_WORKER divergences per worker since it started (or was resumed), which
# are also at least DIVERGENT_SHARE of its exchanges (a long run may diverge now and then).
DIVERGENCES_PER_WORKER = 3
DIVERGENT_SHARE = 0.1
# A classifier that diverged and ends at most this far above 1/classes is no better than chance.
CHANCE_MARGIN = 0.05
# --target-hold: the least time a run trains on after it first reached its target.
MIN_HOLD_SECONDS = 3.0
# Seconds: the spacing of evaluations during training on a box that does not evaluate then
# (another box of the job does; boxes.BoxLevel.evaluates).
NEVER = 1e9


class Records:
    """The reported model of one run and what is written of it. ``scheduler`` evaluates its
    snapshots once ``start_evaluations`` made it; ``where`` (the checkpoint directory) is named
    in the lines that end a run."""

    def __init__(self, config: TrainConfig, ch: WorkerChannels, out: RunDir, evaluator: Evaluator,
                 image_size: int, reporter: Reporter, box: BoxLevel, where: Path):
        self.config, self.ch, self.out, self.evaluator = config, ch, out, evaluator
        self.image_size, self.reporter, self.box, self.where = image_size, reporter, box, where
        self.scheduler: EvalScheduler | None = None
        self.last_accuracy: float | None = None
        self.last_record: dict[str, Any] = {}
        self.reached_at: float | None = None  # seconds of the first record at the target
        self.metrics_lost = False
        # Divergences and exchanges are judged from this start on (a resumed run too).
        self.counted_before = ch.counters.sum(0).clone()

    def reported(self) -> torch.Tensor:
        """A copy of the model the run reports, now (with several boxes: the root, as the last
        round left it)."""
        root = self.box.reported()
        return root if root is not None else self.config.algorithm.reported(self.ch.shared,
                                                                           self.config)

    def start_evaluations(self, eval_device: str) -> EvalScheduler:
        """The scheduler of the evaluations, and what one costs here (it sets their spacing;
        measured while the workers start). A box that does not evaluate during training (the
        box level says so) spaces them beyond any run."""
        config = self.config
        self.scheduler = EvalScheduler(
            self.evaluator, self.record, deferred=config.eval_deferred,
            every=config.eval_every if self.box.evaluates else NEVER, budget=config.eval_budget,
            units=compute_units(config, eval_device), spool_dir=self.out.path / ".snapshots")
        return self.scheduler

    def snapshot(self, elapsed: float) -> tuple[torch.Tensor, dict[str, Any]]:
        """The reported model now, with the metric fields known at this moment."""
        snapshot = self.reported()
        extra = self.config.algorithm.also_reported(self.ch.shared, self.config)
        steps = self.ch.steps.tolist()
        losses = [x for x in self.ch.losses.tolist() if x == x]  # drop NaN: no report yet
        meta = {"seconds": round(elapsed, 3), "samples": sum(steps) * self.config.batch_size,
                "steps": steps, "train_loss": sum(losses) / len(losses) if losses else None}
        if extra:
            meta[EXTRA] = extra
        return snapshot, meta

    def record(self, record: dict[str, Any]) -> None:
        """One evaluated snapshot (or a failed evaluation): metrics.jsonl, the progress
        display, the accuracy target."""
        keys = ("seconds", "samples", "steps", "train_loss")
        if "eval_error" in record:
            self.append_metrics({**{k: record[k] for k in keys}, "eval_error": record["eval_error"]})
            return
        record = {k: record[k] for k in (*keys, "test_loss", "test_accuracy", "eval_samples",
                                         "eval_subset")
                  } | {k: v for k, v in record.items() if k.endswith("_test_accuracy")}
        self.append_metrics(record)
        self.last_record = record
        self.last_accuracy = record["test_accuracy"]
        self.reporter.evaluated(record)
        target = self.config.target_accuracy
        if target is not None and record["test_accuracy"] >= target:
            if self.reached_at is None:
                self.reached_at = record["seconds"]
            hold = self.config.target_hold
            # Trained on past the crossing (--target-hold), the records show it whole.
            if not hold or record["seconds"] >= self.reached_at + max(
                    MIN_HOLD_SECONDS, hold * self.reached_at):
                self.ch.control[STOP] = 1

    def append_metrics(self, record: dict[str, Any]) -> None:
        try:
            self.out.append_metrics(record)
        except OSError as e:
            if not self.metrics_lost:
                log.warning("cannot append to metrics.jsonl (%s); records are lost until it "
                            "can be written again", e.strerror or e)
            self.metrics_lost = True

    def save_center(self, snapshot: torch.Tensor) -> None:
        """The trained model, center.pt; TrainError when it cannot be written."""
        try:
            self.out.save_state_dict("center.pt", self.evaluator.state_dict(snapshot))
        except OSError as e:
            raise TrainError(f"cannot write {self.out.path / 'center.pt'}: {e.strerror or e}") from None

    def final_evaluation(self, snapshot: torch.Tensor, final: dict[str, Any],
                         interrupted: bool) -> str | None:
        """The evaluations still due, then the final one on the whole test set; the error of
        one that failed (one line), else None. An interrupt (now, or ``interrupted`` before)
        stops it: KeyboardInterrupt."""
        scheduler = self.scheduler
        eval_error = scheduler.failed
        try:
            if interrupted:
                raise Cancelled()
            scheduler.finish(threads=scheduler.units if self.evaluator.device.type == "cpu" else None)
            if scheduler.failed is None:
                record, _ = evaluate_record(self.evaluator, snapshot, final, scheduler.cancel, True)
                self.record(record)
        except Cancelled:
            log.warning("interrupted during the final evaluation: center.pt and the checkpoint "
                        "are saved in %s", self.out.path)
            raise KeyboardInterrupt from None
        except Exception as e:  # an unreadable test image, a broken data set
            eval_error = one_line(e)
            log.debug("evaluation failed", exc_info=True)
        return eval_error or scheduler.failed

    def summary(self, startup: float, train_seconds: float, ended: float, samples: int,
                counters: list[float], final: dict[str, Any], eval_error: str | None,
                restarts: int, restart_seconds: list[float]) -> dict[str, Any]:
        """The run's own figures in summary.json (the level above the box adds its own)."""
        config, ch, scheduler = self.config, self.ch, self.scheduler
        return {
            "algo": config.algo, "workers": config.workers, "devices": config.worker_devices,
            "tau": config.tau, "alpha": config.resolved_alpha,
            "momentum": config.resolved_momentum, "options": dict(config.resolved_options),
            "lr": config.lr, "batch_size": config.batch_size, "weight_decay": config.weight_decay,
            "dataset": config.dataset, "model": config.model, "image_size": self.image_size,
            "lock": config.lock,
            # The tree of centers, bottom up: each level's children, their count per parent,
            # period, beta, alpha and transport (hierarchy.py).
            "hierarchy": hierarchy_of(config, boxes=self.box.boxes).describe(),
            "steps_per_worker": ch.steps.tolist(), "total_samples": samples,
            "startup_seconds": round(startup, 3), "train_seconds": round(train_seconds, 3),
            "samples_per_second": samples / train_seconds if train_seconds > 0 else 0.0,
            "exchanges": int(counters[EXCHANGES]), "bytes_exchanged": int(counters[BYTES]),
            "exchange_fraction": counters[EXCHANGE_SECONDS] / (config.workers * train_seconds)
            if train_seconds > 0 else 0.0,
            "worker_restarts": restarts,
            "restart_seconds": restart_seconds,
            "divergences": int(counters[DIVERGENCES]),
            "final_test_accuracy": None if eval_error else self.last_record["test_accuracy"],
            "final_test_loss": None if eval_error else self.last_record["test_loss"],
            "final_train_loss": final["train_loss"],
            "eval_error": eval_error,
            # Evaluation: what it cost while the workers trained, as a share of the run's
            # compute (cores or GPUs), how far apart the snapshots were, any not evaluated.
            "eval_deferred": scheduler.deferred, "eval_snapshots": scheduler.taken,
            "eval_interval_s": round(train_seconds / scheduler.taken, 3) if scheduler.taken else None,
            "eval_cpu_seconds": round(scheduler.busy_cost, 3),
            "eval_share": scheduler.busy_cost / (scheduler.units * train_seconds)
            if train_seconds > 0 else 0.0,
            "snapshots_dropped": scheduler.spool.dropped,
            # From the end of training to this summary: deferred evaluations, the final one.
            "finish_seconds": round(time.perf_counter() - ended, 3),
        }

    def write_summary(self, summary: dict[str, Any]) -> None:
        try:
            self.out.write_json("summary.json", summary)
        except OSError as e:
            raise TrainError(f"cannot write {self.out.path / 'summary.json'}: {e.strerror or e}; "
                             "center.pt is saved") from None

    def check_divergences(self) -> None:
        """Workers that keep diverging (DIVERGENCES_PER_WORKER, DIVERGENT_SHARE) end the run as
        failed: TrainError, with the last finite center saved (the run adds the checkpoint)."""
        counted = self.ch.counters.sum(0) - self.counted_before
        diverged, exchanges = int(counted[DIVERGENCES]), int(counted[EXCHANGES])
        limit = DIVERGENCES_PER_WORKER * self.config.workers
        if diverged <= limit or diverged < DIVERGENT_SHARE * (diverged + exchanges):
            return
        kept = self.keep_center()
        raise TrainError(f"the workers diverged {diverged} times (more than {limit}, "
                         f"{DIVERGENCES_PER_WORKER} per worker; {exchanges} exchanges went "
                         f"through): the run failed; lower --lr or check the data for NaN or "
                         f"infinite values; {kept}")

    def keep_center(self) -> str:
        """Write the reported model to center.pt when it is finite (shared state never takes a
        non-finite contribution); says where the model and the checkpoint are."""
        where = f"the checkpoint is in {self.where}"
        if self.scheduler is not None:
            self.scheduler.close()  # the evaluator's model is free for the copy (no more records)
        try:
            snapshot = self.reported()
        except LockTimeout:
            return where
        if not bool(torch.isfinite(snapshot).all()):
            return where
        try:
            self.out.save_state_dict("center.pt", self.evaluator.state_dict(snapshot))
        except OSError:
            return where
        return f"the last finite center is saved in {self.out.path / 'center.pt'}, {where}"

    def check_chance(self, summary: dict[str, Any]) -> None:
        """A classifier (the default loss and metric) whose workers diverged and whose reported
        model ends no better than chance (at most CHANCE_MARGIN above 1 / classes) failed."""
        accuracy, diverged = summary["final_test_accuracy"], summary["divergences"]
        if accuracy is None or not diverged or self.config.loss or self.config.metric:
            return
        classes = self.evaluator.data.info.num_classes
        if accuracy > 1 / classes + CHANCE_MARGIN:
            return
        raise TrainError(f"the model is no better than chance (test accuracy {accuracy:.4f}, "
                         f"{1 / classes:.4f} by chance with {classes} classes) and the workers "
                         f"diverged {diverged} times: the run failed; lower --lr or check the "
                         f"data for NaN or infinite values; center.pt, the checkpoint and "
                         f"summary.json are in {self.out.path}")

    def close(self) -> None:
        """No more evaluations (the scheduler's thread ends)."""
        if self.scheduler is not None:
            self.scheduler.close()
