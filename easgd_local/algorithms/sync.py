"""Synchronous EASGD (Zhang, Choromanska and LeCun, 2015): every tau steps all workers and the
center move together, from the same values. The exchange is EASGD's (rules.elastic_difference,
the center's locked addition); what is this algorithm's own is the barrier protocol around it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Communicator, WorkerContext, deferred
from .elastic import EASGD, Elastic

if TYPE_CHECKING:
    from torch import Tensor

    from .. import center, control
    from ..center import CenterLink
else:  # loaded when a run starts (base.py)
    center, control = deferred("..center", "..control", package=__package__)


class SyncElastic(Elastic):
    """Synchronous EASGD's worker: every tau steps, the elastic exchange between two barriers.

    Barrier 1: every worker holds its gradient at x_t and nobody has touched the center, so all
    read the same center c_t. Barrier 2: every worker has read c_t (its difference is taken), so
    the additions may start. The next read comes after the next barrier 1, which no worker
    passes before all additions are done. The stop decision is taken at barrier 1, the same for
    everyone.
    """

    def __init__(self, link: CenterLink, tau: int, alpha: float, barrier: Any, agreed: Tensor):
        super().__init__(link, tau, alpha, 0.0)
        self.barrier, self.agreed = barrier, agreed

    def exchange(self, step: int, y: Tensor, v: Tensor | None) -> bool:
        return self.timed(self._exchange, y)

    def _exchange(self, y: Tensor) -> bool:
        self.barrier.wait()  # 1: the center is c_t for everyone
        if self.agreed[control.AGREED_STOP]:
            return False
        host = self.link.difference(y, self.alpha)
        finite = center.finite(host)
        self.barrier.wait()  # 2: every difference taken; passed even when not finite (the
        if not finite:  # others are waiting), and then nothing of this worker's is applied
            raise center.Diverged("non-finite elastic difference")
        self.link.move_(y, host)
        return True


class SyncEASGD(EASGD):
    name = "sync-easgd"
    summary = "synchronous EASGD: all workers and the center move together"
    synchronous = True
    options = ()  # in lock-step there are no stragglers to weight

    def validate(self, config: Any) -> None:
        pass

    def communicator(self, ctx: WorkerContext) -> Communicator:
        c, ch = ctx.config, ctx.channels
        return SyncElastic(self.center_link(ctx), c.tau, c.resolved_alpha, ctx.barrier(), ch.agreed)
