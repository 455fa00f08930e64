"""DOWNPOUR (Dean et al., 2012) and the variants the EASGD paper compares against: master
momentum (MDOWNPOUR) and a running average of the center as the reported model (ADOWNPOUR,
MVADOWNPOUR)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Algorithm, Communicator, LinkCommunicator, WorkerContext, deferred

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from .. import center, rules
    from .. import shared as shm
    from ..center import CenterLink, SharedCenter
    from ..shared import SharedState
else:  # loaded when a run starts (base.py)
    torch, center, rules, shm = deferred("torch", "..center", "..rules", "..shared",
                                         package=__package__)


class Master:
    """DOWNPOUR's master: a :class:`~easgd_local.center.SharedCenter` and what is written with it
    under its lock, beside it in the shared state: for MDOWNPOUR ``name.velocity`` (Nesterov
    momentum on the master, over the parameters only), for ADOWNPOUR / MVADOWNPOUR
    ``name.average`` (a running average of the center). Its ``clock`` counts the pushes.

    ``n_params``: the first entries of the center are parameters, the rest float buffers
    (batch-norm statistics), which a push replaces instead of adding to. A view without it (the
    main process) takes it from the master momentum, where there is one."""

    def __init__(self, center: SharedCenter, momentum: float = 0.0):
        self.center, self.momentum = center, momentum
        self.velocity = center.beside("velocity")
        self.average = center.beside("average")
        self.n_params = center.n_params if self.velocity is None else self.velocity.numel()

    @staticmethod
    def allocate(init: Tensor, lock: bool, n_params: int, *, momentum: float = 0.0,
                 average: bool = False, name: str = "center") -> SharedState:
        """A new shared state: the center ``name``, and the velocity and average it needs."""
        c = center.SharedCenter(init, lock=lock, n_params=n_params, name=name)
        if momentum:
            c.state.add(f"{name}.velocity", torch.zeros(n_params), lock=name)
        if average:
            c.state.add(f"{name}.average", c.data, lock=name)
        return c.state

    @property
    def data(self) -> Tensor:
        return self.center.data

    def push_(self, u: Tensor, average_rate: float | None = None) -> None:
        """The master's side of a push, atomically (rules.downpour_push_): ``u`` holds the
        accumulated update of the parameters, then the pushing worker's own float buffers. Then
        the running average (rules.running_average_), with a = average_rate, or a = 1/(t+1) at
        the t-th update when average_rate is None (z = mean of all centers)."""
        c, average = self.center, self.average
        with c.guard():
            if c.crash_in_lock:
                shm.crash_halfway(c.data, u, shm.crash_signal(c.crash_in_lock))
            rules.downpour_push_(c.data, u, self.n_params, velocity=self.velocity,
                                 momentum=self.momentum)
            c.clock.add_(1)
            if average is not None:
                a = average_rate if average_rate is not None else 1.0 / (int(c.clock) + 1)
                rules.running_average_(average, c.data, a)

    def reported(self) -> Tensor:
        """A copy of the model reported: the running average where there is one; with master
        momentum the iterate x = center - delta*v (the center is the look-ahead)."""
        with self.center.guard():
            if self.average is not None:
                return self.average.clone()
            x = self.data.clone()
            if self.velocity is not None:
                x[: self.n_params].sub_(self.velocity, alpha=self.momentum)
            return x


class Downpour(LinkCommunicator):
    """DOWNPOUR: updates accumulate locally; every tau steps they are pushed and the center pulled.

    The push follows the local step (the template's ``exchange_after``, once every tau local
    steps), so the next gradient is taken at the freshly pulled center (with one worker and
    tau = 1 this is SGD step for step).
    """

    def __init__(self, link: CenterLink, master: Master, tau: int, average_rate: float | None):
        self.link, self.master, self.period = link, master, tau
        self.average_rate = average_rate
        self.y_pulled = torch.empty_like(link.d)

    def start(self, y: Tensor) -> None:
        self.link.pull(y)
        self.y_pulled.copy_(y)

    def exchange_after(self, step: int, y: Tensor, v: Tensor | None) -> None:
        self.timed(self.push_pull, y)

    def finish(self, y: Tensor, v: Tensor | None) -> None:
        if not torch.equal(y, self.y_pulled):  # updates not pushed yet
            self.push_pull(y)

    def push_pull(self, y: Tensor) -> None:
        """Push u = y - y_pulled (the local updates of the parameters since the last pull, then
        the worker's buffers as they are) to the master, then pull the center:
        y = y_pulled = center. Nothing is pushed when u is not finite (Diverged)."""
        n, d = self.master.n_params, self.link.d
        with torch.no_grad():  # not a decorator: that would import torch with this module
            torch.sub(y[:n], self.y_pulled[:n], out=d[:n])
            d[n:].copy_(y[n:])
            host = self.link.to_host(d)
            if not center.finite(host):
                raise center.Diverged("non-finite update")
            self.master.push_(host, self.average_rate)
            y.copy_(self.master.data, non_blocking=True)
            self.y_pulled.copy_(y)
        self.link.count()

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
        return Master.allocate(init, config.lock, n_params, momentum=self._momentum(config),
                               average=self.averaged)

    def _master(self, shared: SharedState, config: Any, n_params: int | None = None) -> Master:
        view = center.SharedCenter(state=shared, n_params=n_params)
        return Master(view, momentum=self._momentum(config))

    def reported(self, shared: SharedState, config: Any) -> Tensor:
        return self._master(shared, config).reported()

    def notes(self, config: Any) -> list[str]:
        return []

    def communicator(self, ctx: WorkerContext) -> Communicator:
        master = self._master(ctx.shared, ctx.config, ctx.n_params)
        link = center.CenterLink(master.center, ctx.device)
        return Downpour(link, master, ctx.config.tau, self.average_rate)


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
