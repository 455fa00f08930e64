"""The hierarchy of centers (hierarchy.py): the levels a config makes, the shared tie against
numbers written out by hand, the replicated tie against the paper's synchronous round."""

import contextlib
import threading
import types

import pytest
import torch

from easgd_local import rules
from easgd_local.boxes import Boxes, OneBox
from easgd_local.center import Diverged
from easgd_local.config import TrainConfig
from easgd_local.hierarchy import (REPLICATED, SHARED, Level, hierarchy_of, tie_replicated,
                                   tie_shared_)
from easgd_local.shared import SharedState

from .rules_reference import reference_elastic_round


def _levels(config, boxes=1):
    return [(lv.children, lv.parent, lv.count, lv.period, lv.transport)
            for lv in hierarchy_of(config.validate(), boxes=boxes).levels]


# --- hierarchy_of ------------------------------------------------------------------------------

def test_a_flat_run_is_one_level_of_workers_tied_to_the_center():
    config = TrainConfig(algo="easgd", workers=4, tau=3, beta=0.8)
    assert _levels(config) == [("workers", "center", 4, 3, SHARED)]
    (level,) = hierarchy_of(config).levels
    assert level.beta == pytest.approx(0.8) and level.alpha == pytest.approx(0.2)
    assert level.alpha == pytest.approx(config.resolved_alpha)
    given = TrainConfig(algo="eamsgd", workers=4, alpha=0.3).validate()
    assert hierarchy_of(given).level("workers").alpha == pytest.approx(0.3)


def test_a_run_whose_workers_are_not_tied_to_a_center_has_no_level():
    assert _levels(TrainConfig(algo="downpour", workers=2)) == []
    assert _levels(TrainConfig(algo="elastic-gossip", workers=2)) == []


def test_a_tree_is_workers_to_groups_then_groups_to_the_root():
    """6 workers in groups of 3: each level's alpha is its beta over its own children."""
    config = TrainConfig(algo="easgd-tree", workers=6, tau=2, beta=0.9,
                         options={"group_size": 3, "tau_root": 5, "beta_root": 0.8})
    assert _levels(config) == [("workers", "group", 3, 2, SHARED),
                               ("groups", "root", 2, 5, SHARED)]
    h = hierarchy_of(config)
    assert h.level("workers").alpha == pytest.approx(0.3)
    assert h.level("groups").alpha == pytest.approx(0.4)
    assert h.level("groups").alpha == config.resolved_options["alpha_root"]
    with pytest.raises(KeyError):
        h.level("boxes")


def test_a_tree_of_one_group_has_one_child_under_the_root():
    config = TrainConfig(algo="easgd-tree", workers=4, options={"group_size": 4, "tau_root": 3,
                                                                "beta_root": 0.5})
    assert _levels(config) == [("workers", "group", 4, config.tau, SHARED),
                               ("groups", "root", 1, 3, SHARED)]
    assert hierarchy_of(config).level("groups").alpha == pytest.approx(0.5)  # beta / 1


def test_multi_node_puts_the_boxes_on_top():
    config = TrainConfig(algo="easgd", workers=2, tau=4, multi_node=True, box_tau=3,
                         box_beta=0.6)
    assert _levels(config, boxes=3) == [("workers", "center", 2, 4, SHARED),
                                        ("boxes", "root of the boxes", 3, 3, REPLICATED)]
    boxes = hierarchy_of(config, boxes=3).level("boxes")
    assert boxes.alpha == pytest.approx(0.2)
    assert boxes.describe() == {"children": "boxes", "parent": "root of the boxes", "count": 3,
                                "period": 3, "beta": 0.6, "transport": REPLICATED,
                                "alpha": boxes.alpha}
    tree = TrainConfig(algo="easgd-tree", workers=4, multi_node=True,
                       options={"group_size": 2, "tau_root": 2})
    assert [lv[0] for lv in _levels(tree, boxes=2)] == ["workers", "groups", "boxes"]
    downpour = TrainConfig(algo="downpour", workers=2, multi_node=True)
    assert _levels(downpour, boxes=2) == [("boxes", "root of the boxes", 2, 4, REPLICATED)]


# --- the shared tie -----------------------------------------------------------------------------

def test_the_shared_tie_against_three_exchanges_by_hand():
    """Two groups and a root, alpha = 1/4, values exact in float32. Each exchange:
    d = alpha (group - root), root += d, group -= d, from the values the exchange before left."""
    state = SharedState()
    try:
        g0 = state.add("group0", torch.tensor([1.0, 2.0]))
        g1 = state.add("group1", torch.tensor([-3.0, 5.0]))
        root = state.add("root", torch.tensor([0.0, 0.0]))
        # 1. group 0: d = [0.25, 0.5]
        d = tie_shared_(g0, root, 0.25)
        assert d.tolist() == [0.25, 0.5]
        assert root.data.tolist() == [0.25, 0.5] and g0.data.tolist() == [0.75, 1.5]
        # 2. group 1: d = 1/4 ([-3, 5] - [0.25, 0.5]) = [-0.8125, 1.125]
        d = tie_shared_(g1, root, 0.25)
        assert d.tolist() == [-0.8125, 1.125]
        assert root.data.tolist() == [-0.5625, 1.625] and g1.data.tolist() == [-2.1875, 3.875]
        # 3. group 0 again: d = 1/4 ([0.75, 1.5] - [-0.5625, 1.625]) = [0.328125, -0.03125]
        d = tie_shared_(g0, root, 0.25)
        assert d.tolist() == [0.328125, -0.03125]
        assert root.data.tolist() == [-0.234375, 1.59375]
        assert g0.data.tolist() == [0.421875, 1.53125] and g1.data.tolist() == [-2.1875, 3.875]
        # Mass only moves between the centers: the sum is where it started.
        total = g0.data + g1.data + root.data
        assert total.tolist() == [-2.0, 7.0]
    finally:
        state.close()


def test_the_shared_tie_locks_child_then_parent_and_refuses_a_non_finite_child():
    state = SharedState()
    try:
        child = state.add("group0", torch.tensor([1.0, float("nan")]))
        parent = state.add("root", torch.tensor([0.0, 0.0]))
        order = []

        def recording(name, guard):
            @contextlib.contextmanager
            def guarded():
                order.append(f"take {name}")
                try:
                    with guard():
                        yield
                finally:
                    order.append(f"leave {name}")
            return guarded

        child.guard = recording("child", child.guard)
        parent.guard = recording("parent", parent.guard)
        with pytest.raises(Diverged):
            tie_shared_(child, parent, 0.5)
        assert order == ["take child", "take parent", "leave parent", "leave child"]
        assert parent.data.tolist() == [0.0, 0.0]  # nothing was applied
    finally:
        state.close()


# --- the replicated tie ------------------------------------------------------------------------

def _all_reduce(children: int):
    """A sum over ``children`` threads, each calling it once at the same time: what an
    all-reduce does, without a process group."""
    barrier, deposits = threading.Barrier(children), {}

    def sum_all(t):
        deposits[threading.get_ident()] = t.clone()
        barrier.wait(timeout=30)
        total = sum(deposits.values())
        barrier.wait(timeout=30)  # everyone has read before anyone deposits again
        return total
    return sum_all


def _round(children, parent, alpha, flags):
    """Every child's tie_replicated in a thread of its own, like the boxes' launchers."""
    sum_all, results = _all_reduce(len(children)), [None] * len(children)

    def child_side(k):
        results[k] = tie_replicated(children[k], parent.clone(), alpha, sum_all, flags=[flags[k]])
    threads = [threading.Thread(target=child_side, args=(k,)) for k in range(len(children))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_the_replicated_tie_is_the_papers_synchronous_round():
    gen = torch.Generator().manual_seed(9)
    children = [torch.randn(20, generator=gen) for _ in range(3)]
    parent = torch.randn(20, generator=gen)
    alpha = 0.9 / 3
    want_children, want_parent = reference_elastic_round(children, parent, alpha)
    results = _round(children, parent, alpha, flags=[1.0, 0.0, 1.0])
    for c, want, (d, new_parent, flags) in zip(children, want_children, results):
        torch.testing.assert_close(c - d, want)
        torch.testing.assert_close(new_parent, want_parent)
        assert flags == [2.0]  # the done flags, summed
        # rules.elastic_round, the closed form from the children's mean, agrees.
        d_closed, parent_closed = rules.elastic_round(c, parent, sum(children) / 3, alpha, 3)
        torch.testing.assert_close(d, d_closed)
        torch.testing.assert_close(new_parent, parent_closed)
    # Every replica of the parent takes the same step.
    assert all(torch.equal(r[1], results[0][1]) for r in results)
    # The parent is not the children's mean (that would be a rate of 1, partial averaging).
    assert float((results[0][1] - sum(children) / 3).abs().max()) > 1e-2


def test_the_replicated_tie_refuses_a_non_finite_child_before_sending():
    sent = []
    with pytest.raises(Diverged):
        tie_replicated(torch.tensor([float("inf")]), torch.zeros(1), 0.5, sent.append)
    assert sent == []


# --- who evaluates ------------------------------------------------------------------------------

def test_box_0_alone_evaluates_while_training():
    """The box that does not evaluate says so itself; its configuration is left as given."""
    config = TrainConfig(algo="easgd", workers=1, multi_node=True).validate()
    assert OneBox().evaluates and OneBox().boxes == 1
    for rank, evaluates in ((0, True), (1, False)):
        box = Boxes(types.SimpleNamespace(rank=rank, world=2), config)
        assert box.evaluates is evaluates and box.boxes == 2
    assert config.eval_every is None


def test_levels_are_plain_values():
    level = Level("boxes", "root of the boxes", 4, 2, 0.8, REPLICATED)
    assert level.alpha == pytest.approx(0.2)
    with pytest.raises(Exception):
        level.beta = 0.5  # frozen: a level is data
