"""Leader SGD, LSGD (Teng et al., NeurIPS 2019, arXiv 1905.10395): workers pulled toward the
best worker instead of toward an average.

The update, the paper's eq. 2, with every term taken at the worker's pre-step x::

    x <- x - eta * g(x) - lam * (x - x_group_leader) - lam_G * (x - x_global_leader)

- Every ``--tau`` steps a worker publishes its parameters and the mean of its last
  ``--leader-window`` mini-batch losses (default tau) into its own shared slot.
- The group leader is the group's worker with the lowest published loss, the global leader the
  lowest of all. The pull toward the group leader comes every tau steps, toward the global
  leader every ``--tau-global`` steps (default 4 tau, as the authors ran it); ``--lam`` and
  ``--lam-global`` default to 0.1, the authors' values. A leader does not pull itself; with one
  group only the global leader is used. Workers are dealt into groups as EASGD-Tree's.
- Asynchronous: a worker reads a leader's slot without waiting for that worker's step. Each slot
  has its own lock, held while it is written (params and loss together) and while it is copied
  out, so a read never sees half of one publication.
- Nesterov momentum (``--momentum``, 0.9 by default, as the authors ran it) acts on the local
  steps only: the pulls move the iterate x and never enter the velocity, and the slots hold x.
- A worker that diverges starts again from its last publication with an empty loss window, so
  one bad loss costs one reset.
- The model reported is the global leader's parameters: LSGD's theory is about the leader, a
  stationary point of the original loss. The average of the workers' slots, the model the
  authors evaluate, is recorded beside it (``average_test_accuracy``).

The authors' code also pulls toward the last leader after every step (a proximal term, off with
``--no_prox``); the paper's equation has no such term, and neither does this.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from .base import Algorithm, Communicator, Option, WorkerContext, deferred
from .groups import GROUP_SIZE, group_of, group_size, members

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from .. import center, rules
    from .. import shared as shm
    from ..shared import SharedState
else:  # loaded when a run starts (base.py)
    torch, center, rules, shm = deferred("torch", "..center", "..rules", "..shared",
                                         package=__package__)


def four_taus(config: Any) -> int:
    return 4 * config.tau


def one_tau(config: Any) -> int:
    return config.tau


LAM = Option("lam", float, "Pull toward the group leader (the authors' value by default).",
             default=0.1, bounds="[0, 1)")
LAM_GLOBAL = Option("lam_global", float, "Pull toward the global leader.", default=0.1,
                    bounds="[0, 1)")
TAU_GLOBAL = Option("tau_global", int, "Steps between pulls toward the global leader (as the "
                    "authors ran it by default); a multiple of --tau.", default=four_taus,
                    default_text="4 * tau", bounds=">= 1")
LEADER_WINDOW = Option("leader_window", int, "Mini-batch losses averaged into the loss a worker "
                       "publishes.", default=one_tau, default_text="tau", bounds=">= 1")


def leader(losses: list[float], candidates: range | list[int]) -> int | None:
    """The candidate with the lowest finite published loss (the first on a tie); None while no
    candidate has published one."""
    best = None
    for r in candidates:
        if math.isfinite(losses[r]) and (best is None or losses[r] < losses[best]):
            best = r
    return best


def slot_name(rank: int) -> str:
    return f"slot{rank}"


def published_losses(shared: SharedState, workers: int) -> list[float]:
    # One float each, read without a lock: a float is read whole.
    return [float(shared[f"{slot_name(r)}.loss"].data[0]) for r in range(workers)]


class LeaderPull(Communicator):
    """An LSGD worker: publish every tau steps (the template's period), then pull toward its
    leaders; toward the global leader only at the multiples of tau_global among them."""

    def __init__(self, ctx: WorkerContext):
        c, opts = ctx.config, ctx.config.resolved_options
        self.rank, self.workers, self.period = ctx.rank, c.workers, c.tau
        self.momentum = c.resolved_momentum
        self.lam, self.lam_global = opts["lam"], opts["lam_global"]
        self.tau_global, self.window = opts["tau_global"], opts["leader_window"]
        size = opts["group_size"]
        self.group = members(group_of(ctx.rank, size), size)
        self.one_group = size == c.workers
        self.shared = ctx.shared
        self.own = center.Link(ctx.shared[slot_name(ctx.rank)], ctx.device)
        self.own_loss = ctx.shared[f"{slot_name(ctx.rank)}.loss"]
        self.peers = {r: center.Link(ctx.shared[slot_name(r)], ctx.device)
                      for r in range(c.workers) if r != ctx.rank}
        self.recent = torch.full((self.window,), math.nan, device=ctx.device)  # last k losses
        self.seen = 0  # losses recorded so far
        self.publications = 0  # of this worker's slot
        self.reads = 0  # leader slots read
        self.numel = self.own.entry.numel

    def start(self, y: Tensor) -> None:
        self.own.pull(y)  # the initial weights, or this worker's last publication

    def reset(self, y: Tensor) -> None:
        """After a divergence: from the last publication, with the bad losses forgotten."""
        self.recent.fill_(math.nan)
        self.seen = 0
        self.start(y)

    def exchange(self, step: int, y: Tensor, v: Tensor | None) -> bool:
        self.timed(self._publish_and_pull, step, y, v)
        return True

    def after_step(self, step: int, y: Tensor, v: Tensor | None, loss: Tensor) -> None:
        """Every step (not on the period): the loss into the window."""
        self.recent[self.seen % self.window] = loss
        self.seen += 1

    def _mean_loss(self) -> float:
        if self.seen == 0:
            return math.inf  # nothing to stand on yet: never a leader
        return float(self.recent[: min(self.seen, self.window)].mean())  # one sync per tau steps

    def _publish_and_pull(self, step: int, y: Tensor, v: Tensor | None) -> None:
        loss = self._mean_loss()
        if (self.seen and not math.isfinite(loss)) or not bool(torch.isfinite(y).all()):
            raise center.Diverged("non-finite parameters or loss")
        x = rules.current_x(y, v, self.momentum)
        host = self.own.to_host(x)
        with self.own.entry.guard():  # params and loss, one publication
            self.own.entry.data.copy_(host)
            self.own_loss.data[0] = loss
        self.publications += 1
        losses = published_losses(self.shared, self.workers)
        targets = []
        if not self.one_group:
            targets.append((leader(losses, self.group), self.lam))
        if step % self.tau_global == 0:
            targets.append((leader(losses, range(self.workers)), self.lam_global))
        pulls = []
        for who, lam in targets:
            if who is None or who == self.rank or lam == 0:
                continue  # no leader yet, or this worker leads: it does not pull itself
            pulls.append((self.peers[who].read_whole(), lam))  # from the pre-step x
            self.reads += 1
        d = rules.leader_pull(x, pulls)
        if d is not None:
            y.sub_(d)  # moves x and the look-ahead alike: the momentum never sees it

    def close(self) -> None:
        self.own.close()
        for peer in self.peers.values():
            peer.close()

    def state_dict(self) -> dict[str, Any]:
        return {"recent": self.recent.cpu(), "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any], y: Tensor) -> None:
        self.recent.copy_(state["recent"])
        self.seen = int(state["seen"])

    @property
    def exchanges(self) -> int:
        return self.publications

    @property
    def bytes(self) -> int:
        # Each publication writes the slot once; each pull reads a leader's slot once.
        return (self.publications + self.reads) * self.numel * 4


class LSGD(Algorithm):
    name = "lsgd"
    summary = "Leader SGD: workers pulled toward the best worker of their group and of all"
    default_step = 0.4  # the effective step lr / (1 - momentum), as eamsgd's (4-worker sweep)
    local_momentum = True  # as the authors ran it (Nesterov momentum 0.9)
    options = (GROUP_SIZE, LAM, LAM_GLOBAL, TAU_GLOBAL, LEADER_WINDOW)
    reports = "the global leader's parameters"

    def validate(self, config: Any) -> None:
        opts = config.resolved_options
        opts["groups"] = config.workers // group_size(config)
        if opts["tau_global"] % config.tau:
            raise ConfigError(f"--tau-global must be a multiple of --tau (got {opts['tau_global']} "
                              f"with --tau {config.tau}): pulls come at publications, every tau steps")

    def shared_state(self, config: Any, init: Tensor, n_params: int) -> SharedState:
        state = shm.SharedState(locked=config.lock)
        for r in range(config.workers):
            state.add(slot_name(r), init)
            state.add(f"{slot_name(r)}.loss", torch.tensor([math.inf]), lock=slot_name(r),
                      dtype=torch.float64)
        return state

    def reported(self, shared: SharedState, config: Any) -> Tensor:
        best = leader(published_losses(shared, config.workers), range(config.workers))
        return shared[slot_name(0 if best is None else best)].snapshot()

    def also_reported(self, shared: SharedState, config: Any) -> dict[str, Tensor]:
        total = shared[slot_name(0)].snapshot()
        for r in range(1, config.workers):
            total.add_(shared[slot_name(r)].snapshot())
        return {"average": total.div_(config.workers)}

    def communicator(self, ctx: WorkerContext) -> Communicator:
        return LeaderPull(ctx)
