"""Spawn the workers, supervise them, evaluate the reported model over wall-clock time, shut down.

The main process owns every resource: the algorithm's shared state, the channels, the
processes. It never leaves without stopping and joining (or, past a grace period, killing)
every worker, whatever ended the run: completion, a worker's error, an interrupt.

``train`` checks everything it can before any process starts (``prepare``), then a ``Run``
composes the rooms of the run, each with one job:

- supervise.py: the worker processes: spawn, messages, deaths and restarts, stop;
- interrupts.py: Ctrl-C and SIGTERM, acted on between messages;
- watchdog.py: a worker that makes no step for too long is declared dead;
- checkpointing.py: the checkpoint protocol (every worker's state and the shared state at
  one instant) and the way back (``load_resume``);
- records.py: the evaluations, metrics.jsonl, center.pt, summary.json, and the checks that
  fail a run by its results;
- boxes.py: the level above the box (one box alone, or several with --multi-node).

Nothing here depends on the algorithm: what differs is asked of its registry object
(algorithms/base.py).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from .boxes import BoxLevel, OneBox, join as join_boxes
from .checkpoint import Checkpointer
from .checkpointing import Checkpoints, load_resume
from .config import ConfigError, TrainConfig
from .control import STOP, WorkerChannels, steps_budget
from .evaluate import Evaluator
from .interrupts import interrupts_blocked
from .output import RunDir, RunLock, default_out
from .records import Records
from .reporting import Reporter, SilentReporter, TrainError
from .shared import LockTimeout, set_lock_timeout
from .supervise import POLL_SECONDS, Supervisor
from .watchdog import Watchdog

# Imported from here by the command line, the API, the bench and the tests.
__all__ = ["Reporter", "Run", "SilentReporter", "TrainError", "expect_config",
           "interrupts_blocked", "prepare", "train"]

log = logging.getLogger(__name__)

LOCK_TIMEOUT_SECONDS = 2.0  # the main process never waits longer for a lock of shared state


def prepare(config: TrainConfig, resuming: bool = False) -> tuple[RunDir, int, RunLock]:
    """Everything that can fail on bad input, before any process starts: values, data, --out.

    Returns the run directory (created, locked for this run, config.json written), the model's
    input size and the lock (release it when the run ends). Raises ConfigError, data.DataError
    or output.OutputError with a one-line message.
    """
    from .data import prepare_dataset
    from .models import check_model_name, model_input_size

    config.validate()
    for note in config.algorithm.notes(config):
        log.warning("%s", note)
    check_model_name(config.model)
    for flag, spec in (("--model", config.model), ("--loss", config.loss), ("--metric", config.metric)):
        if spec and ":" in spec and not spec.startswith("torchvision:"):
            from .user import import_spec

            import_spec(spec, flag)  # not found, missing, not callable: one line, now
    info = prepare_dataset(config.dataset, config.data_dir, config.download, config.image_size)
    if info.train_size is not None and config.batch_size > info.train_size:
        raise ConfigError(f"--batch-size {config.batch_size} exceeds the {info.train_size} "
                          f"training samples of {config.dataset}")
    image_size = model_input_size(config.model, info.image_size)
    check_model(config, info, image_size)
    if config.out is None:
        config.out = default_out(config.algo, config.workers)
    out = RunDir(config.out)
    if not resuming:
        out.create()
    else:
        out.path.mkdir(parents=True, exist_ok=True)
    # Held for the whole run: a second process (a --resume of a run still training) is refused
    # before it writes anything.
    lock = out.lock()
    try:
        out.write_json("config.json", config.to_dict())
    except BaseException:
        lock.release()
        raise
    return out, image_size, lock


# A user's labels are class indices: far more classes than distinct labels (a label of
# 10,000,000 among ten) is most likely a mistake, and makes the model that large.
FAR_MORE_CLASSES = 10  # times the distinct labels
MANY_MORE_CLASSES = 100  # and at least this many classes that no label uses


def check_model(config: TrainConfig, info: Any, image_size: int) -> None:
    """Before anything is written or started: the model built on the meta device (models.py:
    nothing allocated), refused in one line when it has nothing to train or when its copies
    (each worker's, the evaluator's, the shared state's) cannot fit in memory; a warning at far
    more classes than the data has distinct labels."""
    import dataclasses

    from .config import check_model_memory
    from .models import count_parameters, nothing_to_train

    distinct = info.distinct_labels
    if distinct and info.num_classes > FAR_MORE_CLASSES * distinct and (
            info.num_classes - distinct >= MANY_MORE_CLASSES):
        log.warning("--dataset %s: its labels go up to %d, so the model gets %s classes, but only "
                    "%d distinct labels occur; labels are class indices (0, 1, 2, ...): renumber "
                    "them", config.dataset, info.num_classes - 1, f"{info.num_classes:,}", distinct)
    counted = count_parameters(config.model, dataclasses.replace(info, image_size=image_size))
    if counted is None:  # not buildable on the meta device: the evaluator's build checks it
        return
    values, trained = counted
    if trained == 0:
        raise ConfigError(nothing_to_train(config.model))
    check_model_memory(config, values, _shared_copies(config))


def _shared_copies(config: TrainConfig) -> float:
    """Copies of the model in the algorithm's shared state (a center, a slot per worker...),
    from a small stand-in of it."""
    size = 4096
    shared = config.algorithm.shared_state(config, torch.zeros(size), size)
    try:
        return shared.numel() / size
    finally:
        shared.close()


def expect_config(config: Any) -> TrainConfig:
    """``config`` itself when it is a TrainConfig; else a TypeError that says so."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be an easgd_local.TrainConfig (such as TrainConfig(algo="
                        f"'easgd', workers=4)), not {type(config).__name__}")
    return config



def train(config: TrainConfig, reporter: Reporter | None = None,
          resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one training job described by ``config``; returns the summary (also in summary.json).

    ``resume``: a loaded checkpoint (checkpoint.Checkpointer.load) of the run in config.out;
    the workers, the shared state, the step counters and the time axis continue from it.
    """
    expect_config(config)
    t_start = time.perf_counter()
    config, resume, box = join_boxes(config, resume)
    try:
        # A box started again by torchrun reuses its directory, checkpoint or not.
        out, image_size, lock = prepare(config, resuming=resume is not None or box.restarted)
        with lock:
            run = Run(config, out, image_size, reporter or SilentReporter(), resume, t_start, box)
            return run.execute()
    finally:
        box.close()


class Run:
    """One training run in the main process, from spawning the workers to the summary.

    The life of a run: ``execute`` spawns every worker, measures what an evaluation costs
    while they start, waits until all are ready, sets GO, then ``supervise`` handles their
    messages and deaths, takes snapshots and checkpoints and watches the time limit until every
    worker is done; ``finish`` writes the results. Whatever happens, ``shutdown`` stops, joins
    (or kills) every worker and releases the shared state. Each of these jobs is done by a room
    (the module's docstring); the run only composes them.
    """

    def __init__(self, config: TrainConfig, out: RunDir, image_size: int, reporter: Reporter,
                 resume: dict[str, Any] | None, t_start: float, box: BoxLevel | None = None):
        self.config, self.out, self.image_size, self.reporter = config, out, image_size, reporter
        self.resume, self.t_start = resume, t_start
        self.box = box if box is not None else OneBox()
        self.eval_device = next((d for d in config.worker_devices if d.startswith("cuda")), "cpu")
        torch.manual_seed(config.seed)  # the initial weights every worker starts from
        self.evaluator = Evaluator(config, image_size, self.eval_device)
        # A model that rejects the data's inputs, or has fewer outputs than the data has
        # classes, is refused now, in one line, not by every worker after start-up.
        self.evaluator.trial()
        init = self.evaluator.state.flat.detach().cpu()
        algorithm = config.algorithm
        shared = algorithm.shared_state(config, init, self.evaluator.state.n_params)
        if resume is not None:
            load_resume(config, shared, resume)
        self.ch = WorkerChannels.create(config, shared, mp.get_context("spawn"),
                                        algorithm.synchronous, resume)
        checkpointer = Checkpointer(self.box.checkpoint_dir(Path(config.out)))
        where = checkpointer.dir
        states = dict(resume["workers"]) if resume is not None else {}
        restarts = int(resume["restarts"]) if resume is not None else 0
        self.crew = Supervisor(config, self.ch, image_size, states, restarts, where)
        self.checkpoints = Checkpoints(config, self.ch, self.crew, self.box, checkpointer)
        self.watchdog = Watchdog(config, self.ch, where)
        self.records = Records(config, self.ch, out, self.evaluator, image_size, reporter,
                               self.box, where)
        self.t0 = 0.0  # perf_counter at which the (continued) time axis is 0

    def execute(self) -> dict[str, Any]:
        config, crew = self.config, self.crew
        # The main process only evaluates; on a CPU machine it shares the cores with the workers.
        threads = torch.get_num_threads()
        if self.eval_device == "cpu":
            torch.set_num_threads(1)
        set_lock_timeout(LOCK_TIMEOUT_SECONDS)
        crew.interrupts.catch()
        try:
            self.box.start(self.ch, self.resume, self.checkpoints.dir)
            for rank in range(config.workers):
                crew.spawn(rank, 0, crew.states.get(rank))
            scheduler = self.records.start_evaluations(self.eval_device)
            crew.interrupts.cancel = scheduler.cancel
            # What one evaluation costs here sets their spacing; measured while workers start.
            scheduler.measure(self.records.reported())
            train_size = crew.await_ready()
            startup = time.perf_counter() - self.t_start
            budget = steps_budget(config, train_size)
            self.reporter.started(config, None if budget is None
                                  else budget * config.batch_size * config.workers)
            # The time axis continues across a resume.
            elapsed = float(self.resume["elapsed"]) if self.resume is not None else 0.0
            self.t0 = time.perf_counter() - elapsed
            crew.go()
            try:
                train_seconds = self.supervise()
            except KeyboardInterrupt:
                self.interrupted()
                raise
            return self.finish(startup, train_seconds)
        except TrainError:
            crew.stop()
            if self.t0:  # a run that never started training has nothing new to keep
                self.checkpoints.save(time.perf_counter() - self.t0)
            raise
        finally:
            self.shutdown()
            crew.interrupts.restore()
            set_lock_timeout(None)
            torch.set_num_threads(threads)
            self.reporter.finished()

    def supervise(self) -> float:
        """Until every worker is done: messages, deaths, snapshots, checkpoints, the time limit;
        then the rounds between boxes until every box is done. Returns the training time."""
        config, ch, crew, scheduler = self.config, self.ch, self.crew, self.records.scheduler
        now = time.perf_counter()
        scheduler.start(now)
        next_checkpoint = now + config.checkpoint_every if config.checkpoint_every else math.inf
        while not crew.all_done:
            crew.receive(POLL_SECONDS)
            now = time.perf_counter()
            elapsed = now - self.t0
            if config.time_limit is not None and elapsed >= config.time_limit:
                ch.control[STOP] = 1
            self.watchdog.watch(now, crew.workers)
            self.records.check_divergences()
            if not crew.all_done:
                self.box.round(done=False)
                try:
                    scheduler.tick(now, lambda: self.records.snapshot(elapsed))
                except LockTimeout as e:
                    log.warning("snapshot skipped: %s", e)
            if now >= next_checkpoint:
                unanswered = self.checkpoints.now(elapsed)
                next_checkpoint = time.perf_counter() + config.checkpoint_every
                self.watchdog.forget_pauses(but=unanswered)  # the others paused for it
            self.reporter.progress(int(ch.steps.sum()) * config.batch_size, elapsed,
                                   self.records.last_accuracy)
        train_seconds = time.perf_counter() - self.t0
        while not self.box.all_done:  # done here: join the rounds until every box is done
            crew.check_interrupt()
            self.box.round(done=True)
        return train_seconds

    def finish(self, startup: float, train_seconds: float) -> dict[str, Any]:
        """After training: the model first (nothing after it can cost the trained model), the
        checkpoint, then the evaluations still due and the final one, on the whole test set.

        An interrupt now stops the evaluation and leaves (exit 130), the model and checkpoint
        saved. A failed evaluation, and a diverged model at chance (check_chance), end the run
        after the summary with one line (exit 1), the model and checkpoint saved."""
        ch, crew, records = self.ch, self.crew, self.records
        ended, counters = time.perf_counter(), ch.counters.sum(0).tolist()
        samples = int(ch.steps.sum()) * self.config.batch_size
        every_box = self.box.totals(samples, counters, train_seconds)
        snapshot, final = records.snapshot(train_seconds)
        records.save_center(snapshot)
        self.checkpoints.save(train_seconds)
        eval_error = records.final_evaluation(snapshot, final, interrupted=crew.interrupts.seen > 0)
        summary = {**every_box, **records.summary(
            startup, train_seconds, ended, samples, counters, final, eval_error,
            crew.total_restarts, crew.restart_seconds)}
        records.write_summary(summary)
        records.check_chance(summary)
        if eval_error:
            raise TrainError(f"evaluation failed ({eval_error}); the trained model is saved in "
                             f"{self.out.path / 'center.pt'}")
        return summary

    def interrupted(self) -> None:
        """SIGINT/SIGTERM: stop the workers, keep a final checkpoint. A second SIGINT kills at
        once."""
        self.crew.stop()
        self.checkpoints.save(time.perf_counter() - self.t0)
        log.info("interrupted: checkpoint written to %s", self.checkpoints.current)

    def shutdown(self) -> None:
        """Stop, join, and if need be kill every worker; stop the evaluator; release the shared
        state."""
        self.crew.shutdown()
        self.records.close()
        self.ch.shared.close()
        if self.ch.barrier is not None:
            self.ch.barrier.close()
