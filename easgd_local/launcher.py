"""Spawn the workers, supervise them, evaluate the center over wall-clock time, shut down.

The main process owns every resource: the shared center, the channels, the processes. It
never leaves without stopping and joining (or, past a grace period, killing) every worker,
whatever ended the run: normal completion, a worker's error, or an interrupt.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import queue
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.multiprocessing as mp

from .algorithms import decide_stop
from .center import SharedCenter
from .config import ConfigError, TrainConfig
from .evaluate import BackgroundEvaluator, Evaluator
from .flat import flatten_
from .output import RunDir, default_out
from .worker import WorkerChannels, run_worker, steps_budget

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1  # how often the main process looks at its workers
JOIN_GRACE_SECONDS = 5.0  # after stop: time a worker gets to exit before it is killed
START_TIMEOUT_SECONDS = 600.0  # spawn + imports + data loading of the slowest worker


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
class _Run:
    config: TrainConfig
    ch: WorkerChannels
    procs: list[Any]
    out: RunDir
    evaluator: Evaluator
    reporter: Reporter
    t0: float = 0.0
    results: dict[int, dict] = field(default_factory=dict)
    last_accuracy: float | None = None
    background: BackgroundEvaluator | None = None


def prepare(config: TrainConfig) -> tuple[RunDir, int]:
    """Everything that can fail on bad input, before any process starts: values, data, --out.

    Returns the run directory (created, config.json written) and the model's input size.
    Raises ConfigError, data.DataError or output.OutputError with a one-line message.
    """
    from .data import prepare_dataset
    from .models import MODELS, model_input_size

    config.validate()
    if config.model not in MODELS:
        raise ConfigError(f"unknown --model {config.model!r}; choose one of {', '.join(MODELS)}")
    info = prepare_dataset(config.dataset, config.data_dir, config.download)
    image_size = model_input_size(config.model, info.image_size)
    if config.out is None:
        config.out = default_out(config.algo, config.workers)
    out = RunDir(config.out)
    out.create()
    out.write_json("config.json", config.to_dict())
    return out, image_size


def train(config: TrainConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run one training job described by ``config``; returns the summary (also in summary.json)."""
    reporter = reporter or SilentReporter()
    t_start = time.perf_counter()
    out, image_size = prepare(config)
    ctx = mp.get_context("spawn")

    eval_device = next((d for d in config.worker_devices if d.startswith("cuda")), "cpu")
    # The main process only evaluates; on a CPU machine it shares the cores with the workers.
    threads = torch.get_num_threads()
    if eval_device == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(config.seed)  # the initial weights every worker starts from
    evaluator = Evaluator(config, image_size, eval_device)
    init = evaluator.state.flat.detach().cpu()
    spec = config.spec
    stop = ctx.Event()
    agreed = torch.zeros(1, dtype=torch.int64).share_memory_()
    ch = WorkerChannels(
        center=SharedCenter(init, ctx, lock=config.lock, average=spec.averaged,
                            momentum=config.resolved_momentum if spec.master_momentum else 0.0),
        steps=torch.zeros(config.workers, dtype=torch.int64).share_memory_(),
        losses=torch.full((config.workers,), float("nan"), dtype=torch.float64).share_memory_(),
        messages=ctx.Queue(), go=ctx.Event(), stop=stop, agreed=agreed,
        barrier=(ctx.Barrier(config.workers, action=functools.partial(decide_stop, stop, agreed))
                 if spec.synchronous else None))
    rendezvous_dir = tempfile.mkdtemp(prefix="easgd-ddp-") if spec.ddp else None
    if rendezvous_dir:
        ch.rendezvous = os.path.join(rendezvous_dir, "store")
    run = _Run(config, ch, [], out, evaluator, reporter)
    try:
        for rank in range(config.workers):
            p = ctx.Process(target=run_worker, name=f"easgd-worker-{rank}",
                            args=(rank, config, ch, os.getpid(), image_size))
            p.start()
            run.procs.append(p)
        run.background = BackgroundEvaluator(evaluator, functools.partial(_record, run))
        train_size = _await_ready(run)
        startup = time.perf_counter() - t_start
        budget = steps_budget(config, train_size)
        reporter.started(config, None if budget is None else budget * config.batch_size * config.workers)
        run.t0 = time.perf_counter()
        ch.go.set()
        train_seconds = _supervise(run)
        summary = _finish(run, startup, train_seconds)
    finally:
        _shutdown(run)
        if rendezvous_dir:
            shutil.rmtree(rendezvous_dir, ignore_errors=True)
        torch.set_num_threads(threads)
        reporter.finished()
    return summary


def _handle(run: _Run, msg: tuple) -> None:
    kind, rank = msg[0], msg[1]
    if kind == "error":
        log.debug("worker %d traceback:\n%s", rank, msg[3])
        raise TrainError(f"worker {rank} failed: {msg[2]}")
    if kind == "done":
        run.results[rank] = msg[2]


def _check_alive(run: _Run, expected: set[int]) -> None:
    for rank, p in enumerate(run.procs):
        if rank in expected and p.exitcode is not None:
            # It may have reported just before exiting: read what is queued first.
            _drain(run)
            if rank in expected - set(run.results):
                raise TrainError(f"worker {rank} exited with code {p.exitcode} without reporting")


def _drain(run: _Run) -> None:
    while True:
        try:
            _handle(run, run.ch.messages.get_nowait())
        except queue.Empty:
            return


def _await_ready(run: _Run) -> int:
    """Wait for every worker's ("ready", rank, train_size); returns the training-set size."""
    ready: set[int] = set()
    train_size = 0
    deadline = time.perf_counter() + START_TIMEOUT_SECONDS
    while len(ready) < len(run.procs):
        try:
            msg = run.ch.messages.get(timeout=POLL_SECONDS)
        except queue.Empty:
            _check_alive(run, set(range(len(run.procs))) - ready)
            if time.perf_counter() > deadline:
                raise TrainError(f"workers not ready after {START_TIMEOUT_SECONDS:.0f} s") from None
            continue
        if msg[0] == "ready":
            ready.add(msg[1])
            train_size = msg[2]
        else:
            _handle(run, msg)
    return train_size


def _supervise(run: _Run) -> float:
    """Until every worker is done: progress, snapshots of the center, the time limit, liveness."""
    config, ch = run.config, run.ch
    next_eval = run.t0 + config.eval_every
    while len(run.results) < len(run.procs):
        try:
            _handle(run, ch.messages.get(timeout=POLL_SECONDS))
        except queue.Empty:
            pass
        now = time.perf_counter()
        elapsed = now - run.t0
        if config.time_limit is not None and elapsed >= config.time_limit and not ch.stop.is_set():
            ch.stop.set()
        if now >= next_eval and len(run.results) < len(run.procs):
            run.background.submit(*_snapshot(run, elapsed))
            next_eval += config.eval_every * max(1, math.ceil((now - next_eval) / config.eval_every))
        run.reporter.progress(int(ch.steps.sum()) * config.batch_size, elapsed, run.last_accuracy)
        _check_alive(run, set(range(len(run.procs))) - set(run.results))
    return time.perf_counter() - run.t0


def _snapshot(run: _Run, elapsed: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """The reported model now, with the metric fields known at this moment."""
    snapshot = run.ch.center.reported()
    steps = run.ch.steps.tolist()
    losses = [x for x in run.ch.losses.tolist() if x == x]  # drop NaN: no report yet
    return snapshot, {"seconds": round(elapsed, 3), "samples": sum(steps) * run.config.batch_size,
                      "steps": steps, "train_loss": sum(losses) / len(losses) if losses else None}


def _record(run: _Run, record: dict[str, Any]) -> None:
    """One evaluated snapshot: metrics.jsonl, the progress display, the accuracy target."""
    record = {k: record[k] for k in ("seconds", "samples", "steps", "test_loss", "test_accuracy", "train_loss")}
    run.out.append_metrics(record)
    run.last_accuracy = record["test_accuracy"]
    run.reporter.evaluated(record)
    target = run.config.target_accuracy
    if target is not None and record["test_accuracy"] >= target:
        run.ch.stop.set()


def _finish(run: _Run, startup: float, train_seconds: float) -> dict[str, Any]:
    config = run.config
    run.background.drain()  # snapshots still waiting, now that the workers are done
    snapshot, final = _snapshot(run, train_seconds)
    final["test_loss"], final["test_accuracy"] = run.evaluator.evaluate(snapshot)
    _record(run, final)
    res = [run.results[r] for r in range(len(run.procs))]
    samples = sum(r["samples"] for r in res)
    worker_seconds = sum(r["train_seconds"] for r in res)
    summary = {
        "algo": config.algo, "workers": config.workers, "devices": config.worker_devices,
        "tau": config.tau, "alpha": config.resolved_alpha, "momentum": config.resolved_momentum,
        "lr": config.lr, "batch_size": config.batch_size, "weight_decay": config.weight_decay,
        "dataset": config.dataset, "model": config.model, "lock": config.lock,
        "steps_per_worker": [r["steps"] for r in res], "total_samples": samples,
        "startup_seconds": round(startup, 3), "train_seconds": round(train_seconds, 3),
        "samples_per_second": samples / train_seconds if train_seconds > 0 else 0.0,
        "exchanges": sum(r["exchanges"] for r in res),
        "bytes_exchanged": sum(r["bytes_exchanged"] for r in res),
        "exchange_fraction": (sum(r["exchange_seconds"] for r in res) / worker_seconds
                              if worker_seconds > 0 else 0.0),
        "final_test_accuracy": final["test_accuracy"], "final_test_loss": final["test_loss"],
        "final_train_loss": final["train_loss"],
    }
    run.out.save_state_dict("center.pt", run.evaluator.state_dict(snapshot))
    run.out.write_json("summary.json", summary)
    return summary


def _shutdown(run: _Run) -> None:
    """Stop, join, and if need be kill every worker; release the queue's feeder thread."""
    if run.background is not None and run.background.thread.is_alive():
        run.background.close()
    run.ch.stop.set()
    run.ch.go.set()  # a worker still waiting to start sees stop right after go
    if run.ch.barrier is not None and len(run.results) < len(run.procs):
        run.ch.barrier.abort()  # release workers waiting for a peer that will not come
    deadline = time.monotonic() + JOIN_GRACE_SECONDS
    for p in run.procs:
        while p.is_alive() and time.monotonic() < deadline:
            _drain_quietly(run)
            p.join(timeout=POLL_SECONDS)
    for p in run.procs:
        if p.is_alive():
            log.warning("worker %s did not stop in %.0f s; killing it", p.name, JOIN_GRACE_SECONDS)
            p.kill()
            p.join()
    _drain_quietly(run)
    run.ch.messages.close()
    run.ch.messages.join_thread()


def _drain_quietly(run: _Run) -> None:
    # A worker blocks at exit until what it queued is read: keep reading while joining.
    try:
        while True:
            run.ch.messages.get_nowait()
    except (queue.Empty, OSError, ValueError):
        pass
