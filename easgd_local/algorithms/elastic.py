"""EASGD and EAMSGD (Zhang, Choromanska and LeCun, 2015): Algorithms 1 and 2. The update rules
are in rules.py; the synchronous EASGD of the same paper is in sync.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from .base import Algorithm, Communicator, LinkCommunicator, Option, WorkerContext, deferred

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from .. import center, rules
    from ..center import CenterLink
    from ..shared import SharedState
else:  # loaded when a run starts (base.py)
    torch, center, rules = deferred("torch", "..center", "..rules", package=__package__)


WEIGHTING = Option("weighting", str, "Moving rate per exchange: none (the paper's, fixed) or "
                   "dynamic (weighted down for stragglers, beta kept over the live workers; "
                   "see rules.dynamic_rate).", choices=("none", "dynamic"), default="none")


def check_weighting(config: Any) -> None:
    """--weighting dynamic: the dynamic rate stays below 1 only if the fixed rate does."""
    if config.resolved_options["weighting"] == "dynamic" and config.resolved_alpha >= 1:
        raise ConfigError("--weighting dynamic needs a moving rate below 1 (got --alpha "
                          f"{config.resolved_alpha:g}): at 1 a worker and the center swap places")


def add_weighting_entries(state: SharedState, center: str, members: int) -> None:
    """Beside a center: the update count at each member's last exchange, and its staleness then
    (written under the center's lock, with the exchange)."""
    state.add(f"{center}.last", torch.zeros(members), lock=center, dtype=torch.int64)
    state.add(f"{center}.stale", torch.zeros(members), lock=center, dtype=torch.int64)


class DynamicWeighting:
    """The moving rate of member ``index`` of a center, from rules.dynamic_rate."""

    def __init__(self, state: SharedState, center: str, index: int, beta: float):
        self.clock = state[f"{center}.clock"].data
        self.last = state[f"{center}.last"].data
        self.stale = state[f"{center}.stale"].data
        self.guard = state[center].guard
        self.index, self.beta = index, beta

    def rate(self) -> float:
        # Read without the lock: a rate from counts a moment old is as good.
        now = int(self.clock)
        last = self.last.tolist()
        others = [now - t for j, t in enumerate(last) if j != self.index]
        return rules.dynamic_rate(self.beta, now - last[self.index], self.stale.tolist(),
                                  others, len(last))

    def record(self) -> None:
        """Under the center's lock, with the exchange's addition: count it."""
        now = int(self.clock)
        self.stale[self.index] = now - int(self.last[self.index])
        self.clock.add_(1)
        self.last[self.index] = now + 1

    def rejoin(self) -> None:
        """A (re)started worker is current: it rejoins at full weight."""
        with self.guard():
            self.last[self.index] = int(self.clock)


class Elastic(LinkCommunicator):
    """EASGD / EAMSGD: an elastic exchange every tau steps, between gradient and local step."""

    def __init__(self, link: CenterLink, tau: int, alpha: float, momentum: float,
                 weighting: DynamicWeighting | None = None):
        self.link, self.period, self.alpha, self.momentum = link, tau, alpha, momentum
        self.weighting = weighting

    def start(self, y: Tensor) -> None:
        self.link.pull(y)  # x^i = x~ at start, and after a restart
        if self.weighting is not None:
            self.weighting.rejoin()

    def exchange(self, step: int, y: Tensor, v: Tensor | None) -> bool:
        """The elastic exchange with the center (every tau steps, after the gradient)."""
        w = self.weighting
        alpha = self.alpha if w is None else w.rate()
        self.timed(self.link.exchange, y, alpha, v=v, momentum=self.momentum,
                   under_lock=None if w is None else w.record)
        return True


class EASGD(Algorithm):
    name = "easgd"
    summary = "asynchronous EASGD (Algorithm 1)"
    box_center = "center"
    elastic = True
    default_step = 0.2
    options = (WEIGHTING,)

    def validate(self, config: Any) -> None:
        check_weighting(config)

    def shared_state(self, config: Any, init: Tensor, n_params: int) -> SharedState:
        state = center.SharedCenter(init, lock=config.lock, n_params=n_params,
                                    stripes=config.center_stripes).state
        add_weighting_entries(state, "center", config.workers)
        return state

    def reported(self, shared: SharedState, config: Any) -> Tensor:
        return shared["center"].snapshot()

    def center_link(self, ctx: WorkerContext) -> CenterLink:
        return center.CenterLink(center.SharedCenter(state=ctx.shared, n_params=ctx.n_params),
                                  ctx.device)

    def communicator(self, ctx: WorkerContext) -> Communicator:
        c = ctx.config
        momentum = c.resolved_momentum if self.local_momentum else 0.0
        weighting = None
        if c.resolved_options.get("weighting") == "dynamic":
            weighting = DynamicWeighting(ctx.shared, "center", ctx.rank, c.resolved_alpha * c.workers)
        return Elastic(self.center_link(ctx), c.tau, c.resolved_alpha, momentum, weighting)


class EAMSGD(EASGD):
    name = "eamsgd"
    summary = "asynchronous EASGD with Nesterov momentum (Algorithm 2)"
    local_momentum = True
    default_step = 0.4  # lr 0.04 with momentum 0.9
    default_tau = 4  # one of the paper's periods; ahead of 10 on the 2-worker bench (docs/bench.md)

