"""Elastic Gossip (Pramod, arXiv 1812.02407) and the Gossiping SGD pull it was compared with
(Jin et al. 2016): no center; workers average with each other in pairs.

Elastic Gossip, as the author's code runs it: every ``--gossip-period`` steps, each worker
initiates an exchange with probability ``--gossip-prob`` with one peer chosen uniformly among
the others. The exchange is symmetric and uses the pre-step parameters of both::

    x_i <- x_i - alpha * (x_i - x_j)        x_j <- x_j - alpha * (x_j - x_i)

(alpha = 0.5: both end at the pair's mean), applied after each worker's own optimizer step, and
not entering its momentum buffer. A worker several peers choose exchanges with each.

On one box it is asynchronous. Every worker has a slot and an inbox in shared memory, under one
lock of its own. At each period a worker publishes its pre-step parameters to its slot and
takes in what its inbox holds. An initiator i that picks j takes the two locks in rank order (so
no two exchanges can deadlock), reads x_j from j's slot, and with d = alpha (x_i - x_j) adds d
to j's inbox; after its own step it moves itself by -d. Worker j applies d after its own next
step. No worker ever waits for a peer's step, only for a peer's publication or exchange (a copy
under a lock). What moves between i and j is the same d, so the sum of every worker and every
inbox never changes by an exchange.

Gossiping SGD's pull: only the initiator moves, x_i <- x_i - (x_i - x_j) / 2.

The model reported is the average of the workers (their slots plus what their inboxes hold),
the "aggregate" of the author's tables; worker 0's own accuracy is recorded beside it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..center import Diverged, Link
from ..config import ConfigError
from ..shared import SharedState, SharedTensor
from .base import Algorithm, Communicator, Option, WorkerContext, check_range

GOSSIP_PROB = Option("gossip_prob", float, "Elastic Gossip: probability that a worker initiates "
                     "an exchange each period, in [0, 1] (default: 1/8).")
GOSSIP_PERIOD = Option("gossip_period", int, "Elastic Gossip: steps between a worker's chances "
                       "to initiate an exchange (default: 1).")
DEFAULT_PROB = 1 / 8
DEFAULT_ALPHA = 0.5


def slot(rank: int) -> str:
    return f"slot{rank}"


def inbox(rank: int) -> str:
    return f"inbox{rank}"


class Gossip(Communicator):
    """A gossiping worker (see the module doc). ``symmetric``: Elastic Gossip; otherwise
    Gossiping SGD's pull."""

    def __init__(self, ctx: WorkerContext, symmetric: bool, alpha: float):
        c, opts = ctx.config, ctx.config.resolved_options
        self.rank, self.workers = ctx.rank, c.workers
        self.symmetric, self.alpha = symmetric, alpha
        self.prob, self.period = opts["gossip_prob"], opts["gossip_period"]
        self.own = Link(ctx.shared[slot(ctx.rank)], ctx.device)
        self.box: SharedTensor = ctx.shared[inbox(ctx.rank)]
        self.count: SharedTensor = ctx.shared[f"{inbox(ctx.rank)}.count"]
        self.peers = {r: Link(ctx.shared[slot(r)], ctx.device) for r in range(c.workers) if r != ctx.rank}
        self.boxes = {r: ctx.shared[inbox(r)] for r in range(c.workers) if r != ctx.rank}
        self.counts = {r: ctx.shared[f"{inbox(r)}.count"] for r in range(c.workers) if r != ctx.rank}
        # The decisions to gossip and the peers, drawn from a seeded generator of this rank.
        self.rng = torch.Generator().manual_seed(c.seed * 7919 + ctx.rank)
        self.pending: Tensor | None = None  # -d, applied after the local step
        self.initiated = 0
        self.received = 0
        self.numel = self.own.entry.numel

    def start(self, y: Tensor) -> None:
        self.own.pull(y)

    def choose(self) -> int | None:
        """None (no exchange this period), or the peer, uniformly among the others."""
        if float(torch.rand((), generator=self.rng)) >= self.prob:
            return None
        pick = int(torch.randint(0, self.workers - 1, (), generator=self.rng))
        return pick + (pick >= self.rank)

    def before_step(self, step: int, y: Tensor, v: Tensor | None) -> bool:
        if step % self.period == 0:
            self.timed(self._gossip, y)
        return True

    def _gossip(self, y: Tensor) -> None:
        if not bool(torch.isfinite(y).all()):
            raise Diverged("non-finite parameters")
        self.own.publish(y)  # the pre-step parameters, for the peers that pick this worker
        peer = self.choose()
        if peer is None:
            return
        first, second = sorted((self.rank, peer))
        entries = {r: self.own.entry if r == self.rank else self.peers[r].entry for r in (first, second)}
        with entries[first].guard(), entries[second].guard():  # rank order: no deadlock
            theirs = self.peers[peer].read()
            d = torch.sub(y, theirs).mul_(self.alpha)
            if self.symmetric:
                self.boxes[peer].data.add_(self.own.to_host(d))
                self.counts[peer].data.add_(1)
            self.peers[peer].wait()  # the read is complete before the peer may write again
        self.pending = d
        self.initiated += 1

    def after_step(self, step: int, y: Tensor, v: Tensor | None, loss: Tensor) -> None:
        if self.pending is not None:
            y.sub_(self.pending)  # after the optimizer step; v never sees it
            self.pending = None
        if int(self.count.data):  # read without the lock: only a hint that something came
            self.timed(self._take_inbox, y)

    def _take_inbox(self, y: Tensor) -> None:
        with self.box.guard():
            got = self.box.data.clone()
            self.box.data.zero_()
            self.received += int(self.count.data)
            self.count.data.zero_()
        y.add_(got.to(y.device, non_blocking=True))

    def reset(self, y: Tensor) -> None:
        self.pending = None
        self.own.pull(y)  # its last publication

    def close(self) -> None:
        self.own.close()
        for peer in self.peers.values():
            peer.close()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state(), "initiated": self.initiated}

    def load_state_dict(self, state: dict[str, Any], y: Tensor) -> None:
        self.rng.set_state(state["rng"])
        self.initiated = int(state["initiated"])

    @property
    def exchanges(self) -> int:
        return self.initiated

    @property
    def bytes(self) -> int:
        # Per exchange: the peer's slot read, and (symmetric) d written to its inbox.
        return self.initiated * (2 if self.symmetric else 1) * self.numel * 4


class ElasticGossip(Algorithm):
    name = "elastic-gossip"
    summary = "Elastic Gossip: workers exchange elastically in random pairs, no center"
    elastic = True
    default_step = 0.2  # as easgd
    options = (GOSSIP_PROB, GOSSIP_PERIOD)
    reports = "the average of the workers"
    symmetric = True

    def resolve_alpha(self, config: Any, alpha: float | None, beta: float | None) -> float:
        if beta is not None:
            raise ConfigError(f"--beta does not apply to {self.name} (no center); give --alpha")
        return DEFAULT_ALPHA if alpha is None else alpha

    def validate(self, config: Any) -> None:
        if config.workers < 2:
            raise ConfigError(f"{self.name} needs at least 2 workers (got {config.workers})")
        prob = config.options.get("gossip_prob")
        prob = DEFAULT_PROB if prob is None else prob
        check_range("--gossip-prob", prob, 0, 1)
        period = config.options.get("gossip_period")
        period = 1 if period is None else period
        if period < 1:
            raise ConfigError(f"--gossip-period must be >= 1 (got {period})")
        config.resolved_options.update(gossip_prob=prob, gossip_period=period)

    def shared_state(self, config: Any, init: Tensor, n_params: int) -> SharedState:
        state = SharedState(locked=config.lock)
        for r in range(config.workers):
            state.add(slot(r), init)
            state.add(inbox(r), torch.zeros_like(init), lock=slot(r))
            state.add(f"{inbox(r)}.count", torch.zeros(1), lock=slot(r), dtype=torch.int64)
        return state

    def reported(self, shared: SharedState, config: Any) -> Tensor:
        total = None
        for r in range(config.workers):
            with shared[slot(r)].guard():
                mine = shared[slot(r)].data + shared[inbox(r)].data
            total = mine if total is None else total.add_(mine)
        return total.div_(config.workers)

    def also_reported(self, shared: SharedState, config: Any) -> dict[str, Tensor]:
        return {"worker0": shared[slot(0)].snapshot()}

    def communicator(self, ctx: WorkerContext) -> Communicator:
        return Gossip(ctx, self.symmetric, ctx.config.resolved_alpha)


class GossipSGD(ElasticGossip):
    name = "gossip-sgd"
    summary = "Gossiping SGD's pull: a worker moves halfway to a random peer, the peer does not"
    elastic = False
    symmetric = False

    def communicator(self, ctx: WorkerContext) -> Communicator:
        return Gossip(ctx, False, 0.5)
