"""The hierarchy of centers: a tree of centers, each level's children tied elastically to their
parent with the level's own period and moving rate.

A run is a stack of levels, bottom up. A flat EASGD run has one: the workers tied to the
center. EASGD-Tree has two: the workers tied to their group's center, the group centers tied to
the root. ``--multi-node`` puts one more on top: each box's center (its center, or its tree's
root) tied to a root replicated on every box. Every level has

- its children ("workers", "groups", "boxes") and how many of them share one parent;
- its period: the children's exchanges (a worker's: its local steps) between two ties;
- its moving rate beta, and alpha = beta / children (the paper's beta = p * alpha);
- its transport: ``shared`` (the parent in shared memory, each child adding its move under
  the parent's lock whenever it is due: asynchronous) or ``replicated`` (a copy of the parent
  on every box, the children's moves summed by one all-reduce: synchronous).

One rule for every level, the elastic exchange of EASGD::

    d = alpha * (child - parent)        child -= d        parent += sum of the children's d

``tie`` computes d; ``tie_shared_`` and ``tie_replicated`` apply it over the two transports. In
the replicated case every child's d comes from the same pre-round parent, so the parent's move
r + sum_k alpha (c_k - r) = r + K alpha (mean_k c_k - r) is ``rules.elastic_round``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from . import rules
from .center import Diverged
from .shared import SharedTensor, crash_halfway, crash_signal

SHARED = "shared"  # the parent in shared memory; asynchronous locked additions
REPLICATED = "replicated"  # the parent replicated on every box; the sum by one all-reduce


@dataclass(frozen=True)
class Level:
    """One level of the tree: ``count`` children of kind ``children`` tied to one ``parent``
    every ``period`` of the children's exchanges, at the rate beta (alpha = beta / count)."""

    children: str
    parent: str
    count: int
    period: int
    beta: float
    transport: str

    @property
    def alpha(self) -> float:
        return self.beta / self.count

    def describe(self) -> dict[str, Any]:
        """The level as summary.json lists it."""
        return {**asdict(self), "alpha": self.alpha}


@dataclass(frozen=True)
class Hierarchy:
    """The levels of a run, bottom up (the workers' first, the boxes' last, if any)."""

    levels: tuple[Level, ...]

    def level(self, children: str) -> Level:
        """The level whose children are ``children``; KeyError when the run has none."""
        for level in self.levels:
            if level.children == children:
                return level
        raise KeyError(f"no level of {children} in this run")

    def describe(self) -> list[dict[str, Any]]:
        return [level.describe() for level in self.levels]


def hierarchy_of(config: Any, boxes: int = 1) -> Hierarchy:
    """The levels of a validated run: the workers' level when they are tied elastically to a
    center (an elastic algorithm with one: not gossip's pairs, not DOWNPOUR's pushes), the
    groups' when the algorithm has a root over group centers (its ``tau_root`` option), and with
    --multi-node the boxes' (``boxes`` of them, torchrun's world size) on top."""
    algorithm, opts = config.algorithm, config.resolved_options
    levels = []
    top = algorithm.box_center
    if algorithm.elastic and top is not None:
        tree = "tau_root" in opts
        count = opts["group_size"] if tree else config.workers
        levels.append(Level("workers", "group" if tree else top, count, config.tau,
                            config.resolved_alpha * count, SHARED))
        if tree:
            levels.append(Level("groups", top, opts["groups"], opts["tau_root"],
                                opts["beta_root"], SHARED))
    if config.multi_node:
        levels.append(Level("boxes", "root of the boxes", boxes, config.box_tau, config.box_beta,
                            REPLICATED))
    return Hierarchy(tuple(levels))


@torch.no_grad()
def tie(child: Tensor, parent: Tensor, alpha: float) -> Tensor:
    """d = alpha * (child - parent), the move of one elastic tie (a new tensor); Diverged when a
    value is not finite, so that a parent never takes a non-finite move."""
    d = rules.elastic_difference(child, parent, alpha)
    if not bool(torch.isfinite(d).all()):
        raise Diverged("non-finite child of an elastic tie")
    return d


@torch.no_grad()
def tie_shared_(child: SharedTensor, parent: SharedTensor, alpha: float) -> Tensor:
    """One child's tie to a parent, both in shared memory, in place: child -= d, parent += d.

    The locks are taken in a fixed order, the child's then the parent's (so two children's ties
    and the child's own exchanges with its children never deadlock); both are read whole under
    them. d is added to the parent first, then taken from the child: a process killed in between
    leaves the parent moved part of the way toward the child and the child where it was, a
    smaller elastic step than asked for, and no lock held. Returns d."""
    with child.guard():
        with parent.guard():
            d = tie(child.data, parent.data, alpha)
            if parent.crash_in_lock:
                crash_halfway(parent.data, d, crash_signal(parent.crash_in_lock))
            parent.data.add_(d)
            child.data.sub_(d)
    return d


@torch.no_grad()
def tie_replicated(child: Tensor, parent: Tensor, alpha: float,
                   sum_all: Callable[[Tensor], Tensor],
                   flags: Sequence[float] = ()) -> tuple[Tensor, Tensor, list[float]]:
    """One synchronous round of a child with a parent replicated on every box.

    ``sum_all`` sums a tensor over the children (an all-reduce; every child calls it at once).
    Each child sends its d = alpha * (child - parent), from the pre-round values, followed by
    ``flags`` (numbers summed with it: a done flag). Returns (d, the parent's new value, the
    summed flags): the caller moves its child by -d; every replica of the parent, seeing the same
    sum, takes the same step."""
    d = tie(child, parent, alpha)
    n = d.numel()
    buf = torch.cat([d.reshape(-1).to(torch.float32),
                     torch.tensor([float(f) for f in flags], dtype=torch.float32)])
    total = sum_all(buf)
    return d, parent + total[:n].to(parent.dtype).view_as(parent), total[n:].tolist()
