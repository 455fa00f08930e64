"""Spawn the workers, supervise them, evaluate the reported model over wall-clock time, shut down.

The main process owns every resource: the algorithm's shared state, the channels, the
processes. It never leaves without stopping and joining (or, past a grace period, killing)
every worker, whatever ended the run: completion, a worker's error, an interrupt. A worker that
dies (a crash, kill -9) is replaced by a fresh one that starts from the shared state, up to
--max-restarts times; its rank's step count and communication totals carry on.

Nothing here depends on the algorithm: what differs is asked of its registry object
(algorithms/base.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from multiprocessing.connection import wait as wait_for_messages
from typing import Any, Iterator, Protocol

import torch
import torch.multiprocessing as mp

from .checkpoint import REFUSED, Checkpointer, CheckpointError, check_layout, made_by
from .config import ConfigError, TrainConfig
from .control import (BYTES, CHECKPOINT, DIVERGENCES, EXCHANGE_SECONDS, EXCHANGES, GO, RESUME,
                      STOP, Done, Event, Failed, Ready, State, WorkerChannels, steps_budget)
from .evaluate import EXTRA, EvalScheduler, Evaluator, compute_units, evaluate_record
from .output import RunDir, RunLock, default_out
from .shared import LockTimeout, set_lock_timeout
from .evaluate import Cancelled
from .worker import INTERRUPTS, run_worker

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1  # how often the main process looks at its workers
JOIN_GRACE_SECONDS = 5.0  # after stop: time a worker gets to exit before it is killed
START_TIMEOUT_SECONDS = 600.0  # spawn + imports + data loading of the slowest worker
STATE_TIMEOUT_SECONDS = 10.0  # how long a checkpoint waits for the workers' states
LOCK_TIMEOUT_SECONDS = 2.0  # the main process never waits longer for a lock of shared state
# A worker that makes no step for this long is declared dead (killed, replaced): at least
# STALL_FLOOR seconds, and STALL_FACTOR times the longest pause between steps seen so far.
STALL_FLOOR_SECONDS = 20.0
STALL_FACTOR = 20.0
# After STOP, workers get this long (or 3 of the longest pauses seen) to finish their step.
STOP_GRACE_SECONDS = 5.0
# A run whose workers keep diverging has failed (exit 1, the last finite center kept): more
# than DIVERGENCES_PER_WORKER divergences per worker since it started (or was resumed), which
# are also at least DIVERGENT_SHARE of its exchanges (a long run may diverge now and then).
DIVERGENCES_PER_WORKER = 3
DIVERGENT_SHARE = 0.1
# A classifier that diverged and ends at most this far above 1/classes is no better than chance.
CHANCE_MARGIN = 0.05


class TrainError(RuntimeError):
    """The run could not finish; ``str(error)`` is one line."""


class Reporter(Protocol):
    def started(self, config: TrainConfig, total_samples: int | None) -> None: ...
    def progress(self, samples: int, elapsed: float, accuracy: float | None) -> None: ...
    def evaluated(self, record: dict[str, Any]) -> None: ...
    def finished(self) -> None: ...


class SilentReporter:
    def started(self, config: TrainConfig, total_samples: int | None) -> None: pass
    def progress(self, samples: int, elapsed: float, accuracy: float | None) -> None: pass
    def evaluated(self, record: dict[str, Any]) -> None: pass
    def finished(self) -> None: pass


def prepare(config: TrainConfig, resuming: bool = False) -> tuple[RunDir, int, RunLock]:
    """Everything that can fail on bad input, before any process starts: values, data, --out.

    Returns the run directory (created, locked for this run, config.json written), the model's
    input size and the lock (release it when the run ends). Raises ConfigError, data.DataError
    or output.OutputError with a one-line message.
    """
    from .data import prepare_dataset
    from .models import MODELS, model_input_size

    config.validate()
    for note in config.algorithm.notes(config):
        log.warning("%s", note)
    if config.model not in MODELS and ":" not in config.model:
        raise ConfigError(f"unknown --model {config.model!r}; choose one of {', '.join(MODELS)}, "
                          "torchvision:NAME or module:factory")
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
    box = None
    if config.multi_node:
        config, resume, box = _join_boxes(config, resume)
    try:
        # A box started again by torchrun reuses its directory, checkpoint or not.
        again = box is not None and box.restarted
        out, image_size, lock = prepare(config, resuming=resume is not None or again)
        with lock:
            run = Run(config, out, image_size, reporter or SilentReporter(), resume, t_start, box)
            return run.execute()
    finally:
        if box is not None:
            box.close()


NEVER = 1e9  # seconds: an --eval-every that never comes during a run


def _join_boxes(config: TrainConfig, resume: dict[str, Any] | None) -> tuple[TrainConfig, Any, Any]:
    """--multi-node: join the other boxes (one line and exit 2 if they run another job), take
    this box's global ranks and directory, and its own last checkpoint after a restart."""
    import dataclasses

    from .checkpoint import Checkpointer, CheckpointError
    from .multinode import BoxLink, box_dir

    config = dataclasses.replace(config, options=dict(config.options))
    config.validate()
    if config.out is None:
        config.out = Path("runs") / f"multinode-{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}"
    box = BoxLink.start(config)
    root = Path(config.out)
    config.rank_offset = box.rank * config.workers
    # Box 0 writes the job's results (the mean's metrics, center.pt, summary.json) at the top;
    # every box keeps its own state (checkpoints, its configuration) under box-k/.
    config.out = root if box.rank == 0 else box_dir(root, box.rank)
    if box.rank > 0:  # box 0 evaluates the job's model during training; the others train
        config.eval_every = NEVER
    if resume is None and box.restarted:  # torchrun started the job again: go on from here
        try:
            resume = Checkpointer(_checkpoint_dir(config, box)).load()
            log.warning("box %d resumes from its last checkpoint", box.rank)
        except CheckpointError:
            log.warning("box %d has no checkpoint yet; it starts from the beginning", box.rank)
    return config, resume, box


def _checkpoint_dir(config: TrainConfig, box: Any) -> Path:
    from .multinode import box_dir

    root = Path(config.out)
    return box_dir(root, 0) if box is not None and box.rank == 0 else root


@dataclass
class _Worker:
    """The main process's view of one worker process."""

    rank: int
    proc: Any
    conn: Any  # read end of this worker's pipe
    incarnation: int = 0
    resume: bytes | None = None  # the saved state it was started from
    ready: bool = False
    done: bool = False
    restart_started: float | None = None


class Run:
    """One training run in the main process, from spawning the workers to the summary.

    The life of a run: ``execute`` spawns every worker, measures what an evaluation costs
    while they start, waits until all are ready, sets GO, then ``supervise`` handles their
    messages and deaths, takes snapshots and checkpoints and watches the time limit until every
    worker is done; ``finish`` writes the results. Whatever happens, ``shutdown`` stops, joins
    (or kills) every worker and releases the shared state.
    """

    def __init__(self, config: TrainConfig, out: RunDir, image_size: int, reporter: Reporter,
                 resume: dict[str, Any] | None, t_start: float, box: Any = None):
        self.config, self.out, self.image_size, self.reporter = config, out, image_size, reporter
        self.resume, self.t_start = resume, t_start
        self.box = box  # multinode.BoxLink: this box's side of the rounds between boxes
        self.algorithm = config.algorithm
        self.ctx = mp.get_context("spawn")
        self.eval_device = next((d for d in config.worker_devices if d.startswith("cuda")), "cpu")
        torch.manual_seed(config.seed)  # the initial weights every worker starts from
        self.evaluator = Evaluator(config, image_size, self.eval_device)
        # A model that rejects the data's inputs, or has fewer outputs than the data has
        # classes, is refused now, in one line, not by every worker after start-up.
        self.evaluator.trial()
        init = self.evaluator.state.flat.detach().cpu()
        shared = self.algorithm.shared_state(config, init, self.evaluator.state.n_params)
        if resume is not None:
            self.load_resume(shared, resume)
        self.ch = WorkerChannels.create(config, shared, self.ctx, self.algorithm.synchronous, resume)
        self.checkpointer = Checkpointer(_checkpoint_dir(config, box))
        self.workers: list[_Worker] = []
        self.t0 = 0.0  # perf_counter at which the (continued) time axis is 0
        self.states: dict[int, bytes] = dict(resume["workers"]) if resume is not None else {}
        self.state_seq: dict[int, int] = {}  # the checkpoint each state answered
        self.checkpoint_seq = 0
        # A resumed run gets a fresh --max-restarts budget; the summary counts them all.
        self.restarts_before = int(resume["restarts"]) if resume is not None else 0
        self.restarts = 0
        # Divergences and exchanges are judged from this start on (a resumed run too).
        self.counted_before = self.ch.counters.sum(0).clone()
        self.restart_seconds: list[float] = []
        self.last_accuracy: float | None = None
        self.last_record: dict[str, Any] = {}
        self.scheduler: EvalScheduler | None = None
        self.train_size = 0  # reported by the workers when ready
        self.signals = 0  # SIGINT/SIGTERM seen; the first is acted on between messages
        self.stopping = False
        # Progress of each worker: (process, steps, when they last changed); the longest pause
        # between steps seen while workers were healthy.
        self.progress: dict[int, tuple[Any, int, float]] = {}
        self.longest_pause = 0.0
        self.stop_seen: float | None = None  # when STOP was first seen by the supervisor
        self.metrics_lost = False

    # -- the whole run ---------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        config = self.config
        # The main process only evaluates; on a CPU machine it shares the cores with the workers.
        threads = torch.get_num_threads()
        if self.eval_device == "cpu":
            torch.set_num_threads(1)
        set_lock_timeout(LOCK_TIMEOUT_SECONDS)
        handlers = self._catch_signals()
        try:
            if self.box is not None:
                self.start_root()
            for rank in range(config.workers):
                self.spawn(rank, 0, self.states.get(rank))
            self.scheduler = EvalScheduler(
                self.evaluator, self.record, deferred=config.eval_deferred,
                every=config.eval_every, budget=config.eval_budget,
                units=compute_units(config, self.eval_device),
                spool_dir=self.out.path / ".snapshots")
            # What one evaluation costs here sets their spacing; measured while workers start.
            self.scheduler.measure(self.reported())
            train_size = self.await_ready()
            startup = time.perf_counter() - self.t_start
            budget = steps_budget(config, train_size)
            self.reporter.started(config, None if budget is None
                                  else budget * config.batch_size * config.workers)
            # The time axis continues across a resume.
            elapsed = float(self.resume["elapsed"]) if self.resume is not None else 0.0
            self.t0 = time.perf_counter() - elapsed
            self.ch.control[GO] = 1
            try:
                train_seconds = self.supervise()
            except KeyboardInterrupt:
                self.interrupted()
                raise
            return self.finish(startup, train_seconds)
        except TrainError:
            self.stop_workers()
            if self.t0:  # a run that never started training has nothing new to keep
                self.save_checkpoint(time.perf_counter() - self.t0)
            raise
        finally:
            self.shutdown()
            self._restore_signals(handlers)
            set_lock_timeout(None)
            torch.set_num_threads(threads)
            self.reporter.finished()

    def load_resume(self, shared: Any, resume: dict[str, Any]) -> None:
        """The saved shared state into ``shared``; CheckpointError (one line, nothing started)
        when it is not of this configuration: entries this one lacks or of other sizes, another
        number of workers, an entry this one needs missing."""
        where = self.config.out
        try:
            check_layout(resume, {name: shared[name].numel for name in shared},
                         self.config.workers, where)
            self.algorithm.load_state_dict(shared, resume["algorithm"])
        except KeyError as e:  # an entry that this configuration needs and the checkpoint lacks
            shared.close()
            missing = " ".join(str(e.args[0] if e.args else e).split())
            raise CheckpointError(f"--resume {where}: its checkpoint does not match its "
                                  f"config.json ({missing}); {REFUSED}") from None
        except BaseException:
            shared.close()
            raise

    def reported(self) -> torch.Tensor:
        """A copy of the model the algorithm reports, now (with several boxes: the root, as the
        last round left it)."""
        if self.box is not None and self.box.root is not None:
            return self.box.root.clone()
        return self.algorithm.reported(self.ch.shared, self.config)

    def start_root(self) -> None:
        """Several boxes: every box takes box 0's root (multinode.py); no answer ends the run."""
        center = self.ch.shared[self.algorithm.box_center].snapshot()
        saved = self.resume.get("box") if self.resume is not None else None
        try:
            self.box.start_root(center, saved)
        except Exception as e:  # a box that never came: gloo's error, or the timeout
            raise TrainError(f"box {self.box.rank}: the boxes could not agree on the root "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None

    def box_round(self, done: bool) -> None:
        """A round between boxes when one is due (multinode.py); its failure ends the run."""
        if self.box.orphaned():
            raise TrainError(f"box {self.box.rank}: torchrun's agent that started this box is "
                             f"gone; checkpoint in {self.checkpointer.dir}")
        exchanges = float(self.ch.counters[:, EXCHANGES].sum())
        if not self.box.due(exchanges, done):
            return
        try:
            self.box.round(self.ch.shared[self.algorithm.box_center], exchanges, done)
        except LockTimeout:
            raise
        except Exception as e:  # a box died: gloo's error, or the timeout
            raise TrainError(f"box {self.box.rank}: the exchange between boxes failed "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); another "
                             f"box is gone; checkpoint in {self.checkpointer.dir}") from None

    # -- signals ---------------------------------------------------------------------------

    def _catch_signals(self) -> dict[int, Any]:
        """While workers run, SIGINT and SIGTERM only raise a flag that the main loop acts on
        between messages: an exception in the middle of reading a worker's message would leave
        its pipe half-read. A second SIGINT kills every worker and leaves at once."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum: int, frame: Any) -> None:
            self.signals += 1
            if self.scheduler is not None:
                self.scheduler.cancel.set()  # an evaluation under way stops at its next batch
            if self.signals > 1 and signum == signal.SIGINT:
                self._kill_now()

        return {sig: signal.signal(sig, on_signal) for sig in INTERRUPTS}

    @staticmethod
    def _restore_signals(handlers: dict[int, Any]) -> None:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    def _check_interrupt(self) -> None:
        if self.signals and not self.stopping:
            raise KeyboardInterrupt

    def _kill_now(self) -> None:
        for w in self.workers:
            if w.proc.is_alive():
                w.proc.kill()
        raise KeyboardInterrupt

    # -- workers -----------------------------------------------------------------------------

    def spawn(self, rank: int, incarnation: int, resume: bytes | None) -> _Worker:
        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=run_worker, name=f"easgd-worker-{rank}",
                                args=(rank, self.config, self.ch, writer, os.getpid(),
                                      self.image_size, incarnation, resume))
        with interrupts_blocked():
            proc.start()
        # Only the worker may hold the write end: when it dies, the read end sees EOF at once.
        writer.close()
        worker = _Worker(rank, proc, reader, incarnation, resume)
        if rank < len(self.workers):
            self.workers[rank] = worker
        else:
            self.workers.append(worker)
        return worker

    def receive(self, timeout: float) -> None:
        """Handle every message that arrives within ``timeout``; a closed pipe is a dead worker."""
        self._check_interrupt()
        live = {w.conn: w for w in self.workers if not w.done}
        for conn in wait_for_messages(list(live), timeout=timeout):
            worker = live[conn]
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                self.on_death(worker)
                continue
            self.handle(worker, msg)

    def handle(self, worker: _Worker, msg: Any) -> None:
        if isinstance(msg, Ready):
            worker.ready = True
            self.train_size = msg.train_size
            if worker.restart_started is not None:
                took = time.perf_counter() - worker.restart_started
                self.restart_seconds.append(round(took, 3))
                log.warning("worker %d restarted in %.1f s", msg.rank, took)
                worker.restart_started = None
        elif isinstance(msg, Event):
            log.warning("%s", msg.text)
        elif isinstance(msg, State):
            self.states[msg.rank] = msg.state
            self.state_seq[msg.rank] = msg.seq
        elif isinstance(msg, Done):
            self.states[msg.rank] = msg.state
            worker.done = True
        elif isinstance(msg, Failed):
            worker.done = True
            log.debug("worker %d traceback:\n%s", msg.rank, msg.traceback)
            raise TrainError(f"worker {msg.rank} failed: {msg.error}")

    def on_death(self, worker: _Worker) -> None:
        """A worker's pipe closed without Done: it died. Replace it, or end the run."""
        worker.proc.join(timeout=1.0)
        if worker.proc.is_alive():  # its pipe broke some other way: it cannot report any more
            worker.proc.kill()
            worker.proc.join()
        code = worker.proc.exitcode
        worker.conn.close()
        worker.done = True  # this process is over, whatever happens to its rank
        rank, config = worker.rank, self.config
        if self.ch.control[STOP]:
            return  # died while the run was ending anyway: nothing to replace
        # A worker that dies while starting (kill -9 during its imports) is replaced like any
        # other; one that never trained keeps the state it was to resume from.
        when = "" if worker.ready else " while starting"
        if self.algorithm.synchronous:
            raise TrainError(f"worker {rank} died{when} (exit code {code}); {config.algo} moves "
                             "all workers together and cannot go on without it")
        if self.restarts >= config.max_restarts:
            kept = (f"checkpoint in {self.checkpointer.dir}" if self.t0 else
                    "the run never started")
            raise TrainError(f"worker {rank} died{when} (exit code {code}) and --max-restarts "
                             f"{config.max_restarts} restart(s) are used up; {kept}")
        self.restarts += 1
        if worker.ready:  # it restarts from shared state: a checkpoint before it answers says so
            self.states.pop(rank, None)
        log.warning("worker %d died%s (exit code %s); restarting it from shared state (%d of %d)",
                    rank, when, code, self.restarts, config.max_restarts)
        new = self.spawn(rank, worker.incarnation + 1, None if worker.ready else worker.resume)
        new.restart_started = time.perf_counter()

    def await_ready(self) -> int:
        """Wait for every worker's Ready; returns the training-set size."""
        deadline = time.perf_counter() + START_TIMEOUT_SECONDS
        while not all(w.ready for w in self.workers):
            self.receive(POLL_SECONDS)
            if time.perf_counter() > deadline:
                raise TrainError(f"workers not ready after {START_TIMEOUT_SECONDS:.0f} s")
        return self.train_size

    def supervise(self) -> float:
        """Until every worker is done: messages, deaths, snapshots, checkpoints, the time limit."""
        config, ch = self.config, self.ch
        now = time.perf_counter()
        self.scheduler.start(now)
        next_checkpoint = now + config.checkpoint_every if config.checkpoint_every else math.inf
        while not all(w.done for w in self.workers):
            self.receive(POLL_SECONDS)
            now = time.perf_counter()
            elapsed = now - self.t0
            if config.time_limit is not None and elapsed >= config.time_limit:
                ch.control[STOP] = 1
            self.watch(now)
            self.check_divergences()
            if self.box is not None and not all(w.done for w in self.workers):
                self.box_round(done=False)
            if not all(w.done for w in self.workers):
                try:
                    self.scheduler.tick(now, lambda: self.snapshot(elapsed))
                except LockTimeout as e:
                    log.warning("snapshot skipped: %s", e)
            if now >= next_checkpoint:
                unanswered = self.checkpoint_now(elapsed)
                next_checkpoint = time.perf_counter() + config.checkpoint_every
                self.forget_pauses(but=unanswered)  # the others paused for it: no stall
            self.reporter.progress(int(ch.steps.sum()) * config.batch_size, elapsed,
                                   self.last_accuracy)
        train_seconds = time.perf_counter() - self.t0
        if self.box is not None:  # done here: join the rounds until every box is done
            while not self.box.all_done:
                self._check_interrupt()
                self.box_round(done=True)
        return train_seconds

    # -- stalls ------------------------------------------------------------------------------

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

    def watch(self, now: float) -> None:
        """Workers that make no progress: after STOP, one that does not finish within the
        grace is killed (the run ends with what it has); before, one that makes no step for the
        stall timeout is declared dead (killed, and replaced like any dead worker). Only one is
        killed at a time, the one stuck (``culprit``): others may only be waiting for it."""
        steps = self.ch.steps.tolist()
        stalled = []
        for w in self.workers:
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
            if self.stop_seen is None:
                self.stop_seen = now
            grace = max(STOP_GRACE_SECONDS, 3 * self.longest_pause)
            if now - self.stop_seen > grace:
                for w in self.workers:
                    if not w.done and w.proc.is_alive():
                        log.warning("worker %d did not stop within %.0f s; killing it (its state "
                                    "from the last checkpoint is kept)", w.rank, grace)
                        w.proc.kill()
            return
        timeout = self.stall_timeout()
        if stalled and max(pause for pause, _ in stalled) > timeout:
            pause, w = self.culprit(stalled)
            if pause > timeout:
                log.warning("worker %d made no step for %.0f s (--stall-timeout %.0f s); "
                            "declaring it dead", w.rank, pause, timeout)
                w.proc.kill()
                if self.algorithm.synchronous:  # the others wait for it: the run ends here
                    raise TrainError(f"worker {w.rank} made no step for {pause:.0f} s and was "
                                     f"declared dead; {self.config.algo} moves all workers "
                                     "together and cannot go on without it; checkpoint in "
                                     f"{self.checkpointer.dir}")
                self.forget_pauses()

    def culprit(self, stalled: list[tuple[float, _Worker]]) -> tuple[float, _Worker]:
        """Which of the workers that make no step is stuck, as (its pause, it): one stopped by a
        signal (kill -STOP) first, then one holding a lock of shared state (the others may be
        waiting for it), then one not waiting for the others (in a synchronous algorithm they
        all stop stepping, those at the barrier or in ddp's all-reduce for the one that is not),
        then the one with the fewest steps, then the one stalled longest."""
        holders = self.ch.shared.lock_holders()
        waiting = self.ch.barrier.waiting() if self.ch.barrier is not None else set()
        steps = self.ch.steps.tolist()

        def suspicion(item: tuple[float, _Worker]) -> tuple:
            pause, w = item
            return (_stopped(w.proc.pid), w.proc.pid in holders, w.rank not in waiting,
                    -steps[w.rank], pause)

        return max(stalled, key=suspicion)

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint_now(self, elapsed: float) -> set[int]:
        """A checkpoint of one instant: every worker answers with its state and pauses, the
        shared state is copied once all have answered (no exchange can happen in between), then
        they go on.

        A worker that does not answer within STATE_TIMEOUT_SECONDS keeps its older state in the
        checkpoint, which is then not of one instant; this is logged. Returns those ranks (they
        did not pause for it: their stall clocks go on)."""
        self.checkpoint_seq += 1
        seq = self.checkpoint_seq
        self.ch.control[CHECKPOINT] = seq
        waiting = {w.rank: w for w in self.workers if not w.done and w.ready}
        deadline = time.perf_counter() + STATE_TIMEOUT_SECONDS
        try:
            while waiting and time.perf_counter() < deadline:
                self.receive(POLL_SECONDS)
                # A rank whose process died (and was replaced) no longer owes this checkpoint.
                waiting = {r: w for r, w in waiting.items()
                           if self.workers[r] is w and not w.done and self.state_seq.get(r) != seq}
            if waiting:
                log.warning("checkpoint: worker(s) %s did not answer within %.0f s; their older "
                            "states are kept", sorted(waiting), STATE_TIMEOUT_SECONDS)
            payload = self.checkpoint_payload(elapsed)
        except LockTimeout as e:
            log.warning("checkpoint skipped: %s", e)
            return set(waiting)
        finally:
            self.ch.control[RESUME] = seq  # the copies are taken: the workers go on
        self.write_checkpoint(payload)
        return set(waiting)

    def checkpoint_payload(self, elapsed: float) -> dict[str, Any]:
        state = self.algorithm.state_dict(self.ch.shared)
        payload = {"algorithm": state, "made_by": made_by(self.config, state),
                   "steps": self.ch.steps.clone(), "counters": self.ch.counters.clone(),
                   "losses": self.ch.losses.clone(), "workers": dict(self.states),
                   "elapsed": elapsed, "restarts": self.restarts_before + self.restarts}
        if self.box is not None and self.box.root is not None:
            payload["box"] = self.box.state()  # the root and the rounds between boxes
        return payload

    def save_checkpoint(self, elapsed: float) -> None:
        try:
            payload = self.checkpoint_payload(elapsed)
        except LockTimeout as e:
            log.warning("checkpoint skipped: %s", e)
            return
        self.write_checkpoint(payload)

    def write_checkpoint(self, payload: dict[str, Any]) -> None:
        """Write it; a full disk (or any write error) keeps the previous one and says so."""
        try:
            self.checkpointer.save(payload)
        except OSError as e:
            log.warning("checkpoint not written (%s); the previous one is kept in %s",
                        e.strerror or e, self.checkpointer.dir)

    # -- evaluation --------------------------------------------------------------------------

    def snapshot(self, elapsed: float) -> tuple[torch.Tensor, dict[str, Any]]:
        """The reported model now, with the metric fields known at this moment."""
        snapshot = self.reported()
        extra = self.algorithm.also_reported(self.ch.shared, self.config)
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
            self.ch.control[STOP] = 1

    def append_metrics(self, record: dict[str, Any]) -> None:
        try:
            self.out.append_metrics(record)
        except OSError as e:
            if not self.metrics_lost:
                log.warning("cannot append to metrics.jsonl (%s); records are lost until it "
                            "can be written again", e.strerror or e)
            self.metrics_lost = True

    # -- the end -----------------------------------------------------------------------------

    def finish(self, startup: float, train_seconds: float) -> dict[str, Any]:
        """After training: the model first (nothing after it can cost the trained model), the
        checkpoint, then the evaluations still due and the final one, on the whole test set.

        An interrupt now stops the evaluation and leaves (exit 130), the model and checkpoint
        saved. A failed evaluation, and a diverged model at chance (check_chance), end the run
        after the summary with one line (exit 1), the model and checkpoint saved."""
        config, ch, scheduler = self.config, self.ch, self.scheduler
        ended, counters = time.perf_counter(), ch.counters.sum(0).tolist()
        samples = int(ch.steps.sum()) * config.batch_size
        boxes = self.box_totals(samples, counters, train_seconds) if self.box is not None else {}
        snapshot, final = self.snapshot(train_seconds)
        try:
            self.out.save_state_dict("center.pt", self.evaluator.state_dict(snapshot))
        except OSError as e:
            raise TrainError(f"cannot write {self.out.path / 'center.pt'}: {e.strerror or e}") from None
        self.save_checkpoint(train_seconds)
        eval_error = self.final_evaluation(snapshot, final)
        summary = {**boxes,
            "algo": config.algo, "workers": config.workers, "devices": config.worker_devices,
            "tau": config.tau, "alpha": config.resolved_alpha,
            "momentum": config.resolved_momentum, "options": dict(config.resolved_options),
            "lr": config.lr, "batch_size": config.batch_size, "weight_decay": config.weight_decay,
            "dataset": config.dataset, "model": config.model, "image_size": self.image_size,
            "lock": config.lock,
            "steps_per_worker": ch.steps.tolist(), "total_samples": samples,
            "startup_seconds": round(startup, 3), "train_seconds": round(train_seconds, 3),
            "samples_per_second": samples / train_seconds if train_seconds > 0 else 0.0,
            "exchanges": int(counters[EXCHANGES]), "bytes_exchanged": int(counters[BYTES]),
            "exchange_fraction": counters[EXCHANGE_SECONDS] / (config.workers * train_seconds)
            if train_seconds > 0 else 0.0,
            "worker_restarts": self.restarts_before + self.restarts,
            "restart_seconds": self.restart_seconds,
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
        try:
            self.out.write_json("summary.json", summary)
        except OSError as e:
            raise TrainError(f"cannot write {self.out.path / 'summary.json'}: {e.strerror or e}; "
                             "center.pt is saved") from None
        self.check_chance(summary)
        if eval_error:
            raise TrainError(f"evaluation failed ({eval_error}); the trained model is saved in "
                             f"{self.out.path / 'center.pt'}")
        return summary

    def box_totals(self, samples: int, counters: list[float], train_seconds: float) -> dict[str, Any]:
        """The summary's figures of every box together (one all-reduce, on every box at once,
        before box 0 evaluates)."""
        b = self.box
        all_samples, all_bytes, all_exchanges = b.totals([samples, b.bytes, counters[EXCHANGES]])
        return {"boxes": b.world, "box": b.rank, "total_samples_all_boxes": int(all_samples),
                "samples_per_second_all_boxes": all_samples / train_seconds if train_seconds > 0 else 0.0,
                "exchanges_all_boxes": int(all_exchanges),
                "bytes_between_boxes": int(all_bytes), "root_rounds": b.rounds,
                "bytes_between_boxes_per_sample": all_bytes / all_samples if all_samples else None,
                "root_lock_seconds_max": max(b.lock_seconds, default=0.0),
                "root_lock_seconds_mean": sum(b.lock_seconds) / len(b.lock_seconds) if b.lock_seconds else 0.0,
                "root_round_seconds_mean": sum(b.round_seconds) / len(b.round_seconds) if b.round_seconds else 0.0,
                "alpha_root": b.alpha_root, "box_tau": b.tau,
                "box_beta": self.config.box_beta}

    def final_evaluation(self, snapshot: torch.Tensor, final: dict[str, Any]) -> str | None:
        """The evaluations still due, then the final one on the whole test set; the error of
        one that failed (one line), else None. An interrupt stops it: KeyboardInterrupt."""
        scheduler = self.scheduler
        eval_error = scheduler.failed
        try:
            if self.signals:
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
            eval_error = f"{type(e).__name__}: {' '.join(str(e).split())}"
            log.debug("evaluation failed", exc_info=True)
        return eval_error or scheduler.failed

    def check_divergences(self) -> None:
        """Workers that keep diverging (DIVERGENCES_PER_WORKER, DIVERGENT_SHARE) end the run as
        failed: TrainError, with the last finite center saved (execute adds the checkpoint)."""
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
        where = f"the checkpoint is in {self.checkpointer.dir}"
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

    def stop_workers(self, wait: float = JOIN_GRACE_SECONDS - 1.0) -> None:
        """Tell the workers to stop and collect their final states for a while."""
        self.ch.control[STOP] = 1
        self.ch.control[GO] = 1  # a worker still waiting to start sees STOP right after GO
        if self.ch.barrier is not None:
            self.ch.barrier.abort()  # release workers waiting for a peer that will not come
        self.stopping = True
        deadline = time.perf_counter() + wait
        while not all(w.done for w in self.workers) and time.perf_counter() < deadline:
            try:
                self.receive(POLL_SECONDS)
            except TrainError:
                pass  # errors while stopping (an aborted barrier) change nothing now

    def interrupted(self) -> None:
        """SIGINT/SIGTERM: stop the workers, keep a final checkpoint. A second SIGINT kills at
        once."""
        self.stop_workers()
        self.save_checkpoint(time.perf_counter() - self.t0)
        log.warning("interrupted: checkpoint written to %s", self.checkpointer.current)

    def shutdown(self) -> None:
        """Stop, join, and if need be kill every worker; stop the evaluator; release the shared
        state."""
        self.ch.control[STOP] = 1
        self.ch.control[GO] = 1
        if self.ch.barrier is not None and not all(w.done for w in self.workers):
            self.ch.barrier.abort()
        deadline = time.monotonic() + JOIN_GRACE_SECONDS
        for w in self.workers:
            while w.proc.is_alive() and time.monotonic() < deadline:
                _discard_messages(w)
                w.proc.join(timeout=POLL_SECONDS)
        for w in self.workers:
            if w.proc.is_alive():
                log.warning("worker %s did not stop in %.0f s; killing it", w.proc.name,
                            JOIN_GRACE_SECONDS)
                w.proc.kill()
                w.proc.join()
            w.conn.close()
        if self.scheduler is not None:
            self.scheduler.close()
        self.ch.shared.close()
        if self.ch.barrier is not None:
            self.ch.barrier.close()


@contextlib.contextmanager
def interrupts_blocked() -> Iterator[None]:
    """Ctrl-C reaches the whole process group, also a worker still importing torch, before
    run_worker can ignore it (a KeyboardInterrupt traceback per worker). A worker is started
    with the interrupts blocked, a mask that survives exec, and unblocks them once it ignores
    them; here they only wait (pending) until the start returns, then are handled as ever."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    # multiprocessing starts its resource tracker at the first start, and unblocks SIGINT and
    # SIGTERM after it (SIG_UNBLOCK, whatever was blocked before): start it first.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _stopped(pid: int | None) -> bool:
    """Whether process ``pid`` is stopped (kill -STOP, or a debugger), from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _discard_messages(worker: _Worker) -> None:
    # A worker blocks in send() while its pipe is full: keep reading while joining.
    try:
        while not worker.conn.closed and worker.conn.poll():
            worker.conn.recv()
    except (EOFError, OSError):
        pass
