"""Spawn the workers, supervise them, evaluate the center over wall-clock time, shut down.

The main process owns every resource: the shared center, the channels, the processes. It
never leaves without stopping and joining (or, past a grace period, killing) every worker,
whatever ended the run: completion, a worker's error, an interrupt. A worker that dies (a
crash, kill -9) is replaced by a fresh one that starts from the current center, up to
--max-restarts times; its rank's step count and communication totals carry on.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_messages
from typing import Any, Protocol

import torch
import torch.multiprocessing as mp

from .algorithms import (BYTES, CHECKPOINT, CONTROL_SIZE, DIVERGENCES, EXCHANGE_SECONDS,
                         EXCHANGES, GO, RESUME, STOP, decide_stop)
from .center import SharedCenter
from .checkpoint import Checkpointer
from .config import ConfigError, TrainConfig
from .evaluate import EvalScheduler, Evaluator, compute_units, record_fields
from .output import RunDir, default_out
from .worker import WorkerChannels, run_worker, steps_budget

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1  # how often the main process looks at its workers
JOIN_GRACE_SECONDS = 5.0  # after stop: time a worker gets to exit before it is killed
START_TIMEOUT_SECONDS = 600.0  # spawn + imports + data loading of the slowest worker
STATE_TIMEOUT_SECONDS = 10.0  # how long a checkpoint waits for the workers' states


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


@dataclass
class _Worker:
    rank: int
    proc: Any
    conn: Any  # read end of this worker's pipe
    incarnation: int = 0
    ready: bool = False
    done: bool = False
    restart_started: float | None = None


@dataclass
class _Run:
    config: TrainConfig
    ch: WorkerChannels
    ctx: Any
    image_size: int
    out: RunDir
    evaluator: Evaluator
    reporter: Reporter
    checkpointer: Checkpointer
    workers: list[_Worker] = field(default_factory=list)
    t0: float = 0.0
    states: dict[int, bytes] = field(default_factory=dict)  # latest known state of each rank
    state_seq: dict[int, int] = field(default_factory=dict)  # the checkpoint each state answered
    checkpoint_seq: int = 0
    restarts: int = 0
    restart_seconds: list[float] = field(default_factory=list)
    last_accuracy: float | None = None
    last_record: dict[str, Any] = field(default_factory=dict)
    scheduler: EvalScheduler | None = None
    train_size: int = 0  # reported by the workers when ready
    signals: int = 0  # SIGINT/SIGTERM seen; the first is acted on between messages
    stopping: bool = False


def prepare(config: TrainConfig, resuming: bool = False) -> tuple[RunDir, int]:
    """Everything that can fail on bad input, before any process starts: values, data, --out.

    Returns the run directory (created, config.json written) and the model's input size.
    Raises ConfigError, data.DataError or output.OutputError with a one-line message.
    """
    from .data import prepare_dataset
    from .models import MODELS, model_input_size

    config.validate()
    if config.algo == "mdownpour" and config.tau > 1:
        log.warning("mdownpour is defined by the paper for tau = 1 only; with tau = %d the master "
                    "momentum acts on pushes of %d steps' updates", config.tau, config.tau)
    if config.model not in MODELS:
        raise ConfigError(f"unknown --model {config.model!r}; choose one of {', '.join(MODELS)}")
    info = prepare_dataset(config.dataset, config.data_dir, config.download)
    image_size = model_input_size(config.model, info.image_size)
    if config.out is None:
        config.out = default_out(config.algo, config.workers)
    out = RunDir(config.out)
    if not resuming:
        out.create()
    out.write_json("config.json", config.to_dict())
    return out, image_size


def train(config: TrainConfig, reporter: Reporter | None = None,
          resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one training job described by ``config``; returns the summary (also in summary.json).

    ``resume``: a loaded checkpoint (checkpoint.Checkpointer.load) of the run in config.out;
    the workers, the center, the step counters and the time axis continue from it.
    """
    reporter = reporter or SilentReporter()
    t_start = time.perf_counter()
    out, image_size = prepare(config, resuming=resume is not None)
    ctx = mp.get_context("spawn")

    eval_device = next((d for d in config.worker_devices if d.startswith("cuda")), "cpu")
    # The main process only evaluates; on a CPU machine it shares the cores with the workers.
    threads = torch.get_num_threads()
    if eval_device == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(config.seed)  # the initial weights every worker starts from
    evaluator = Evaluator(config, image_size, eval_device)
    ch = _channels(config, ctx, evaluator.state.flat.detach().cpu(), evaluator.state.n_params, resume)
    run = _Run(config, ch, ctx, image_size, out, evaluator, reporter, Checkpointer(out.path))
    if resume is not None:
        run.restarts = int(resume["restarts"])
        run.states = dict(resume["workers"])
    handlers = _catch_signals(run)
    try:
        for rank in range(config.workers):
            _spawn(run, rank, 0, run.states.get(rank))
        run.scheduler = EvalScheduler(
            evaluator, functools.partial(_record, run), deferred=config.eval_deferred,
            every=config.eval_every, budget=config.eval_budget,
            units=compute_units(config, eval_device), spool_dir=out.path / ".snapshots")
        # What one evaluation costs here sets their spacing; measured while the workers start.
        run.scheduler.measure(ch.center.reported())
        train_size = _await_ready(run)
        startup = time.perf_counter() - t_start
        budget = steps_budget(config, train_size)
        reporter.started(config, None if budget is None else budget * config.batch_size * config.workers)
        # The time axis continues across a resume.
        run.t0 = time.perf_counter() - (float(resume["elapsed"]) if resume is not None else 0.0)
        ch.control[GO] = 1
        try:
            train_seconds = _supervise(run)
        except KeyboardInterrupt:
            _interrupted(run)
            raise
        summary = _finish(run, startup, train_seconds)
    except TrainError:
        _stop_workers(run)
        if run.t0:  # a run that never started training has nothing new to keep
            _save_checkpoint(run, time.perf_counter() - run.t0)
        raise
    finally:
        _shutdown(run)
        _restore_signals(handlers)
        torch.set_num_threads(threads)
        reporter.finished()
    return summary


def _catch_signals(run: _Run) -> dict[int, Any]:
    """While workers run, SIGINT and SIGTERM only raise a flag that the main loop acts on
    between messages: an exception in the middle of reading a worker's message would leave its
    pipe half-read. A second SIGINT kills every worker and leaves at once."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum: int, frame: Any) -> None:
        run.signals += 1
        if run.signals > 1 and signum == signal.SIGINT:
            _kill_now(run)

    return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(handlers: dict[int, Any]) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _check_interrupt(run: _Run) -> None:
    if run.signals and not run.stopping:
        raise KeyboardInterrupt


def _channels(config: TrainConfig, ctx: Any, init: torch.Tensor, n_params: int,
              resume: dict[str, Any] | None) -> WorkerChannels:
    spec = config.spec
    center = SharedCenter(resume["center"] if resume is not None else init, lock=config.lock,
                          average=spec.averaged, n_params=n_params,
                          momentum=config.resolved_momentum if spec.master_momentum else 0.0)
    steps = torch.zeros(config.workers, dtype=torch.int64)
    counters = torch.zeros(config.workers, 4, dtype=torch.float64)
    losses = torch.full((config.workers,), float("nan"), dtype=torch.float64)
    if resume is not None:
        for name in ("velocity", "average"):
            if getattr(center, name) is not None and resume[name] is not None:
                getattr(center, name).copy_(resume[name])
        center.clock.copy_(resume["clock"])
        steps.copy_(resume["steps"])
        counters.copy_(resume["counters"])
        losses.copy_(resume["losses"])
    control = torch.zeros(CONTROL_SIZE, dtype=torch.int64).share_memory_()
    agreed = torch.zeros(2, dtype=torch.int64).share_memory_()
    ch = WorkerChannels(
        center=center, steps=steps.share_memory_(), losses=losses.share_memory_(),
        control=control, counters=counters.share_memory_(), agreed=agreed,
        barrier=(ctx.Barrier(config.workers, action=functools.partial(decide_stop, control, agreed))
                 if spec.synchronous else None))
    if spec.ddp:
        # The process group meets at a file in the run directory (removed at the end).
        ch.rendezvous = str(config.out / ".ddp-rendezvous")
    return ch


def _spawn(run: _Run, rank: int, incarnation: int, resume: bytes | None) -> _Worker:
    reader, writer = run.ctx.Pipe(duplex=False)
    proc = run.ctx.Process(target=run_worker, name=f"easgd-worker-{rank}",
                           args=(rank, run.config, run.ch, writer, os.getpid(), run.image_size,
                                 incarnation, resume))
    proc.start()
    # Only the worker may hold the write end: when it dies, the read end sees EOF at once.
    writer.close()
    worker = _Worker(rank, proc, reader, incarnation)
    if rank < len(run.workers):
        run.workers[rank] = worker
    else:
        run.workers.append(worker)
    return worker


def _receive(run: _Run, timeout: float) -> None:
    """Handle every message that arrives within ``timeout``; a closed pipe is a dead worker."""
    _check_interrupt(run)
    live = {w.conn: w for w in run.workers if not w.done}
    for conn in wait_for_messages(list(live), timeout=timeout):
        worker = live[conn]
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            _on_death(run, worker)
            continue
        _handle(run, worker, msg)


def _handle(run: _Run, worker: _Worker, msg: tuple) -> None:
    kind, rank = msg[0], msg[1]
    if kind == "ready":
        worker.ready = True
        run.train_size = msg[2]
        if worker.restart_started is not None:
            took = time.perf_counter() - worker.restart_started
            run.restart_seconds.append(round(took, 3))
            log.warning("worker %d restarted from the center in %.1f s", rank, took)
            worker.restart_started = None
    elif kind == "event":
        log.warning("%s", msg[2])
    elif kind == "state":
        run.states[rank] = msg[3]
        run.state_seq[rank] = msg[2]
    elif kind == "done":
        run.states[rank] = msg[2]
        worker.done = True
    elif kind == "error":
        worker.done = True
        log.debug("worker %d traceback:\n%s", rank, msg[3])
        raise TrainError(f"worker {rank} failed: {msg[2]}")


def _on_death(run: _Run, worker: _Worker) -> None:
    """A worker's pipe closed without a "done": it died. Replace it, or end the run."""
    worker.proc.join(timeout=1.0)
    if worker.proc.is_alive():  # its pipe broke some other way: it cannot report any more
        worker.proc.kill()
        worker.proc.join()
    code = worker.proc.exitcode
    worker.conn.close()
    worker.done = True  # this process is over, whatever happens to its rank
    rank, config = worker.rank, run.config
    if run.ch.control[STOP]:
        return  # died while the run was ending anyway: nothing to replace
    if not worker.ready and worker.incarnation == 0:
        raise TrainError(f"worker {rank} exited with code {code} while starting")
    if config.spec.synchronous:
        raise TrainError(f"worker {rank} died (exit code {code}); {config.algo} moves all workers "
                         "together and cannot go on without it")
    if run.restarts >= config.max_restarts:
        raise TrainError(f"worker {rank} died (exit code {code}) and --max-restarts "
                         f"{config.max_restarts} restart(s) are used up; checkpoint in "
                         f"{run.checkpointer.dir}")
    run.restarts += 1
    log.warning("worker %d died (exit code %s); restarting it from the center (%d of %d)",
                rank, code, run.restarts, config.max_restarts)
    new = _spawn(run, rank, worker.incarnation + 1, None)
    new.restart_started = time.perf_counter()


def _await_ready(run: _Run) -> int:
    """Wait for every worker's ("ready", rank, train_size); returns the training-set size."""
    deadline = time.perf_counter() + START_TIMEOUT_SECONDS
    while not all(w.ready for w in run.workers):
        _receive(run, POLL_SECONDS)
        if time.perf_counter() > deadline:
            raise TrainError(f"workers not ready after {START_TIMEOUT_SECONDS:.0f} s")
    return run.train_size


def _supervise(run: _Run) -> float:
    """Until every worker is done: messages, deaths, snapshots, checkpoints, the time limit."""
    config, ch = run.config, run.ch
    now = time.perf_counter()
    run.scheduler.start(now)
    next_checkpoint = now + config.checkpoint_every if config.checkpoint_every else math.inf
    while not all(w.done for w in run.workers):
        _receive(run, POLL_SECONDS)
        now = time.perf_counter()
        elapsed = now - run.t0
        if config.time_limit is not None and elapsed >= config.time_limit:
            ch.control[STOP] = 1
        if not all(w.done for w in run.workers):
            run.scheduler.tick(now, functools.partial(_snapshot, run, elapsed))
        if now >= next_checkpoint:
            _checkpoint_now(run, elapsed)
            next_checkpoint = time.perf_counter() + config.checkpoint_every
        run.reporter.progress(int(ch.steps.sum()) * config.batch_size, elapsed, run.last_accuracy)
    return time.perf_counter() - run.t0


def _checkpoint_now(run: _Run, elapsed: float) -> None:
    """A checkpoint of one instant: every worker answers with its state and pauses, the center
    is copied once all have answered (no exchange can happen in between), then they go on.

    A worker that does not answer within STATE_TIMEOUT_SECONDS keeps its older state in the
    checkpoint, which is then not of one instant; this is logged."""
    run.checkpoint_seq += 1
    seq = run.checkpoint_seq
    run.ch.control[CHECKPOINT] = seq
    waiting = {w.rank: w for w in run.workers if not w.done and w.ready}
    deadline = time.perf_counter() + STATE_TIMEOUT_SECONDS
    try:
        while waiting and time.perf_counter() < deadline:
            _receive(run, POLL_SECONDS)
            # A rank whose process died (and was replaced) no longer owes this checkpoint.
            waiting = {r: w for r, w in waiting.items()
                       if run.workers[r] is w and not w.done and run.state_seq.get(r) != seq}
        if waiting:
            log.warning("checkpoint: worker(s) %s did not answer within %.0f s; their older "
                        "states are kept", sorted(waiting), STATE_TIMEOUT_SECONDS)
        payload = _checkpoint_payload(run, elapsed)
    finally:
        run.ch.control[RESUME] = seq  # the copies are taken: the workers go on
    run.checkpointer.save(payload)


def _checkpoint_payload(run: _Run, elapsed: float) -> dict[str, Any]:
    c = run.ch.center
    with c.guard():
        payload = {
            "center": c.data.clone(),
            "velocity": None if c.velocity is None else c.velocity.clone(),
            "average": None if c.average is None else c.average.clone(),
            "clock": c.clock.clone()}
    payload.update({"steps": run.ch.steps.clone(), "counters": run.ch.counters.clone(),
                    "losses": run.ch.losses.clone(), "workers": dict(run.states),
                    "elapsed": elapsed, "restarts": run.restarts})
    return payload


def _save_checkpoint(run: _Run, elapsed: float) -> None:
    run.checkpointer.save(_checkpoint_payload(run, elapsed))


def _snapshot(run: _Run, elapsed: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """The reported model now, with the metric fields known at this moment."""
    snapshot = run.ch.center.reported()
    steps = run.ch.steps.tolist()
    losses = [x for x in run.ch.losses.tolist() if x == x]  # drop NaN: no report yet
    return snapshot, {"seconds": round(elapsed, 3), "samples": sum(steps) * run.config.batch_size,
                      "steps": steps, "train_loss": sum(losses) / len(losses) if losses else None}


def _record(run: _Run, record: dict[str, Any]) -> None:
    """One evaluated snapshot: metrics.jsonl, the progress display, the accuracy target."""
    record = {k: record[k] for k in ("seconds", "samples", "steps", "test_loss", "test_accuracy",
                                     "train_loss", "eval_samples", "eval_subset")}
    run.out.append_metrics(record)
    run.last_record = record
    run.last_accuracy = record["test_accuracy"]
    run.reporter.evaluated(record)
    target = run.config.target_accuracy
    if target is not None and record["test_accuracy"] >= target:
        run.ch.control[STOP] = 1


def _finish(run: _Run, startup: float, train_seconds: float) -> dict[str, Any]:
    """After training: the center first (nothing after it can cost the trained model), the
    checkpoint, then the evaluations still due and the final one, on the whole test set."""
    config, ch = run.config, run.ch
    ended = time.perf_counter()
    snapshot, final = _snapshot(run, train_seconds)
    run.out.save_state_dict("center.pt", run.evaluator.state_dict(snapshot))
    _save_checkpoint(run, train_seconds)
    scheduler = run.scheduler
    scheduler.finish(threads=scheduler.units if run.evaluator.device.type == "cpu" else None)
    _record(run, {**final, **record_fields(run.evaluator.evaluate(snapshot))})
    counters = ch.counters.sum(0).tolist()
    samples = int(ch.steps.sum()) * config.batch_size
    summary = {
        "algo": config.algo, "workers": config.workers, "devices": config.worker_devices,
        "tau": config.tau, "alpha": config.resolved_alpha, "momentum": config.resolved_momentum,
        "lr": config.lr, "batch_size": config.batch_size, "weight_decay": config.weight_decay,
        "dataset": config.dataset, "model": config.model, "lock": config.lock,
        "steps_per_worker": ch.steps.tolist(), "total_samples": samples,
        "startup_seconds": round(startup, 3), "train_seconds": round(train_seconds, 3),
        "samples_per_second": samples / train_seconds if train_seconds > 0 else 0.0,
        "exchanges": int(counters[EXCHANGES]), "bytes_exchanged": int(counters[BYTES]),
        "exchange_fraction": counters[EXCHANGE_SECONDS] / (config.workers * train_seconds)
        if train_seconds > 0 else 0.0,
        "worker_restarts": run.restarts, "restart_seconds": run.restart_seconds,
        "divergences": int(counters[DIVERGENCES]),
        "final_test_accuracy": run.last_record["test_accuracy"],
        "final_test_loss": run.last_record["test_loss"],
        "final_train_loss": final["train_loss"],
        # Evaluation: what it cost while the workers trained, as a share of the run's compute
        # (cores or GPUs), how far apart the snapshots were, and any snapshot not evaluated.
        "eval_deferred": scheduler.deferred, "eval_snapshots": scheduler.taken,
        "eval_interval_s": round(train_seconds / scheduler.taken, 3) if scheduler.taken else None,
        "eval_cpu_seconds": round(scheduler.busy_cost, 3),
        "eval_share": scheduler.busy_cost / (scheduler.units * train_seconds) if train_seconds > 0 else 0.0,
        "snapshots_dropped": scheduler.spool.dropped,
        # From the end of training to this summary: deferred evaluations, the final one, saving.
        "finish_seconds": round(time.perf_counter() - ended, 3),
    }
    run.out.write_json("summary.json", summary)
    return summary


def _stop_workers(run: _Run, wait: float = JOIN_GRACE_SECONDS - 1.0) -> None:
    """Tell the workers to stop and collect their final states for a while."""
    run.ch.control[STOP] = 1
    run.ch.control[GO] = 1  # a worker still waiting to start sees STOP right after GO
    if run.ch.barrier is not None:
        run.ch.barrier.abort()  # release workers waiting for a peer that will not come
    run.stopping = True
    deadline = time.perf_counter() + wait
    while not all(w.done for w in run.workers) and time.perf_counter() < deadline:
        try:
            _receive(run, POLL_SECONDS)
        except TrainError:
            pass  # errors while stopping (an aborted barrier) change nothing now
        except KeyboardInterrupt:
            raise


def _interrupted(run: _Run) -> None:
    """SIGINT/SIGTERM: stop the workers, keep a final checkpoint. A second SIGINT kills at once."""
    _stop_workers(run)
    _save_checkpoint(run, time.perf_counter() - run.t0)
    log.warning("interrupted: checkpoint written to %s", run.checkpointer.current)


def _kill_now(run: _Run) -> None:
    for w in run.workers:
        if w.proc.is_alive():
            w.proc.kill()
    raise KeyboardInterrupt


def _shutdown(run: _Run) -> None:
    """Stop, join, and if need be kill every worker; stop the evaluator thread."""
    run.ch.control[STOP] = 1
    run.ch.control[GO] = 1
    if run.ch.barrier is not None and not all(w.done for w in run.workers):
        run.ch.barrier.abort()
    deadline = time.monotonic() + JOIN_GRACE_SECONDS
    for w in run.workers:
        while w.proc.is_alive() and time.monotonic() < deadline:
            _discard_messages(w)
            w.proc.join(timeout=POLL_SECONDS)
    for w in run.workers:
        if w.proc.is_alive():
            log.warning("worker %s did not stop in %.0f s; killing it", w.proc.name, JOIN_GRACE_SECONDS)
            w.proc.kill()
            w.proc.join()
        w.conn.close()
    if run.scheduler is not None:
        run.scheduler.close()
    if run.ch.rendezvous:
        for path in (run.ch.rendezvous,):
            if os.path.exists(path):
                os.unlink(path)
    run.ch.center.close()


def _discard_messages(worker: _Worker) -> None:
    # A worker blocks in send() while its pipe is full: keep reading while joining.
    try:
        while not worker.conn.closed and worker.conn.poll():
            worker.conn.recv()
    except (EOFError, OSError):
        pass
