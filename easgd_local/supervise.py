"""The worker processes of a run: spawn them, read their messages, replace the dead, stop them.

A worker that dies (a crash, kill -9) is replaced by a fresh one that starts from the shared
state, up to --max-restarts times; its rank's step count and communication totals carry on. The
states the workers send (for checkpoints, and their last one when done) are kept here, in
``states``, for checkpointing.py to save.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_messages
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from .config import TrainConfig
from .control import GO, STOP, Done, Event, Failed, Ready, State, WorkerChannels
from .interrupts import Interrupts, interrupts_blocked
from .reporting import TrainError
from .worker import run_worker

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1  # how often the main process looks at its workers
JOIN_GRACE_SECONDS = 5.0  # after stop: time a worker gets to exit before it is killed
START_TIMEOUT_SECONDS = 600.0  # spawn + imports + data loading of the slowest worker


@dataclass
class WorkerProcess:
    """The main process's view of one worker process."""

    rank: int
    proc: Any
    conn: Any  # read end of this worker's pipe
    incarnation: int = 0
    resume: bytes | None = None  # the saved state it was started from
    ready: bool = False
    done: bool = False
    restart_started: float | None = None


class Supervisor:
    """The workers of one run, seen from the main process.

    ``states`` holds each rank's last state (from the checkpoint resumed, then from its State
    and Done messages), ``state_seq`` the checkpoint each state answered. ``where`` (the
    checkpoint directory) is named in the lines that end a run; ``started`` says whether
    training began (GO), after which a checkpoint is kept whatever ends it.
    """

    def __init__(self, config: TrainConfig, ch: WorkerChannels, image_size: int,
                 states: dict[int, bytes], restarts_before: int, where: Path):
        self.config, self.ch, self.image_size, self.where = config, ch, image_size, where
        self.algorithm = config.algorithm
        self.ctx = mp.get_context("spawn")
        self.workers: list[WorkerProcess] = []
        self.states = states
        self.state_seq: dict[int, int] = {}  # the checkpoint each state answered
        # A resumed run gets a fresh --max-restarts budget; the summary counts them all.
        self.restarts_before = restarts_before
        self.restarts = 0
        self.restart_seconds: list[float] = []
        self.train_size = 0  # reported by the workers when ready
        self.started = False
        self.stopping = False
        self.interrupts = Interrupts(self.kill_all)

    @property
    def all_done(self) -> bool:
        return all(w.done for w in self.workers)

    @property
    def total_restarts(self) -> int:
        return self.restarts_before + self.restarts

    def spawn(self, rank: int, incarnation: int, resume: bytes | None) -> WorkerProcess:
        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=run_worker, name=f"easgd-worker-{rank}",
                                args=(rank, self.config, self.ch, writer, os.getpid(),
                                      self.image_size, incarnation, resume))
        with interrupts_blocked():
            proc.start()
        # Only the worker may hold the write end: when it dies, the read end sees EOF at once.
        writer.close()
        worker = WorkerProcess(rank, proc, reader, incarnation, resume)
        if rank < len(self.workers):
            self.workers[rank] = worker
        else:
            self.workers.append(worker)
        return worker

    def check_interrupt(self) -> None:
        if self.interrupts.seen and not self.stopping:
            raise KeyboardInterrupt

    def receive(self, timeout: float) -> None:
        """Handle every message that arrives within ``timeout``; a closed pipe is a dead worker."""
        self.check_interrupt()
        live = {w.conn: w for w in self.workers if not w.done}
        for conn in wait_for_messages(list(live), timeout=timeout):
            worker = live[conn]
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                self.on_death(worker)
                continue
            self.handle(worker, msg)

    def handle(self, worker: WorkerProcess, msg: Any) -> None:
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

    def on_death(self, worker: WorkerProcess) -> None:
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
            kept = f"checkpoint in {self.where}" if self.started else "the run never started"
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

    def go(self) -> None:
        """Training begins: every worker waiting for GO starts."""
        self.started = True
        self.ch.control[GO] = 1

    def stop(self, wait: float = JOIN_GRACE_SECONDS - 1.0) -> None:
        """Tell the workers to stop and collect their final states for a while."""
        self.ch.control[STOP] = 1
        self.ch.control[GO] = 1  # a worker still waiting to start sees STOP right after GO
        if self.ch.barrier is not None:
            self.ch.barrier.abort()  # release workers waiting for a peer that will not come
        self.stopping = True
        deadline = time.perf_counter() + wait
        while not self.all_done and time.perf_counter() < deadline:
            try:
                self.receive(POLL_SECONDS)
            except TrainError:
                pass  # errors while stopping (an aborted barrier) change nothing now

    def kill_all(self) -> None:
        for w in self.workers:
            if w.proc.is_alive():
                w.proc.kill()

    def shutdown(self) -> None:
        """Stop, join, and if need be kill every worker."""
        self.ch.control[STOP] = 1
        self.ch.control[GO] = 1
        if self.ch.barrier is not None and not self.all_done:
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


def _discard_messages(worker: WorkerProcess) -> None:
    # A worker blocks in send() while its pipe is full: keep reading while joining.
    try:
        while not worker.conn.closed and worker.conn.poll():
            worker.conn.recv()
    except (EOFError, OSError):
        pass
