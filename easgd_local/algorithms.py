"""What the workers of each algorithm do around a local step.

A worker's loop is the same for every algorithm (worker.py)::

    gradient at y  ->  comm.before_step(step)  ->  local step  ->  comm.after_step(step)

and a communicator says what happens at those two points. Adding an algorithm means an
entry in config.ALGORITHMS and, if its communication is new, a communicator here.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from .center import CenterLink
from .rules import current_x

# The control flags the main process sets in a shared int64 tensor, read without any lock
# (a worker killed mid-read cannot leave anything held, unlike an Event's internal lock).
# CHECKPOINT: the sequence number of the checkpoint asked for; RESUME: the last one taken, after
# which the workers that paused for it go on.
GO, STOP, CHECKPOINT, RESUME = 0, 1, 2, 3
CONTROL_SIZE = 4
# What the barrier of the synchronous algorithms decides for everyone (int64 [2]).
AGREED_STOP, AGREED_CHECKPOINT = 0, 1
# Per-worker cumulative counters (float64 [workers, 4]), kept across restarts of a worker.
EXCHANGES, BYTES, EXCHANGE_SECONDS, DIVERGENCES = 0, 1, 2, 3


class Communicator:
    """Base: no communication. Asynchronous algorithms leave stopping to each worker (it reads
    the STOP flag); synchronous ones decide together at a barrier (before_step returns False)."""

    seconds = 0.0  # time spent communicating

    def before_step(self, step: int, y: Tensor, v: Tensor | None) -> bool:
        """After the gradient, before the local step. False: the workers agreed to stop."""
        return True

    def after_step(self, step: int, y: Tensor, v: Tensor | None) -> None:
        pass

    def finish(self, y: Tensor, v: Tensor | None) -> None:
        pass

    def reset(self, y: Tensor) -> None:
        """The worker restarted from the center (after diverging)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], y: Tensor) -> None:
        pass

    @property
    def exchanges(self) -> int:
        return 0

    @property
    def bytes(self) -> int:
        return 0


class _LinkCommunicator(Communicator):
    def __init__(self, link: CenterLink, tau: int):
        self.link, self.tau = link, tau

    @property
    def exchanges(self) -> int:
        return self.link.exchanges

    @property
    def bytes(self) -> int:
        return self.link.bytes


class Elastic(_LinkCommunicator):
    """EASGD / EAMSGD: an elastic exchange every tau steps, between gradient and local step."""

    def __init__(self, link: CenterLink, tau: int, alpha: float, momentum: float):
        super().__init__(link, tau)
        self.alpha, self.momentum = alpha, momentum

    def before_step(self, step: int, y: Tensor, v: Tensor | None) -> bool:
        if step % self.tau == 0:
            t = time.perf_counter()
            self.link.exchange(y, self.alpha, v=v, momentum=self.momentum)
            self.seconds += time.perf_counter() - t
        return True


class SyncElastic(Elastic):
    """Synchronous EASGD: every tau steps all workers and the center move from the same values.

    Barrier 1: every worker holds its gradient at x_t and nobody has touched the center, so all
    read the same center c_t. Barrier 2: every worker has read c_t, so the additions may start.
    The next read comes after the next barrier 1, which no worker passes before all additions
    are done. The stop decision is taken at barrier 1, the same for everyone.
    """

    def __init__(self, link: CenterLink, tau: int, alpha: float, barrier: Any, agreed: Tensor):
        super().__init__(link, tau, alpha, 0.0)
        self.barrier, self.agreed = barrier, agreed

    def before_step(self, step: int, y: Tensor, v: Tensor | None) -> bool:
        if step % self.tau:
            return True
        t = time.perf_counter()
        self.barrier.wait()
        if self.agreed[AGREED_STOP]:
            return False
        self.link.exchange(y, self.alpha, barrier=self.barrier)
        self.seconds += time.perf_counter() - t
        return True


class Downpour(_LinkCommunicator):
    """DOWNPOUR: updates accumulate locally; every tau steps they are pushed and the center pulled.

    The push follows the local step, so the next gradient is taken at the freshly pulled center
    (with one worker and tau = 1 this is SGD step for step).
    """

    def __init__(self, link: CenterLink, tau: int, y: Tensor, average_rate: float | None):
        super().__init__(link, tau)
        self.y_pulled = y.clone()
        self.average_rate = average_rate

    def after_step(self, step: int, y: Tensor, v: Tensor | None) -> None:
        if (step + 1) % self.tau == 0:
            t = time.perf_counter()
            self.link.push_pull(y, self.y_pulled, self.average_rate)
            self.seconds += time.perf_counter() - t

    def finish(self, y: Tensor, v: Tensor | None) -> None:
        if not torch.equal(y, self.y_pulled):  # updates not pushed yet
            self.link.push_pull(y, self.y_pulled, self.average_rate)

    def reset(self, y: Tensor) -> None:
        self.y_pulled.copy_(y)

    def state_dict(self) -> dict[str, Any]:
        return {"y_pulled": self.y_pulled.cpu()}

    def load_state_dict(self, state: dict[str, Any], y: Tensor) -> None:
        self.y_pulled.copy_(state["y_pulled"])


class Publisher(_LinkCommunicator):
    """One-worker references (and DDP's rank 0): copy the model where the evaluator reads it."""

    def __init__(self, link: CenterLink, tau: int, momentum: float, active: bool = True):
        super().__init__(link, tau)
        self.momentum, self.active = momentum, active

    def _publish(self, y: Tensor, v: Tensor | None) -> None:
        # Publishing for evaluation is not part of the algorithm: the link counts no exchange.
        if self.active:
            self.link.publish(current_x(y, v, self.momentum))

    def after_step(self, step: int, y: Tensor, v: Tensor | None) -> None:
        if (step + 1) % self.tau == 0:
            self._publish(y, v)

    def finish(self, y: Tensor, v: Tensor | None) -> None:
        self._publish(y, v)


class DDPSync(Publisher):
    """DDP: gradients are all-reduced inside backward; every tau steps the ranks meet at a barrier
    to agree on stopping (an all-reduce that one rank skips would hang the others), and rank 0
    publishes the model, which is the same on every rank."""

    def __init__(self, link: CenterLink, tau: int, rank: int, barrier: Any, agreed: Tensor,
                 n_params: int, world: int):
        super().__init__(link, tau, 0.0, active=rank == 0)
        self.barrier, self.agreed = barrier, agreed
        self.steps = 0
        # Ring all-reduce: each rank sends and receives 2 (p-1)/p of the gradient per step.
        self.bytes_per_step = int(2 * (world - 1) / world * n_params * 4)

    def before_step(self, step: int, y: Tensor, v: Tensor | None) -> bool:
        self.steps += 1
        if step % self.tau == 0:
            self.barrier.wait()
            return not self.agreed[AGREED_STOP]
        return True

    @property
    def exchanges(self) -> int:
        return self.steps

    @property
    def bytes(self) -> int:
        return self.steps * self.bytes_per_step


def decide_stop(control: Tensor, agreed: Tensor) -> None:
    """Barrier action (run by one worker once all have arrived): fix the stop decision, and the
    checkpoint the workers answer after this step (all at the same step, so none waits at a
    barrier for a peer that has paused for the checkpoint)."""
    agreed[AGREED_STOP] = int(control[STOP])
    agreed[AGREED_CHECKPOINT] = int(control[CHECKPOINT])
