"""Test loss and accuracy of the reported model over wall-clock time, within a compute budget.

Evaluation competes with the workers for the machine. Its share is bounded instead of its
period: the cost of one evaluation is measured on this machine and this model (the thread's
CPU time, or wall time on a GPU), and snapshots are spaced so that evaluating them takes about
``eval_budget`` (10%) of the compute of the run::

    interval = cost of one evaluation / (budget * compute units)

where the compute units are the cores the run may use (or the GPUs, when the evaluation runs on
one). ``--eval-every`` overrides the interval.

While training, a snapshot is evaluated on a fixed, seeded subset of the test set (at most
``eval_samples`` samples; each record says how many it used); the final record always uses the
whole test set, and so do deferred evaluations, which take nothing from the workers.

- Live mode: a low-priority thread evaluates one snapshot at a time. A new snapshot is only
  taken once the previous one is evaluated, so there is never a backlog: when training ends,
  at most one evaluation is under way, and the summary follows within that evaluation plus the
  final one.
- Deferred mode: snapshots are only copied while training (their times are exact) and are
  evaluated after it, with every core. They are held in memory up to ``MEMORY_BYTES`` and
  spooled to the run directory beyond that; none is ever dropped silently. One that cannot be
  kept (the disk is full) is counted in ``dropped``, and readers of the records (the bench)
  then refuse to read a time to target from them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import TrainConfig
from .flat import flatten_
from .spool import SnapshotSpool

log = logging.getLogger(__name__)

EVAL_SUBSET_SEED = 12345  # the subset must not depend on the run's seed: runs compare on it
MIN_INTERVAL = 0.25  # seconds; below this, snapshots cost more in copies than they tell


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    samples: int  # test samples used
    subset: bool  # a subset of the test set (during training), not all of it
    cost: float  # CPU seconds of the evaluating thread (wall seconds on a GPU)

    def __iter__(self) -> Iterator[float]:
        """Unpacks as ``loss, accuracy``."""
        return iter((self.loss, self.accuracy))


def compute_units(config: TrainConfig, eval_device: str) -> int:
    """What the run computes on: the cores it may use, or its GPUs when evaluation is on one."""
    if eval_device.startswith("cuda"):
        return max(1, len({d for d in config.worker_devices if d.startswith("cuda")}))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Evaluator:
    """Holds the test split (and its subset) and one model whose flat state is overwritten by
    each snapshot."""

    def __init__(self, config: TrainConfig, image_size: int, device: torch.device | str = "cpu"):
        from .data import load_split
        from .models import build_model

        from .worker import loss_function

        self.device = torch.device(device)
        self.data = load_split(config.dataset, config.data_dir, train=False, device=self.device,
                               image_size=image_size, loader_workers=config.loader_workers)
        limit = config.eval_samples or len(self.data)
        self.subset = self.data.subset(limit, EVAL_SUBSET_SEED)
        self.model_name = config.model
        self.state = flatten_(build_model(config.model, self.data.info), self.device)
        self.batch_size = config.eval_batch_size
        self.loss_fn = loss_function(config)
        self.metric_fn = None
        if config.metric:
            from .user import import_spec

            self.metric_fn = import_spec(config.metric, "metric")
        self.custom_loss = config.loss is not None

    def trial(self) -> None:
        """One forward pass on two test samples, in the main process, before any worker starts:
        a model that rejects the data's inputs, or gives fewer outputs than the data has classes
        (with the default classification loss), is refused in one line."""
        from .config import ConfigError

        model = self.state.module
        if self.state.n_params == 0:  # the meta build in launcher.prepare saw it where it could
            from .models import nothing_to_train

            raise ConfigError(nothing_to_train(self.model_name))
        x, y = next(iter(self.data.batches(2, drop_last=False)))
        model.eval()
        try:
            with torch.no_grad():
                out = model(x)
        except (Exception, SystemExit) as e:
            raise ConfigError(f"--model {self.model_name} cannot take the inputs of "
                              f"{self.data.info.name} (shape {tuple(x.shape)}): {type(e).__name__}: "
                              f"{' '.join(str(e).split())}"[:400]) from None
        if self.custom_loss:
            return
        classes = self.data.info.num_classes
        if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise ConfigError(f"--model {self.model_name} gives {tuple(getattr(out, 'shape', ()))} "
                              "for a batch of 2, not [batch, classes] scores")
        if out.shape[1] < classes:
            raise ConfigError(f"--model {self.model_name} gives {out.shape[1]} scores, but the "
                              f"labels of {self.data.info.name} go up to {classes - 1}")

    def _clock(self) -> float:
        # The thread's own CPU time measures what evaluation takes from the workers, whatever
        # else the machine is doing; on a GPU the work is the device's, so wall time.
        return time.perf_counter() if self.device.type == "cuda" else time.thread_time()

    @torch.no_grad()
    def evaluate(self, flat: Tensor, cancel: threading.Event | None = None,
                 full: bool = True) -> Evaluation:
        """Test loss and accuracy of the model whose flat state is ``flat``, on the whole test
        set or (``full=False``) on the fixed subset. ``cancel`` is checked between batches:
        once set, Cancelled is raised."""
        start = self._clock()
        data = self.data if full else self.subset
        model = self.state.module
        self.state.flat.copy_(flat)
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for x, y in data.batches(self.batch_size, drop_last=False):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            out = model(x)
            n = y.shape[0]
            # Means over the batch, weighted by its size: the user's loss and metric are means.
            loss_sum += self.loss_fn(out, y).double() * n
            if self.metric_fn is None:
                correct += (out.argmax(1) == y).sum()
            else:
                correct = correct + float(self.metric_fn(out, y)) * n
            count += n
        loss, accuracy = loss_sum.item() / max(count, 1), float(correct) / max(count, 1)
        return Evaluation(loss, accuracy, count, data is not self.data, self._clock() - start)

    def state_dict(self, flat: Tensor) -> dict[str, Tensor]:
        """A plain state_dict of the model holding ``flat``, on the CPU, for ``torch.save``."""
        self.state.flat.copy_(flat)
        return {k: v.detach().cpu().clone() for k, v in self.state.module.state_dict().items()}


class Cancelled(Exception):
    pass


def record_fields(result: Evaluation) -> dict[str, Any]:
    return {"test_loss": result.loss, "test_accuracy": result.accuracy,
            "eval_samples": result.samples, "eval_subset": result.subset}


EXTRA = "_extra"  # in a snapshot's fields: other models to evaluate beside it (name -> flat)


def evaluate_record(evaluator: "Evaluator", snapshot: Tensor, meta: dict[str, Any],
                    cancel: threading.Event | None, full: bool) -> tuple[dict[str, Any], float]:
    """The record of one snapshot (its fields, the evaluation's, and ``<name>_test_accuracy``
    of every extra model in it) and what evaluating it all cost."""
    extras = meta.get(EXTRA) or {}
    result = evaluator.evaluate(snapshot, cancel, full=full)
    record = {k: v for k, v in meta.items() if k != EXTRA}
    record.update(record_fields(result))
    cost = result.cost
    for name, flat in extras.items():
        extra = evaluator.evaluate(flat, cancel, full=full)
        record[f"{name}_test_accuracy"] = extra.accuracy
        cost += extra.cost
    return record, cost


class EvalScheduler:
    """When to snapshot the reported model, and where its evaluation runs (see module doc).

    The main loop calls :meth:`tick` often; it takes a snapshot through ``take`` when one is
    due. ``on_record`` receives every evaluated record (metrics fields plus the evaluation's).
    """

    NICE = 5  # CPU weight ~1/3 of a worker's while they compete for a core
    MEMORY_BYTES = 256 * 2**20  # deferred snapshots held in memory before spooling to disk
    SMOOTHING = 0.5  # weight of the newest cost in the running estimate

    def __init__(self, evaluator: Evaluator, on_record: Callable[[dict[str, Any]], None], *,
                 deferred: bool, every: float | None, budget: float, units: int,
                 spool_dir: Path):
        self.evaluator, self.on_record = evaluator, on_record
        self.deferred, self.every, self.budget, self.units = deferred, every, budget, units
        self.spool = SnapshotSpool(spool_dir, self.MEMORY_BYTES)
        self.cost: float | None = None  # running estimate of one evaluation's cost
        self.busy_cost = 0.0  # evaluation cost spent while the workers trained (live mode)
        self.taken = 0
        self.next_at = 0.0  # perf_counter time of the next snapshot
        self.failed: str | None = None  # an evaluation failed (one line): no more are taken
        self.cancel = threading.Event()
        self._pending: tuple[Tensor, dict[str, Any]] | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._wake = threading.Condition()
        self._closed = False
        self.thread: threading.Thread | None = None
        if not deferred:
            self.thread = threading.Thread(target=self._loop, name="easgd-evaluator", daemon=True)
            self.thread.start()

    # -- spacing -------------------------------------------------------------------------

    @property
    def interval(self) -> float:
        """Seconds between snapshots: --eval-every, else the measured cost over the budget."""
        if self.every is not None:
            return self.every
        if self.cost is None:
            return MIN_INTERVAL
        return max(MIN_INTERVAL, self.cost / (self.budget * self.units))

    def _observe(self, cost: float) -> None:
        self.cost = cost if self.cost is None else (
            self.SMOOTHING * cost + (1 - self.SMOOTHING) * self.cost)

    def measure(self, flat: Tensor) -> float:
        """Evaluate ``flat`` once in this thread, as the run's snapshots will be (live: on the
        subset; deferred: on the whole test set), to learn what an evaluation costs here;
        nothing is recorded. Returns the cost."""
        try:
            result = self.evaluator.evaluate(flat, full=self.deferred)
        except Exception as e:  # the run trains anyway; the failure is recorded
            self._fail(e, {"seconds": 0.0, "samples": 0, "steps": [], "train_loss": None})
            return 0.0
        self._observe(result.cost)
        return result.cost

    def start(self, now: float) -> None:
        """Training starts at ``now``: the first snapshot is one interval later."""
        self.next_at = now + self.interval

    # -- while training ------------------------------------------------------------------

    def _fail(self, error: BaseException, meta: dict[str, Any]) -> None:
        """An evaluation failed: say so once, record it, take no more (the next would fail
        the same way); training goes on."""
        self.failed = f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]
        log.warning("evaluation failed (%s); training goes on without it", self.failed)
        self.on_record({**{k: v for k, v in meta.items() if k != EXTRA}, "eval_error": self.failed})

    def tick(self, now: float, take: Callable[[], tuple[Tensor, dict[str, Any]]]) -> None:
        """Take a snapshot if one is due (and, live, the evaluator is free)."""
        if self.failed is not None or self.cancel.is_set():
            return  # failed, or interrupted: the thread may be gone, nothing more to hand it
        if now < self.next_at or (not self.deferred and not self._idle.is_set()):
            return
        snapshot, meta = take()
        self.taken += 1
        if self.deferred:
            self.spool.put(snapshot, meta)
        else:
            self._idle.clear()
            with self._wake:
                self._pending = (snapshot, meta)
                self._wake.notify()
        # Live, the next snapshot is due one interval after this one *and* after this one's
        # evaluation (tick waits for the evaluator to be idle): no backlog can build up.
        self.next_at = now + self.interval

    def _loop(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.NICE)
        except (AttributeError, OSError):  # not Linux: a thread's priority is not its own
            pass
        while True:
            with self._wake:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                snapshot, meta = self._pending
                self._pending = None
            try:
                record, cost = evaluate_record(self.evaluator, snapshot, meta, self.cancel, False)
                self._observe(cost)
                self.busy_cost += cost
                self.on_record(record)
            except Cancelled:
                return
            except Exception as e:  # an unreadable test image: the run goes on without
                self._fail(e, meta)
                return
            finally:
                self._idle.set()

    # -- after training ------------------------------------------------------------------

    def finish(self, threads: int | None = None) -> None:
        """Training is over: live, wait for the evaluation under way; deferred, evaluate every
        kept snapshot in order (with ``threads`` intra-op threads). Raises Cancelled when
        ``cancel`` is set; a failure is recorded in ``failed``."""
        self._stop_thread(cancel=False)
        if not self.deferred or self.failed is not None:
            return
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            for snapshot, meta in self.spool.drain():
                try:
                    record, _ = evaluate_record(self.evaluator, snapshot, meta, self.cancel, True)
                except Cancelled:
                    raise
                except Exception as e:
                    self._fail(e, meta)
                    return
                self.on_record(record)
        finally:
            torch.set_num_threads(before)
            self.spool.close()

    def close(self) -> None:
        """Stop without evaluating what is left (the run failed or was interrupted)."""
        self._stop_thread(cancel=True)
        self.spool.close()

    def _stop_thread(self, cancel: bool) -> None:
        if cancel:
            self.cancel.set()  # an evaluation under way stops at its next batch
        if self.thread is None:
            return
        # The evaluation under way, if any, completes (or is cancelled); a thread that has
        # already returned (cancelled) will not.
        while self.thread.is_alive() and not self._idle.wait(0.05):
            pass
        with self._wake:
            self._closed = True
            self._wake.notify()
        self.thread.join()
        self.thread = None
