"""One worker process: its device, its data order, its local steps, an exchange every tau.

Imports stay lean (torch, numpy, this package's data and model code; torchvision only when
a data set or model needs it): every spawned worker pays its own start-up.
"""

from __future__ import annotations

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
from .center import CenterLink, SharedCenter
from .config import TrainConfig, cpu_threads_per_worker
from .flat import check_views, flatten_

log = logging.getLogger(__name__)

PARENT_CHECK_EVERY = 50  # steps between checks that the main process is still alive


@dataclass
class WorkerChannels:
    """What the main process shares with every worker (all picklable for spawn)."""

    center: SharedCenter
    steps: torch.Tensor  # int64 [workers]: local steps done, written by each worker
    losses: torch.Tensor  # float64 [workers]: mean training loss since the last report
    messages: Any  # Queue: ("ready", rank, train_size) | ("done", rank, stats) | ("error", rank, text)
    go: Any  # Event: set by the main process when every worker is ready
    stop: Any  # Event: set by the main process to end training
    barrier: Any = None  # Barrier of the synchronous algorithms (its action fills `agreed`)
    agreed: torch.Tensor | None = None  # int64 [1]: the stop decision taken at the barrier
    rendezvous: str | None = None  # DDP: path of the file the process group meets at


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


def run_worker(rank: int, config: TrainConfig, ch: WorkerChannels, parent_pid: int,
               image_size: int) -> None:
    """Entry point of a spawned worker. Reports errors to the main process instead of raising."""
    # Ctrl-C reaches the whole process group; the main process alone decides how the run
    # ends and tells the workers through `stop`, so a worker never dies mid-exchange.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stats = _train(rank, config, ch, parent_pid, image_size)
        ch.messages.put(("done", rank, stats))
    except _ParentGone:
        pass
    except BaseException as e:  # report everything, then exit
        ch.messages.put(("error", rank, f"{type(e).__name__}: {e}", traceback.format_exc()))


class _ParentGone(Exception):
    pass


def _check_parent(parent_pid: int) -> None:
    # A worker re-parented away from the main process means the main process died.
    if os.getppid() != parent_pid:
        raise _ParentGone()


def _wait(event: Any, parent_pid: int) -> None:
    while not event.wait(0.5):
        _check_parent(parent_pid)


def _train(rank: int, config: TrainConfig, ch: WorkerChannels, parent_pid: int, image_size: int) -> dict:
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
    torch.manual_seed(config.seed + rank)  # dropout and other model randomness

    data = load_split(config.dataset, config.data_dir, train=True, device=device,
                      image_size=image_size)
    model = build_model(config.model, data.info)
    state = flatten_(model, device)
    model.train()
    link = CenterLink(ch.center, device)
    link.pull(state.flat)  # x^i = x~ at start

    spec = config.spec
    momentum = config.resolved_momentum if spec.local_momentum else 0.0
    v = torch.zeros(state.n_params, device=device) if momentum else None
    comm = _communicator(rank, config, ch, link, state.flat, state.n_params)
    forward = _ddp_wrap(model, device) if spec.ddp else model
    if spec.ddp:
        _time_allreduce(forward, comm)
    budget = steps_budget(config, len(data))
    gen = torch.Generator().manual_seed(config.seed + rank)  # this worker's data order

    ch.messages.put(("ready", rank, len(data)))
    _wait(ch.go, parent_pid)

    step = 0
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    t0 = time.perf_counter()
    running = True
    while running:
        epoch_start = step
        for x, y in data.batches(config.batch_size, generator=gen):
            state.grad.zero_()
            loss = F.cross_entropy(forward(x), y)
            loss.backward()
            rules.add_weight_decay_(state.grad, state.flat, config.weight_decay)
            # Communication comes after the gradient: Algorithms 1 and 2 take the gradient at
            # the point before the elastic move, and both moves are then added.
            if not comm.before_step(step, state.flat, v):
                running = False
                break
            rules.local_step_(state.flat, state.grad, config.lr, v=v, momentum=momentum)
            comm.after_step(step, state.flat, v)
            loss_sum += loss.detach()
            loss_count += 1
            step += 1
            ch.steps[rank] = step
            if step == 1 and not check_views(state):
                raise RuntimeError(f"model {config.model} detached its parameters from the flat buffer")
            if step % config.tau == 0:
                # .item() waits for the device; done once per period, not per step.
                ch.losses[rank] = loss_sum.item() / loss_count
                loss_sum.zero_()
                loss_count = 0
            if step % PARENT_CHECK_EVERY == 0:
                _check_parent(parent_pid)
            # Synchronous algorithms agree on stopping at their barrier instead.
            if (budget is not None and step >= budget) or (not spec.synchronous and ch.stop.is_set()):
                running = False
                break
        if step == epoch_start and running:
            raise ValueError(f"--batch-size {config.batch_size} exceeds the {len(data)} training samples")
    comm.finish(state.flat, v)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_time = time.perf_counter() - t0
    if loss_count:
        ch.losses[rank] = loss_sum.item() / loss_count
    link.close()
    if spec.ddp:
        import torch.distributed as dist

        dist.destroy_process_group()
    return {"steps": step, "samples": step * config.batch_size, "exchanges": comm.exchanges,
            "bytes_exchanged": comm.bytes, "exchange_seconds": comm.seconds,
            "train_seconds": train_time}


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
