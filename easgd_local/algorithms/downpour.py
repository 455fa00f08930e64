"""DOWNPOUR (Dean et al., 2012) and the variants the EASGD paper compares against: master
momentum (MDOWNPOUR) and a running average of the center as the reported model (ADOWNPOUR,
MVADOWNPOUR)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Algorithm, Communicator, LinkCommunicator, WorkerContext, deferred

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from .. import center
    from ..center import CenterLink, SharedCenter
    from ..shared import SharedState
else:  # loaded when a run starts (base.py)
    torch, center = deferred("torch", "..center", package=__package__)


class Downpour(LinkCommunicator):
    """DOWNPOUR: updates accumulate locally; every tau steps they are pushed and the center pulled.

    The push follows the local step, so the next gradient is taken at the freshly pulled center
    (with one worker and tau = 1 this is SGD step for step).
    """

    def __init__(self, link: CenterLink, tau: int, y: Tensor, average_rate: float | None):
        self.link, self.tau, self.average_rate = link, tau, average_rate
        self.y_pulled = torch.empty_like(y)

    def start(self, y: Tensor) -> None:
        self.link.pull(y)
        self.y_pulled.copy_(y)

    def after_step(self, step: int, y: Tensor, v: Tensor | None, loss: Tensor) -> None:
        if (step + 1) % self.tau == 0:
            self.timed(self.link.push_pull, y, self.y_pulled, self.average_rate)

    def finish(self, y: Tensor, v: Tensor | None) -> None:
        if not torch.equal(y, self.y_pulled):  # updates not pushed yet
            self.link.push_pull(y, self.y_pulled, self.average_rate)

    def state_dict(self) -> dict[str, Any]:
        return {"y_pulled": self.y_pulled.cpu()}

    def load_state_dict(self, state: dict[str, Any], y: Tensor) -> None:
        self.y_pulled.copy_(state["y_pulled"])


class DOWNPOUR(Algorithm):
    name = "downpour"
    summary = "DOWNPOUR: push tau steps of updates, pull the center"
    box_center = "center"
    averaged = False  # the reported model is a running average of the center
    average_rate: float | None = None  # None: 1/(t+1) (the mean of all centers)

    def _momentum(self, config: Any) -> float:
        return config.resolved_momentum if self.master_momentum else 0.0

    def shared_state(self, config: Any, init: Tensor, n_params: int) -> SharedState:
        return center.SharedCenter(init, lock=config.lock, momentum=self._momentum(config),
                            average=self.averaged, n_params=n_params).state

    def _center(self, shared: SharedState, config: Any, n_params: int | None = None) -> SharedCenter:
        return center.SharedCenter(state=shared, momentum=self._momentum(config), n_params=n_params)

    def reported(self, shared: SharedState, config: Any) -> Tensor:
        return self._center(shared, config).reported()

    def notes(self, config: Any) -> list[str]:
        return []

    def communicator(self, ctx: WorkerContext) -> Communicator:
        link = center.CenterLink(self._center(ctx.shared, ctx.config, ctx.n_params), ctx.device)
        return Downpour(link, ctx.config.tau, link.d, self.average_rate)


class MDOWNPOUR(DOWNPOUR):
    box_center = None  # it reports more than the center (momentum, an average)
    name = "mdownpour"
    summary = "DOWNPOUR with Nesterov momentum on the master"
    master_momentum = True
    reports = "the center's iterate"

    def notes(self, config: Any) -> list[str]:
        if config.tau > 1:
            return [f"mdownpour is defined by the paper for tau = 1 only; with tau = {config.tau} "
                    f"the master momentum acts on pushes of {config.tau} steps' updates"]
        return []


class ADOWNPOUR(DOWNPOUR):
    box_center = None  # it reports more than the center (momentum, an average)
    name = "adownpour"
    summary = "DOWNPOUR reporting the average of all centers"
    averaged = True
    reports = "the average of every center so far"


class MVADOWNPOUR(DOWNPOUR):
    box_center = None  # it reports more than the center (momentum, an average)
    name = "mvadownpour"
    summary = "DOWNPOUR reporting a moving average of the center (rate 0.001)"
    averaged = True
    average_rate = 0.001
    reports = "a moving average of the center"
