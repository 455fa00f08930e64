"""EASGD and EAMSGD (Zhang, Choromanska and LeCun, 2015): Algorithms 1 and 2, and the
synchronous EASGD of the same paper. The update rules are in rules.py."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..center import CenterLink, SharedCenter
from ..control import AGREED_STOP
from ..shared import SharedState
from .base import Algorithm, Communicator, WorkerContext


class Elastic(Communicator):
    """EASGD / EAMSGD: an elastic exchange every tau steps, between gradient and local step."""

    def __init__(self, link: CenterLink, tau: int, alpha: float, momentum: float):
        self.link, self.tau, self.alpha, self.momentum = link, tau, alpha, momentum

    def start(self, y: Tensor) -> None:
        self.link.pull(y)  # x^i = x~ at start, and after a restart

    def before_step(self, step: int, y: Tensor, v: Tensor | None) -> bool:
        if step % self.tau == 0:
            self.timed(self.link.exchange, y, self.alpha, v=v, momentum=self.momentum)
        return True

    def close(self) -> None:
        self.link.close()

    @property
    def exchanges(self) -> int:
        return self.link.exchanges

    @property
    def bytes(self) -> int:
        return self.link.bytes


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
        return self.timed(self._exchange, y)

    def _exchange(self, y: Tensor) -> bool:
        self.barrier.wait()
        if self.agreed[AGREED_STOP]:
            return False
        self.link.exchange(y, self.alpha, barrier=self.barrier)
        return True


class EASGD(Algorithm):
    name = "easgd"
    summary = "asynchronous EASGD (Algorithm 1)"
    elastic = True
    default_step = 0.2

    def shared_state(self, config: Any, init: Tensor, n_params: int) -> SharedState:
        return SharedCenter(init, lock=config.lock, n_params=n_params).state

    def reported(self, shared: SharedState, config: Any) -> Tensor:
        return SharedCenter(state=shared).reported()

    def center_link(self, ctx: WorkerContext) -> CenterLink:
        return CenterLink(SharedCenter(state=ctx.shared, n_params=ctx.n_params), ctx.device)

    def communicator(self, ctx: WorkerContext) -> Communicator:
        c = ctx.config
        momentum = c.resolved_momentum if self.local_momentum else 0.0
        return Elastic(self.center_link(ctx), c.tau, c.resolved_alpha, momentum)


class EAMSGD(EASGD):
    name = "eamsgd"
    summary = "asynchronous EASGD with Nesterov momentum (Algorithm 2)"
    local_momentum = True
    default_step = 0.4  # lr 0.04 with momentum 0.9


class SyncEASGD(EASGD):
    name = "sync-easgd"
    summary = "synchronous EASGD: all workers and the center move together"
    synchronous = True

    def communicator(self, ctx: WorkerContext) -> Communicator:
        c, ch = ctx.config, ctx.channels
        return SyncElastic(self.center_link(ctx), c.tau, c.resolved_alpha, ch.barrier, ch.agreed)
