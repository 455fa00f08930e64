"""One worker process: its device, its data order, its local steps, an exchange every tau.

Imports stay lean (torch, numpy, this package's data and model code; torchvision only when
a data set or model needs it): every spawned worker pays its own start-up.
"""

from __future__ import annotations

import io
import logging
import math
import os
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import algorithms, rules
from .algorithms import (AGREED_CHECKPOINT, BYTES, CHECKPOINT, DIVERGENCES, EXCHANGE_SECONDS,
                         EXCHANGES, GO, RESUME, STOP)
from .center import CenterLink, Diverged, SharedCenter
from .checkpoint import unpack_state
from .config import TrainConfig, cpu_threads_per_worker
from .flat import check_views, flatten_

log = logging.getLogger(__name__)

PARENT_CHECK_EVERY = 50  # steps between checks that the main process is still alive


FAULT_ENV = "EASGD_LOCAL_FAULT"  # "rank:step:kind" for tests; see _Fault


@dataclass
class WorkerChannels:
    """What the main process shares with every worker (all picklable for spawn)."""

    center: SharedCenter
    steps: torch.Tensor  # int64 [workers]: local steps done, written by each worker
    losses: torch.Tensor  # float64 [workers]: mean training loss since the last report
    control: torch.Tensor  # int64 [4]: GO, STOP, CHECKPOINT (asked for), RESUME (taken)
    counters: torch.Tensor  # float64 [workers, 4]: EXCHANGES, BYTES, EXCHANGE_SECONDS, DIVERGENCES
    barrier: Any = None  # Barrier of the synchronous algorithms (its action fills `agreed`)
    agreed: torch.Tensor | None = None  # int64 [2]: stop and checkpoint, decided at the barrier
    rendezvous: str | None = None  # DDP: path of the file the process group meets at

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
        center and every worker's state are then from one instant (no exchange in between)."""
        while int(self.control[RESUME]) < seq and not self.stopping():
            _check_parent(parent_pid)
            time.sleep(0.001)


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


def run_worker(rank: int, config: TrainConfig, ch: WorkerChannels, conn: Any, parent_pid: int,
               image_size: int, incarnation: int = 0, resume: bytes | None = None) -> None:
    """Entry point of a spawned worker. Reports through ``conn`` (its own pipe to the main
    process) instead of raising. ``incarnation`` > 0: a restart after the previous process of
    this rank died; ``resume``: a saved worker state to continue from."""
    # Ctrl-C reaches the whole process group; the main process alone decides how the run
    # ends and tells the workers through STOP, so a worker never dies mid-exchange.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        state = _train(rank, config, ch, conn, parent_pid, image_size, incarnation, resume)
        conn.send(("done", rank, state))
    except (_ParentGone, BrokenPipeError):
        pass  # the main process is gone: nobody to report to
    except BaseException as e:  # report everything, then exit
        try:
            conn.send(("error", rank, f"{type(e).__name__}: {e}", traceback.format_exc()))
        except OSError:
            pass


class _ParentGone(Exception):
    pass


class _Fault:
    """Fault injection for tests: EASGD_LOCAL_FAULT="rank:step:kind[,...]" makes the first
    process of that rank fail at that local step. Kinds: exit (exit code 3), kill (SIGKILL),
    kill-in-lock (SIGKILL halfway through adding an exchange to the center, lock held),
    nan (the worker's parameters become NaN), hang (stop making progress), and drift:S (from
    that step on, the local step is replaced by adding S to every parameter: a known, data-free
    move, so that sums over workers and center can be checked exactly)."""

    def __init__(self, rank: int, incarnation: int):
        self.at: dict[int, str] = {}
        self.drift: float | None = None  # the local step's replacement, once it applies
        self._drift_from: tuple[int, float] | None = None
        if incarnation:
            return  # a restarted worker runs clean, or a test would crash it forever
        for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
            r, step, kind = item.split(":", 2)
            if int(r) != rank:
                continue
            if kind.startswith("drift:"):
                # From that step on, also in a resumed run (whose steps start later).
                self._drift_from = (int(step), float(kind.split(":", 1)[1]))
            else:
                self.at[int(step)] = kind

    def __call__(self, step: int, y: torch.Tensor, center: SharedCenter) -> None:
        if self._drift_from is not None and step >= self._drift_from[0]:
            self.drift = self._drift_from[1]
        kind = self.at.get(step)
        if kind == "exit":
            os._exit(3)
        elif kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "kill-in-lock":
            center.crash_in_lock = True
        elif kind == "nan":
            y.fill_(float("nan"))
        elif kind == "hang":
            while True:
                time.sleep(1)


def _check_parent(parent_pid: int) -> None:
    # A worker re-parented away from the main process means the main process died.
    if os.getppid() != parent_pid:
        raise _ParentGone()


def _wait_for_go(ch: WorkerChannels, parent_pid: int) -> None:
    while not ch.control[GO]:
        _check_parent(parent_pid)
        time.sleep(0.01)


def _pack(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _train(rank: int, config: TrainConfig, ch: WorkerChannels, conn: Any, parent_pid: int,
           image_size: int, incarnation: int, resume: bytes | None) -> bytes:
    """Train until a stop condition; returns the worker's final state (see snapshot below)."""
    from .data import load_split
    from .models import build_model

    device = torch.device(config.worker_devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cpu_threads_per_worker(config))
    if config.spec.ddp:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"file://{ch.rendezvous}", rank=rank,
                                world_size=config.workers)
    # dropout and other model randomness; a restarted worker draws fresh numbers
    torch.manual_seed(config.seed + rank + 1000 * incarnation)

    data = load_split(config.dataset, config.data_dir, train=True, device=device,
                      image_size=image_size)
    model = build_model(config.model, data.info)
    state = flatten_(model, device)
    model.train()
    link = CenterLink(ch.center, device)
    link.pull(state.flat)  # x^i = x~ at start, and after a restart

    spec = config.spec
    momentum = config.resolved_momentum if spec.local_momentum else 0.0
    v = torch.zeros(state.n_params, device=device) if momentum else None
    comm = _communicator(rank, config, ch, link, state.flat, state.n_params)
    forward = _ddp_wrap(model, device) if spec.ddp else model
    if spec.ddp:
        _time_allreduce(forward, comm)
    budget = steps_budget(config, len(data))
    gen = torch.Generator().manual_seed(config.seed + rank + 1000 * incarnation)  # data order
    step = int(ch.steps[rank])  # a restarted worker continues its rank's count
    if resume is not None:
        step = _restore(unpack_state(resume), state.flat, v, gen, comm)
        ch.steps[rank] = step
    fault = _Fault(rank, incarnation)

    def snapshot() -> bytes:
        return _pack({"flat": state.flat.cpu(), "v": None if v is None else v.cpu(), "step": step,
                      "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                      "comm": comm.state_dict()})

    conn.send(("ready", rank, len(data)))
    _wait_for_go(ch, parent_pid)

    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    checkpoint_seq = ch.checkpoint_asked(spec.synchronous)
    reported = [0.0, 0.0, 0.0]  # this process's exchanges, bytes, seconds already in ch.counters

    def report_totals() -> None:
        # The counters of a rank are cumulative across its restarts: add what is new.
        totals = [comm.exchanges, comm.bytes, comm.seconds]
        for index, now, before in zip((EXCHANGES, BYTES, EXCHANGE_SECONDS), totals, reported):
            ch.counters[rank, index] += now - before
        reported[:] = totals

    running = budget is None or step < budget
    while running:
        epoch_start = step
        for x, y in data.batches(config.batch_size, generator=gen):
            fault(step, state.flat, ch.center)
            state.grad.zero_()
            loss = F.cross_entropy(forward(x), y)
            loss.backward()
            rules.add_weight_decay_(state.grad, state.flat, config.weight_decay)
            try:
                # Communication comes after the gradient: Algorithms 1 and 2 take the gradient
                # at the point before the elastic move, and both moves are then added.
                if not comm.before_step(step, state.flat, v):
                    running = False
                    break
                if fault.drift is None:
                    rules.local_step_(state.flat, state.grad, config.lr, v=v, momentum=momentum)
                else:
                    state.flat[: state.n_params].add_(fault.drift)
                comm.after_step(step, state.flat, v)
            except Diverged as e:
                # Nothing reached the center: start again from it, with fresh momentum.
                link.pull(state.flat)
                if v is not None:
                    v.zero_()
                comm.reset(state.flat)
                ch.counters[rank, DIVERGENCES] += 1
                conn.send(("event", rank, f"worker {rank} diverged at step {step} ({e}); "
                           "its exchange was skipped and it restarts from the center"))
            loss_sum += loss.detach()
            loss_count += 1
            step += 1
            ch.steps[rank] = step
            if step - epoch_start == 1 and not check_views(state):
                raise RuntimeError(f"model {config.model} detached its parameters from the flat buffer")
            if step % config.tau == 0:
                # .item() waits for the device; done once per period, not per step.
                mean = loss_sum.item() / loss_count
                if math.isfinite(mean):
                    ch.losses[rank] = mean
                loss_sum.zero_()
                loss_count = 0
                report_totals()
            if ch.checkpoint_asked(spec.synchronous) != checkpoint_seq:
                checkpoint_seq = ch.checkpoint_asked(spec.synchronous)
                conn.send(("state", rank, checkpoint_seq, snapshot()))
                ch.await_resume(checkpoint_seq, parent_pid)
            if step % PARENT_CHECK_EVERY == 0:
                _check_parent(parent_pid)
            # Synchronous algorithms agree on stopping at their barrier instead.
            if (budget is not None and step >= budget) or (not spec.synchronous and ch.stopping()):
                running = False
                break
        if step == epoch_start and running:
            raise ValueError(f"--batch-size {config.batch_size} exceeds the {len(data)} training samples")
    try:
        comm.finish(state.flat, v)
    except Diverged:
        pass  # the last updates were not finite: they stay out of the center
    report_totals()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if loss_count and math.isfinite(mean := loss_sum.item() / loss_count):
        ch.losses[rank] = mean
    link.close()
    if spec.ddp:
        import torch.distributed as dist

        dist.destroy_process_group()
    return snapshot()


def _restore(saved: dict, flat: torch.Tensor, v: torch.Tensor | None, gen: torch.Generator,
             comm: algorithms.Communicator) -> int:
    """Load a checkpointed worker state; returns its step."""
    flat.copy_(saved["flat"])
    if v is not None and saved["v"] is not None:
        v.copy_(saved["v"])
    gen.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    comm.load_state_dict(saved["comm"], flat)
    return int(saved["step"])


def _communicator(rank: int, config: TrainConfig, ch: WorkerChannels, link: CenterLink,
                  y: torch.Tensor, n_params: int) -> algorithms.Communicator:
    spec = config.spec
    if spec.ddp:
        return algorithms.DDPSync(link, config.tau, rank, ch.barrier, ch.agreed, n_params, config.workers)
    if spec.single_worker:
        return algorithms.Publisher(link, config.tau, config.resolved_momentum)
    if spec.synchronous:
        return algorithms.SyncElastic(link, config.tau, config.resolved_alpha, ch.barrier, ch.agreed)
    if spec.elastic:
        momentum = config.resolved_momentum if spec.local_momentum else 0.0
        return algorithms.Elastic(link, config.tau, config.resolved_alpha, momentum)
    return algorithms.Downpour(link, config.tau, y, spec.average_rate)


def _ddp_wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    # Gradients are copied from DDP's buckets into the existing .grad views, i.e. the flat
    # gradient buffer, so the local step stays one fused op.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   process_group=dist.group.WORLD)


def _time_allreduce(ddp_model: Any, comm: algorithms.Communicator) -> None:
    """Time each bucket's all-reduce from launch to completion (it overlaps the backward pass)."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    # No annotations: DDP checks them against its own classes, and postponed annotations
    # (from __future__) would be strings.
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        start = time.perf_counter()

        def done(fut: Any) -> Any:
            comm.seconds += time.perf_counter() - start
            return fut.value()

        return default_hooks.allreduce_hook(dist.group.WORLD, bucket).then(done)

    ddp_model.register_comm_hook(None, hook)
