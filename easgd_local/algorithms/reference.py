"""The one-worker references every speed-up is measured against: SGD and Nesterov SGD (MSGD),
no center. The worker publishes its model into a shared slot, where the evaluator reads it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Algorithm, Communicator, WorkerContext, deferred

if TYPE_CHECKING:
    from torch import Tensor

    from .. import center, rules
    from .. import shared as shm
    from ..center import Link
    from ..shared import SharedState
else:  # loaded when a run starts (base.py)
    center, rules, shm = deferred("..center", "..rules", "..shared", package=__package__)


class Publisher(Communicator):
    """Copy the model (its iterate x, not the look-ahead) to the shared slot after every tau
    local steps (the template's ``exchange_after``) and at the end. Publishing for evaluation is
    not part of the algorithm: nothing is counted as exchanged."""

    def __init__(self, link: Link, tau: int, momentum: float, active: bool = True):
        self.link, self.period, self.momentum, self.active = link, tau, momentum, active

    def start(self, y: Tensor) -> None:
        self.link.pull(y)  # the initial weights

    def _publish(self, y: Tensor, v: Tensor | None) -> None:
        if self.active:
            self.link.publish(rules.current_x(y, v, self.momentum))

    def exchange_after(self, step: int, y: Tensor, v: Tensor | None) -> None:
        self._publish(y, v)

    def finish(self, y: Tensor, v: Tensor | None) -> None:
        self._publish(y, v)

    def close(self) -> None:
        self.link.close()


class SGD(Algorithm):
    name = "sgd"
    summary = "SGD on one worker, no center"
    single_worker = True
    has_tau = False
    reports = "the worker's model"
    default_step = 0.15

    def shared_state(self, config: Any, init: Tensor, n_params: int) -> SharedState:
        state = shm.SharedState(locked=True)
        state.add("model", init)
        return state

    def reported(self, shared: SharedState, config: Any) -> Tensor:
        return shared["model"].snapshot()

    def communicator(self, ctx: WorkerContext) -> Communicator:
        momentum = ctx.config.resolved_momentum if self.local_momentum else 0.0
        return Publisher(center.Link(ctx.shared["model"], ctx.device), ctx.config.tau, momentum)


class MSGD(SGD):
    name = "msgd"
    summary = "SGD with Nesterov momentum on one worker, no center"
    local_momentum = True
    default_step = 0.2  # lr 0.02 with momentum 0.9
