"""Elastic Gossip (Pramod, arXiv 1812.02407) and the Gossiping SGD pull it was compared with
(Jin et al. 2016): no center; workers average with each other in pairs.

Elastic Gossip, as the author's code runs it: every ``--gossip-period`` steps, each worker
initiates an exchange with probability ``--gossip-prob`` with one peer chosen uniformly among
the others. The exchange is symmetric (rules.pair_difference)::

    d = alpha * (x_i - x_j)        x_i <- x_i - d        x_j <- x_j + d

(alpha = 0.5: both end at the pair's mean), the gradient taken before it, the move kept out of
the momentum buffer. Whatever the gossip rate, gossip alone (no gradients) drives the spread
between the workers to zero and never changes their sum.

On one box it is asynchronous. A worker's parameters live in its own process; what its peers
see of it is two entries in shared memory under one lock of its own: its **slot**, x as it
last published it, and its **inbox**, the moves its peers made to it since. Its current value
as its peers know it is ``slot + inbox``, exact up to the local steps it has made since it
published (at most one period of them). At each period a worker, under its own lock, takes in
its inbox and publishes. An initiator i that picks j holds both locks (in rank order, so no two
exchanges can deadlock) for the whole exchange: it takes in its own inbox, reads
x_j = slot_j + inbox_j, adds d to j's inbox, moves itself by -d and publishes. So every
exchange acts on current values, one at a time per pair: when two workers pick each other in
the same period, the second exchange finds them already at their mean and moves nothing (the
author's synchronous code counts such a pair once). Worker j takes d in at its next period.

What moves between i and j is the same d, in one critical section, so the sum of every worker
and every inbox is conserved by every exchange. A worker that diverges, or a new process of a
rank that died, starts again from ``slot + inbox``: its last publication and every move made to
it since, so nothing its peers sent is lost.

Gossiping SGD's pull: only the initiator moves, x_i <- x_i - (x_i - x_j) / 2.

The model reported is the average of the workers (their slots plus their inboxes), the
"aggregate" of the author's tables; worker 0's own accuracy is recorded beside it. Both lag
the workers by at most one period of local steps; at the end every worker publishes its last.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from .base import Algorithm, Communicator, Option, WorkerContext, deferred

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from .. import center, rules
    from .. import shared as shm
    from ..shared import SharedState, SharedTensor
else:  # loaded when a run starts (base.py)
    torch, center, rules, shm = deferred("torch", "..center", "..rules", "..shared",
                                         package=__package__)

GOSSIP_PROB = Option("gossip_prob", float, "Probability that a worker initiates an exchange each "
                     "period (the author swept 1/8 down to 1/2048).", default=1 / 8,
                     default_text="1/8", bounds="[0, 1]")
GOSSIP_PERIOD = Option("gossip_period", int, "Steps between a worker's chances to initiate an "
                       "exchange.", default=1, bounds=">= 1")
DEFAULT_ALPHA = 0.5


def slot(rank: int) -> str:
    return f"slot{rank}"


def inbox(rank: int) -> str:
    return f"inbox{rank}"


def known_value(shared: SharedState, rank: int) -> Tensor:
    """A worker's value as its peers know it, slot + inbox (a new tensor, under its lock)."""
    with shared[slot(rank)].guard():
        return shared[slot(rank)].data + shared[inbox(rank)].data


class Gossip(Communicator):
    """A gossiping worker (see the module doc). ``symmetric``: Elastic Gossip; otherwise
    Gossiping SGD's pull. Its period is --gossip-period: at each, the worker takes its inbox
    in, publishes, and draws whether it initiates an exchange and with whom (the draw is the
    random part of its schedule, inside the period's hook)."""

    def __init__(self, ctx: WorkerContext, symmetric: bool, alpha: float, momentum: float):
        c, opts = ctx.config, ctx.config.resolved_options
        self.rank, self.workers = ctx.rank, c.workers
        self.symmetric, self.alpha, self.momentum = symmetric, alpha, momentum
        self.prob, self.period = opts["gossip_prob"], opts["gossip_period"]
        self.shared = ctx.shared
        # Staging between the worker's device and shared memory (one set, whichever the peer).
        self.own = center.Link(ctx.shared[slot(ctx.rank)], ctx.device)
        self.box: SharedTensor = ctx.shared[inbox(ctx.rank)]
        self.count: SharedTensor = ctx.shared[f"{inbox(ctx.rank)}.count"]
        self.numel = self.own.entry.numel
        self.peer_host = torch.empty(self.numel, pin_memory=self.own.cuda)
        # The decisions to gossip and the peers, drawn from a seeded generator of this rank.
        self.rng = torch.Generator().manual_seed(c.seed * 7919 + ctx.rank)
        self.initiated = 0
        self.published = 0
        self.received = 0
        self.taken_at_start: Tensor | None = None

    def _here(self, host: Tensor) -> Tensor:
        """A host tensor where the worker computes (a DMA copy on a GPU, ordered on its stream)."""
        if not self.own.cuda:
            return host
        return self.own.c_dev.copy_(host, non_blocking=True)

    def _take_inbox(self, y: Tensor) -> Tensor | None:
        """Under this worker's lock: y += its inbox, which is emptied. Returns what was taken
        (None: nothing had come)."""
        if not int(self.count.data):
            return None
        got = self.box.data.clone()
        y.add_(self._here(got))
        self.box.data.zero_()
        self.received += int(self.count.data)
        self.count.data.zero_()
        return got

    def _publish(self, x: Tensor) -> None:
        """Under this worker's lock: slot = x."""
        self.own.entry.data.copy_(self.own.to_host(x))
        self.published += 1

    def start(self, y: Tensor) -> None:
        """From slot + inbox: the initial weights, or after a restart or a divergence this
        rank's last publication and every move its peers made to it since."""
        with self.own.entry.guard():
            y.copy_(self.own.entry.data)
            self.taken_at_start = self._take_inbox(y)
            self._publish(y)

    def choose(self) -> int | None:
        """None (no exchange this period), or the peer, uniformly among the others."""
        if float(torch.rand((), generator=self.rng)) >= self.prob:
            return None
        pick = int(torch.randint(0, self.workers - 1, (), generator=self.rng))
        return pick + (pick >= self.rank)

    def exchange(self, step: int, y: Tensor, v: Tensor | None) -> bool:
        self.timed(self._gossip, y, v)
        return True

    def _gossip(self, y: Tensor, v: Tensor | None) -> None:
        if not bool(torch.isfinite(y).all()):
            raise center.Diverged("non-finite parameters")
        peer = self.choose()
        pair = sorted({self.rank, peer} - {None})
        with contextlib.ExitStack() as held:
            for r in pair:  # in rank order: no two exchanges can deadlock
                held.enter_context(self.shared[slot(r)].guard())
            self._take_inbox(y)
            x = rules.current_x(y, v, self.momentum)
            if peer is not None:
                self._exchange(peer, y, x)
            self._publish(x)

    def _exchange(self, peer: int, y: Tensor, x: Tensor) -> None:
        """Under both locks: d from both current values; the peer's inbox += d, this worker -d."""
        theirs = torch.add(self.shared[slot(peer)].data, self.shared[inbox(peer)].data,
                           out=self.peer_host)
        d = rules.pair_difference(x, self._here(theirs), self.alpha, out=self.own.d)
        if self.symmetric:
            self.shared[inbox(peer)].data.add_(self.own.to_host(d))
            self.shared[f"{inbox(peer)}.count"].data.add_(1)
        else:
            self.own.wait()  # the peer's value is read before its lock is let go
        y.sub_(d)  # moves x and the look-ahead alike: the momentum never sees it
        if x is not y:
            x.sub_(d)
        self.initiated += 1

    def finish(self, y: Tensor, v: Tensor | None) -> None:
        """Publish the last parameters, with what the inbox holds, for the final evaluation."""
        if not bool(torch.isfinite(y).all()):
            raise center.Diverged("non-finite parameters")
        with self.own.entry.guard():
            self._take_inbox(y)
            self._publish(rules.current_x(y, v, self.momentum))

    def close(self) -> None:
        self.own.close()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state(), "initiated": self.initiated,
                "published": self.published}

    def load_state_dict(self, state: dict[str, Any], y: Tensor) -> None:
        self.rng.set_state(state["rng"])
        self.initiated = int(state["initiated"])
        self.published = int(state.get("published", 0))
        # y is now the saved worker's; what start() took from the inbox belongs to it too.
        if self.taken_at_start is not None:
            y.add_(self._here(self.taken_at_start))
            self.taken_at_start = None

    @property
    def exchanges(self) -> int:
        return self.initiated

    @property
    def bytes(self) -> int:
        # Each publication writes the slot; each exchange reads the peer's slot and inbox and,
        # symmetric, writes d to its inbox.
        per_exchange = 3 if self.symmetric else 2
        return (self.published + per_exchange * self.initiated) * self.numel * 4


class ElasticGossip(Algorithm):
    name = "elastic-gossip"
    summary = "Elastic Gossip: workers exchange elastically in random pairs, no center"
    elastic = True
    default_step = 0.4  # the effective step lr / (1 - momentum), as eamsgd's (4-worker sweep)
    options = (GOSSIP_PROB, GOSSIP_PERIOD)
    reports = "the average of the workers"
    symmetric = True
    local_momentum = True  # as the author ran it (Nesterov momentum, 0.99 on MNIST, 0.9 on CIFAR)

    def resolve_alpha(self, config: Any, alpha: float | None, beta: float | None) -> float:
        if beta is not None:
            raise ConfigError(f"--beta does not apply to {self.name} (no center); give --alpha")
        return DEFAULT_ALPHA if alpha is None else alpha

    def validate(self, config: Any) -> None:
        if config.workers < 2:
            raise ConfigError(f"{self.name} needs at least 2 workers (got {config.workers})")

    def shared_state(self, config: Any, init: Tensor, n_params: int) -> SharedState:
        state = shm.SharedState(locked=config.lock)
        for r in range(config.workers):
            state.add(slot(r), init)
            state.add(inbox(r), torch.zeros_like(init), lock=slot(r))
            state.add(f"{inbox(r)}.count", torch.zeros(1), lock=slot(r), dtype=torch.int64)
        return state

    def reported(self, shared: SharedState, config: Any) -> Tensor:
        total = known_value(shared, 0)
        for r in range(1, config.workers):
            total.add_(known_value(shared, r))
        return total.div_(config.workers)

    def also_reported(self, shared: SharedState, config: Any) -> dict[str, Tensor]:
        return {"worker0": known_value(shared, 0)}

    def communicator(self, ctx: WorkerContext) -> Communicator:
        return Gossip(ctx, self.symmetric, self.pair_rate(ctx.config), ctx.config.resolved_momentum)

    def pair_rate(self, config: Any) -> float:
        return config.resolved_alpha


class GossipSGD(ElasticGossip):
    name = "gossip-sgd"
    summary = "Gossiping SGD's pull: a worker moves halfway to a random peer, the peer does not"
    elastic = False
    symmetric = False

    def pair_rate(self, config: Any) -> float:
        return 0.5  # halfway to the peer
