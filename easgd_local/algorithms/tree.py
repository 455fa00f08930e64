"""EASGD-Tree: workers under local (group) centers, the group centers tied elastically to a root.

The tree of Zhang's thesis (arXiv 1605.02216) hangs workers off local centers and local centers
off a root, each level with its own period. Its exact equations could not be recovered here, so
this is the thesis's idea built from the paper's own exchange: **each node tied elastically to
its parent, with its own period**. It is two levels of the hierarchy of centers
(hierarchy.py; ``hierarchy_of`` builds them from the config):

- workers -> group centers: workers are dealt into groups of ``--group-size`` (default: one
  device group, groups.py); every ``--tau`` local steps a worker makes the elastic exchange of
  Algorithm 1 with its group's center: d = alpha (x - c_g), x -= d, c_g += d, with
  alpha = beta / group size.
- groups -> root: every ``--tau-root`` exchanges of a group, the group's center makes the same
  exchange with the root (``hierarchy.tie_shared_``): d = alpha_root (c_g - root), c_g -= d,
  root += d, with alpha_root = beta_root / groups.
- The model reported is the root; under ``--multi-node`` it is the box center the level of the
  boxes ties to the other boxes' (multinode.py).

Who performs the group-to-root exchange: the worker whose exchange is the group's
tau_root-th, right after it, in its own process and on the CPU (both centers are in shared
memory, so no device is involved). The group's exchange count is kept beside its center and
incremented under the group's lock, so exactly one worker sees each multiple of tau_root. The
shared tie holds the group's lock, then the root's (always in that order, so two groups' root
exchanges and a group's worker exchanges can never deadlock), reads both centers whole, adds d
to the root, then subtracts it from the group center.

A worker killed in the middle of it (the kernel drops its locks) has added part of d to the
root and none of it taken from the group center: the root has moved part of the way toward the
group, the group center not at all, a smaller elastic step than asked for. No lock stays held.

Traffic: ``bytes_exchanged`` counts what moves to and from the root (the top of the tree, the
link that crosses device groups); exchanges with a group center stay inside a device group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Algorithm, Communicator, LinkCommunicator, Option, WorkerContext, deferred
from .elastic import WEIGHTING, DynamicWeighting, add_weighting_entries, check_weighting
from .groups import GROUP_SIZE, group_of, group_size

if TYPE_CHECKING:
    from torch import Tensor

    from .. import center, hierarchy
    from .. import shared as shm
    from ..center import CenterLink
    from ..hierarchy import Level
    from ..shared import SharedState, SharedTensor
else:  # loaded when a run starts (base.py)
    center, hierarchy, shm = deferred("..center", "..hierarchy", "..shared", package=__package__)

TAU_ROOT = Option("tau_root", int, "Exchanges of a group with its center between two exchanges "
                  "of that center with the root.", default=4, bounds=">= 1")
BETA_ROOT = Option("beta_root", float, "Moving rate of the group-to-root exchange as "
                   "beta_root = groups * alpha_root.", default=0.9, bounds="(0, 1]")


def root_exchange_(group: SharedTensor, root: SharedTensor, alpha_root: float) -> Tensor:
    """The group center's elastic exchange with the root, in place in shared memory: the
    hierarchy's shared tie (group lock then root lock, d added to the root first). Returns d."""
    return hierarchy.tie_shared_(group, root, alpha_root)


class TreeExchange(LinkCommunicator):
    """A worker of EASGD-Tree: exchanges with its group center every ``tau`` steps at rate
    ``alpha``, and every ``groups.period``-th exchange of its group, the group center's tie to
    the root on the hierarchy's level of the groups (its rate ``groups.alpha``)."""

    def __init__(self, link: CenterLink, count: SharedTensor, root: SharedTensor, *, tau: int,
                 alpha: float, groups: Level, weighting: DynamicWeighting | None = None):
        self.link, self.count, self.root, self.weighting = link, count, root, weighting
        self.group = link.entry
        self.period, self.alpha, self.groups = tau, alpha, groups
        self.root_exchanges = 0

    def start(self, y: Tensor) -> None:
        self.link.pull(y)  # a worker (re)starts from its group's center
        if self.weighting is not None:
            self.weighting.rejoin()

    def exchange(self, step: int, y: Tensor, v: Tensor | None) -> bool:
        """Every tau steps (the template's period): the exchange with the group's center."""
        self.timed(self._exchange, y)
        return True

    def _exchange(self, y: Tensor) -> None:
        alpha = self.alpha if self.weighting is None else self.weighting.rate()
        if self.link.exchange(y, alpha, under_lock=self._counted):
            hierarchy.tie_shared_(self.group, self.root, self.groups.alpha)
            self.root_exchanges += 1

    def _counted(self) -> bool:
        """Under the group's lock: count this exchange; True for the group's period-th."""
        if self.weighting is not None:
            self.weighting.record()  # counts it in the same clock
        else:
            self.count.data.add_(1)
        return int(self.count.data) % self.groups.period == 0

    @property
    def bytes(self) -> int:
        # The root read and the difference written back, per root exchange.
        return self.root_exchanges * 2 * self.root.numel * 4


class EASGDTree(Algorithm):
    name = "easgd-tree"
    summary = "EASGD tree: workers exchange with a group center, group centers with a root"
    box_center = "root"
    elastic = True
    default_step = 0.2  # as easgd
    options = (GROUP_SIZE, TAU_ROOT, BETA_ROOT, WEIGHTING)
    reports = "the root"

    def validate(self, config: Any) -> None:
        opts = config.resolved_options
        groups = config.workers // group_size(config)
        opts.update(groups=groups, alpha_root=opts["beta_root"] / groups)
        check_weighting(config)

    def resolve_alpha(self, config: Any, alpha: float | None, beta: float | None) -> float:
        if alpha is not None:
            return alpha
        return (self.default_beta if beta is None else beta) / group_size(config)

    def shared_state(self, config: Any, init: Tensor, n_params: int) -> SharedState:
        state = shm.SharedState(locked=config.lock)
        state.add("root", init)
        for g in range(config.resolved_options["groups"]):
            center.SharedCenter(init, state=state, name=f"group{g}", n_params=n_params)
            add_weighting_entries(state, f"group{g}", config.resolved_options["group_size"])
        return state

    def reported(self, shared: SharedState, config: Any) -> Tensor:
        return shared["root"].snapshot()

    def communicator(self, ctx: WorkerContext) -> Communicator:
        c, opts = ctx.config, ctx.config.resolved_options
        size = opts["group_size"]
        g = group_of(ctx.rank, size)
        group = center.SharedCenter(state=ctx.shared, name=f"group{g}", n_params=ctx.n_params)
        weighting = None
        if opts.get("weighting") == "dynamic":
            weighting = DynamicWeighting(ctx.shared, f"group{g}", ctx.rank - g * size,
                                         c.resolved_alpha * size)
        return TreeExchange(center.CenterLink(group, ctx.device), ctx.shared[f"group{g}.clock"],
                            ctx.shared["root"], tau=c.tau, alpha=c.resolved_alpha,
                            groups=hierarchy.hierarchy_of(c).level("groups"),
                            weighting=weighting)
