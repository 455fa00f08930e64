"""One worker process: its device, its data order, its local steps, and its algorithm's
communicator around each step. The same loop runs every algorithm::

    gradient at y  ->  comm.before_step(step)  ->  local step  ->  comm.after_step(step)

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
from typing import Any

import torch
import torch.nn.functional as F

from . import rules
from .algorithms import WorkerContext, get
from .center import Diverged
from .checkpoint import unpack_state
from .config import TrainConfig, cpu_threads_per_worker
from .config.faults import parse_fault
from .control import (BYTES, DIVERGENCES, EXCHANGE_SECONDS, EXCHANGES, Done, Event, Failed,
                      ParentGone, Ready, State, WorkerChannels, check_parent, steps_budget)
from .flat import detached, flatten_
from .precision import Precision
from .schedule import run_schedule
from .shared import SharedState

log = logging.getLogger(__name__)

PARENT_CHECK_EVERY = 50  # steps between checks that the main process is still alive


FAULT_ENV = "EASGD_LOCAL_FAULT"  # "rank:step:kind" for tests; see _Fault
# The signals that end a run the way Ctrl-C does.
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Re-exported for callers that knew them here.
__all__ = ["FAULT_ENV", "WorkerChannels", "run_worker", "steps_budget"]


def run_worker(rank: int, config: TrainConfig, ch: WorkerChannels, conn: Any, parent_pid: int,
               image_size: int, incarnation: int = 0, resume: bytes | None = None) -> None:
    """Entry point of a spawned worker. Reports through ``conn`` (its own pipe to the main
    process) instead of raising. ``incarnation`` > 0: a restart after the previous process of
    this rank died; ``resume``: a saved worker state to continue from."""
    # Ctrl-C, and SIGTERM/SIGHUP from `timeout`, systemd, Slurm or a closed terminal, reach
    # the whole process group; the main process alone decides how the run ends and tells the
    # workers through STOP, so a worker never dies mid-exchange with a stale state.
    for sig in INTERRUPTS:
        signal.signal(sig, signal.SIG_IGN)
    # Started with them blocked (launcher.interrupts_blocked): one that came during start-up
    # was pending and is dropped by SIG_IGN above.
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)
    try:
        worker = Worker(rank, config, ch, conn, parent_pid, image_size, incarnation)
        conn.send(Done(rank, worker.train(resume)))
    except (ParentGone, BrokenPipeError):
        pass  # the main process is gone: nobody to report to
    except BaseException as e:  # report everything, then exit
        try:
            conn.send(Failed(rank, f"{type(e).__name__}: {e}", traceback.format_exc()))
        except OSError:
            pass


class _Fault:
    """Fault injection for tests: EASGD_LOCAL_FAULT="rank:step:kind[,...]" makes the first
    process of that rank fail at that local step. Kinds: exit (exit code 3), kill (SIGKILL),
    slow:F (from that step on, F times slower: a sleep per step), pause:S (stop S seconds,
    then go on), kill-in-lock (SIGKILL halfway through adding to shared state, lock held),
    stop-in-lock (the
    same with SIGSTOP: frozen, holding the lock), nan (the worker's
    parameters become NaN), hang (stop making progress), raise (an error in the worker), and
    drift:S (from that step on, the
    local step is replaced by adding S to every parameter: a known, data-free move, so that sums
    over workers and shared state can be checked exactly)."""

    def __init__(self, rank: int, incarnation: int, spec: str | None = None):
        self.at: dict[int, str] = {}
        self.drift: float | None = None  # the local step's replacement, once it applies
        self.slow: float = 1.0  # this rank runs this many times slower (a sleep per step)
        self._from: dict[str, tuple[int, float]] = {}  # drift, slow: from a step on
        if incarnation:
            return  # a restarted worker runs clean, or a test would crash it forever
        items = [*filter(None, os.environ.get(FAULT_ENV, "").split(",")),
                 *filter(None, (spec or "").split(","))]
        for item in items:
            r, step, kind = parse_fault(item)
            if r != rank:
                continue
            name, _, value = kind.partition(":")
            if name in ("drift", "slow"):
                # From that step on, also in a resumed run (whose steps start later).
                self._from[name] = (step, float(value))
            else:
                self.at[step] = kind

    def __call__(self, step: int, y: torch.Tensor, shared: SharedState) -> None:
        for name, (start, value) in self._from.items():
            if step >= start:
                setattr(self, name, value)
        kind = self.at.get(step)
        if kind is not None and kind.startswith("pause:"):
            time.sleep(float(kind.split(":", 1)[1]))
        if kind == "exit":
            os._exit(3)
        elif kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind in ("kill-in-lock", "stop-in-lock"):
            for name in shared:
                shared[name].crash_in_lock = signal.SIGKILL if kind == "kill-in-lock" else signal.SIGSTOP
        elif kind == "nan":
            y.fill_(float("nan"))
        elif kind == "hang":
            while True:
                time.sleep(1)
        elif kind == "raise":
            raise RuntimeError(f"injected fault at step {step}")


class EmulatedStep:
    """The gradient of a worker on an emulated device (--emulate-step): a sleep of the device's
    step time instead of the forward and backward, and a stand-in gradient so that the state
    really moves and the exchanges carry real numbers.

    The stand-in is the gradient of the quadratic 0.5 * |y - t|^2, where t is a fixed point of
    this rank (small normal numbers, TARGET_SCALE, from a generator seeded with seed + rank: the
    same in every incarnation of the rank, and different between ranks). Each worker is pulled
    toward its own point and the exchanges toward the center, so the states stay apart and
    never diverge at a learning rate below 1 (the curvature is 1); the center learns nothing.
    The local step that follows (rules.local_step_, momentum and all) is the real one, and the
    mini-batches are still drawn (epochs, data order and budget as in a real run), unused."""

    TARGET_SCALE = 0.01
    LOSS_SAMPLE = 4096

    def __init__(self, seconds: float, seed: int, n_params: int, device: torch.device):
        self.seconds = seconds
        gen = torch.Generator().manual_seed(seed)
        self.target = (torch.randn(n_params, generator=gen) * self.TARGET_SCALE).to(device)

    @torch.no_grad()
    def gradient_(self, grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sleep the step's time, write y - t into ``grad``; the quadratic's mean loss over its
        first LOSS_SAMPLE values (a 0-d tensor, cheap whatever the model's size; leader-based
        algorithms rank their workers by it)."""
        time.sleep(self.seconds)
        torch.sub(y[: grad.numel()], self.target, out=grad)
        head = grad[: self.LOSS_SAMPLE]
        return torch.dot(head, head) / (2 * max(1, head.numel()))


def loss_function(config: TrainConfig) -> Any:
    """--loss (module:attr), or cross-entropy: classification is the task by default."""
    if config.loss:
        from .user import import_spec

        return import_spec(config.loss, "loss")
    return F.cross_entropy


def _pack(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class Worker:
    """The state of one worker process: device, data, model (as one flat buffer ``y``), its
    momentum ``v``, its data order, and its algorithm's communicator."""

    def __init__(self, rank: int, config: TrainConfig, ch: WorkerChannels, conn: Any,
                 parent_pid: int, image_size: int, incarnation: int):
        from .data import load_split
        from .models import build_model

        self.rank, self.config, self.ch, self.conn = rank, config, ch, conn
        self.parent_pid = parent_pid
        self.algorithm = get(config.algo)
        self.device = torch.device(config.worker_devices[rank])
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if config.emulate_step is not None:
            torch.set_num_threads(1)  # an emulated device's work is a sleep and one flat step
        elif self.device.type != "cuda":
            torch.set_num_threads(cpu_threads_per_worker(config))
        # dropout and other model randomness; a restarted worker draws fresh numbers. With
        # several boxes, the global rank (rank_offset + rank) sets a worker's streams.
        global_rank = config.rank_offset + rank
        torch.manual_seed(config.seed + global_rank + 1000 * incarnation)
        self.data = load_split(config.dataset, config.data_dir, train=True, device=self.device,
                               image_size=image_size, loader_workers=config.loader_workers)
        self.loss_fn = loss_function(config)
        self.state = flatten_(build_model(config.model, self.data.info), self.device)
        self.state.module.train()
        self.y = self.state.flat
        self.momentum = config.resolved_momentum if self.algorithm.local_momentum else 0.0
        self.v = torch.zeros(self.state.n_params, device=self.device) if self.momentum else None
        self.comm = self.algorithm.communicator(WorkerContext(
            rank, config, ch, self.device, self.state.n_params, parent_pid))
        self.forward = self.comm.wrap(self.state.module)
        self.precision = Precision(config.precision, self.device, self.state.module.parameters())
        self.lr_at = run_schedule(config, steps_budget(config, len(self.data)))  # step -> lr
        self.gen = torch.Generator().manual_seed(config.seed + global_rank + 1000 * incarnation)  # data order
        self.step = int(ch.steps[rank])  # a restarted worker continues its rank's count
        self.fault = _Fault(rank, incarnation, config.faults)
        self.reported = [0.0, 0.0, 0.0]  # exchanges, bytes, seconds already in ch.counters
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_count = 0
        self.emulated = None if config.emulate_step is None else EmulatedStep(
            config.emulate_step, config.seed + global_rank, self.state.n_params, self.device)

    # -- state -----------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Everything needed to continue this worker elsewhere (see restore)."""
        return _pack({"flat": self.y.cpu(), "v": None if self.v is None else self.v.cpu(),
                      "step": self.step, "generator": self.gen.get_state(),
                      "torch_rng": torch.get_rng_state(), "comm": self.comm.state_dict()})

    def restore(self, saved: dict) -> None:
        self.y.copy_(saved["flat"])
        if self.v is not None and saved["v"] is not None:
            self.v.copy_(saved["v"])
        self.gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        self.comm.load_state_dict(saved["comm"], self.y)
        self.step = int(saved["step"])
        self.ch.steps[self.rank] = self.step

    def report_totals(self) -> None:
        """Add what is new of this process's communication totals to its rank's counters,
        which are cumulative across restarts."""
        totals = [self.comm.exchanges, self.comm.bytes, self.comm.seconds]
        for index, now, before in zip((EXCHANGES, BYTES, EXCHANGE_SECONDS), totals, self.reported):
            self.ch.counters[self.rank, index] += now - before
        self.reported[:] = totals

    def report_loss(self) -> None:
        # .item() waits for the device; done once per period, not per step.
        if self.loss_count:
            mean = self.loss_sum.item() / self.loss_count
            if math.isfinite(mean):
                self.ch.losses[self.rank] = mean
        self.loss_sum.zero_()
        self.loss_count = 0

    # -- the loop ----------------------------------------------------------------------------

    def train(self, resume: bytes | None) -> bytes:
        """Train until a stop condition; returns the worker's final state."""
        self.comm.start(self.y)
        if resume is not None:
            self.restore(unpack_state(resume))
        budget = steps_budget(self.config, len(self.data))
        self.conn.send(Ready(self.rank, len(self.data)))
        self.ch.wait_for_go(self.parent_pid)
        self.answered = self.ch.checkpoint_asked(self.algorithm.synchronous)
        running = budget is None or self.step < budget
        while running:
            epoch_start = self.step
            for x, target in self.data.batches(self.config.batch_size, generator=self.gen):
                started = time.perf_counter()
                if not self.one_step(x, target):
                    running = False
                    break
                if self.fault.slow > 1:  # an injected straggler: F times the step's time
                    time.sleep((self.fault.slow - 1) * (time.perf_counter() - started))
                if self.step - epoch_start == 1 and (lost := detached(self.state)) is not None:
                    raise RuntimeError(f"model {self.config.model} detached {lost} from the flat "
                                       "buffer (it replaced a parameter or set .grad to None)")
                self.between_steps()
                # Synchronous algorithms agree on stopping at their barrier instead.
                if (budget is not None and self.step >= budget) or (
                        not self.algorithm.synchronous and self.ch.stopping()):
                    running = False
                    break
            if self.step == epoch_start and running:
                raise ValueError(f"--batch-size {self.config.batch_size} exceeds the "
                                 f"{len(self.data)} training samples")
        return self.finish()

    def one_step(self, x: torch.Tensor, target: torch.Tensor) -> bool:
        """Gradient, communication, local step. False: the workers agreed to stop."""
        self.fault(self.step, self.y, self.ch.shared)
        loss, finite = self.gradient(x, target)
        rules.add_weight_decay_(self.state.grad, self.y, self.config.weight_decay)
        try:
            # Communication comes after the gradient: Algorithms 1 and 2 take the gradient at
            # the point before the elastic move, and both moves are then added.
            if not self.comm.before_step(self.step, self.y, self.v):
                return False
            if self.fault.drift is not None:
                self.y[: self.state.n_params].add_(self.fault.drift)
            elif finite:  # fp16: a step whose scaled gradients overflowed is skipped
                rules.local_step_(self.y, self.state.grad, self.lr_at(self.step), v=self.v,
                                  momentum=self.momentum)
            self.comm.after_step(self.step, self.y, self.v, loss.detach())
        except Diverged as e:
            # Nothing reached shared state: start again from it, with fresh momentum.
            self.comm.reset(self.y)
            if self.v is not None:
                self.v.zero_()
            self.ch.counters[self.rank, DIVERGENCES] += 1
            self.conn.send(Event(self.rank, f"worker {self.rank} diverged at step {self.step} "
                                 f"({e}); its exchange was skipped and it restarts from the center"))
        if self.emulated is None:  # an emulated step's loss is not the model's: not reported
            self.loss_sum += loss.detach()
            self.loss_count += 1
        self.step += 1
        self.ch.steps[self.rank] = self.step
        return True

    def gradient(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """This step's gradient at y, into ``state.grad``: its loss, and whether the gradient is
        finite (fp16 may overflow). On an emulated device, the stand-in (EmulatedStep)."""
        if self.emulated is not None:
            return self.emulated.gradient_(self.state.grad, self.y), True
        self.state.grad.zero_()
        with self.precision.autocast():  # the forward and the loss; backward follows its casts
            loss = self.loss_fn(self.forward(x), target)
        return loss, self.precision.backward(loss)

    def between_steps(self) -> None:
        """Reports, checkpoint answers and the parent check, at a step boundary."""
        if self.step % self.config.tau == 0:
            self.report_loss()
            self.report_totals()
        asked = self.ch.checkpoint_asked(self.algorithm.synchronous)
        if asked != self.answered:
            self.answered = asked
            self.conn.send(State(self.rank, asked, self.snapshot()))
            self.ch.await_resume(asked, self.parent_pid)
        if self.step % PARENT_CHECK_EVERY == 0:
            check_parent(self.parent_pid)

    def finish(self) -> bytes:
        try:
            self.comm.finish(self.y, self.v)
        except Diverged:
            pass  # the last updates were not finite: they stay out of shared state
        self.report_totals()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.report_loss()
        self.comm.close()
        return self.snapshot()
