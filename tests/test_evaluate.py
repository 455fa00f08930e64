"""Evaluation within a budget: spacing from the measured cost, no backlog in live mode, a fixed
subset while training and the whole test set at the end, and deferred snapshots never dropped
without a word."""

import json
import os
import threading
import time

import pytest
import torch

from easgd_local.config import TrainConfig
from easgd_local.data import load_split
from easgd_local.evaluate import Cancelled, EvalScheduler, Evaluation, SnapshotSpool
from easgd_local.launcher import train

from .helpers import assert_no_leftovers, leftovers_snapshot


class FakeEvaluator:
    """Costs what it is told; blocks until released when ``gate`` is given."""

    def __init__(self, cost=0.1, gate=None):
        self.cost, self.gate, self.seen = cost, gate, []

    def evaluate(self, flat, cancel=None, full=True):
        if self.gate is not None:
            self.gate.wait(10)
        if cancel is not None and cancel.is_set():
            raise Cancelled()  # as the real one does between batches
        self.seen.append((float(flat[0]), full))
        return Evaluation(1.0, 0.5, 10, not full, self.cost)


def _scheduler(tmp_path, evaluator, deferred=False, every=None, budget=0.1, units=2, records=None):
    return EvalScheduler(evaluator, (records if records is not None else []).append,
                         deferred=deferred, every=every, budget=budget, units=units,
                         spool_dir=tmp_path / "spool")


def test_interval_is_the_measured_cost_over_the_budget(tmp_path):
    s = _scheduler(tmp_path, FakeEvaluator(cost=0.3), budget=0.1, units=2)
    try:
        assert s.measure(torch.zeros(4)) == 0.3
        assert s.interval == pytest.approx(0.3 / (0.1 * 2))
        # --eval-every overrides the budget.
        s.every = 7.0
        assert s.interval == 7.0
    finally:
        s.close()


def test_live_mode_never_builds_a_backlog(tmp_path):
    """While an evaluation runs, due snapshots are not taken: at most one is ever in flight."""
    gate = threading.Event()
    records = []
    s = _scheduler(tmp_path, FakeEvaluator(gate=gate), every=0.01, records=records)
    taken = []

    def take():
        taken.append(len(taken))
        return torch.full((4,), float(len(taken))), {"seconds": float(len(taken))}

    s.start(time.perf_counter())
    try:
        deadline = time.perf_counter() + 0.3
        while time.perf_counter() < deadline:
            s.tick(time.perf_counter(), take)
            time.sleep(0.005)
        assert len(taken) == 1  # the first evaluation is still blocked: nothing else was taken
        gate.set()
        deadline = time.perf_counter() + 0.3
        while time.perf_counter() < deadline:
            s.tick(time.perf_counter(), take)
            time.sleep(0.02)
        s.finish()
    finally:
        gate.set()
        s.close()
    assert len(taken) > 3 and len(records) == len(taken)  # every snapshot taken was evaluated
    assert all(r["eval_subset"] for r in records)  # while training: the subset


def test_spool_keeps_every_snapshot_in_order_and_cleans_up(tmp_path):
    spool = SnapshotSpool(tmp_path / "spool", memory_bytes=3 * 4 * 4)  # room for 3 of 4 floats
    for i in range(10):
        spool.put(torch.full((4,), float(i)), {"i": i})
    assert spool.spooled == 7 and spool.dropped == 0
    assert len(list((tmp_path / "spool").iterdir())) == 7
    got = [(float(t[0]), meta["i"]) for t, meta in spool.drain()]
    assert got == [(float(i), i) for i in range(10)]
    assert list((tmp_path / "spool").iterdir()) == []  # each file deleted once read
    spool.close()
    assert not (tmp_path / "spool").exists()


def test_spool_counts_a_snapshot_it_cannot_keep(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    spool = SnapshotSpool(blocker / "spool", memory_bytes=0)  # its directory cannot be made
    spool.put(torch.zeros(4), {})
    spool.put(torch.zeros(4), {})
    assert spool.dropped == 2 and len(spool) == 0
    assert sum("cannot keep a snapshot" in r.message for r in caplog.records) == 1


def test_deferred_scheduler_evaluates_everything_after_training(tmp_path):
    records = []
    evaluator = FakeEvaluator()
    s = _scheduler(tmp_path, evaluator, deferred=True, every=0.01, records=records)
    s.spool.memory_bytes = 4 * 4  # one in memory, the rest spooled
    n = 0

    def take():
        nonlocal n
        n += 1
        return torch.full((4,), float(n)), {"seconds": float(n)}

    s.start(time.perf_counter())
    for _ in range(6):
        time.sleep(0.02)
        s.tick(time.perf_counter(), take)
    assert evaluator.seen == []  # nothing evaluated while training
    s.finish()
    assert [r["seconds"] for r in records] == [float(i) for i in range(1, n + 1)] and n == 6
    assert not (tmp_path / "spool").exists()


def test_subset_is_fixed_and_seeded():
    data = load_split("mnist10k", "datasets", train=False, device="cpu")
    a, b = data.subset(300, 5), data.subset(300, 5)
    assert len(a) == 300 and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    assert not torch.equal(a.labels, data.subset(300, 6).labels)
    assert data.subset(10_000, 5) is data  # no more than there is


@pytest.mark.slow
def test_records_say_which_test_set_and_the_last_is_whole(tmp_path):
    before = leftovers_snapshot()
    config = TrainConfig(out=tmp_path / "run", quiet=True, workers=2, steps=300, eval_every=0.3,
                         eval_samples=500)
    s = train(config)
    assert_no_leftovers(before)
    records = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) >= 2
    assert all(r["eval_samples"] == 500 and r["eval_subset"] for r in records[:-1])
    assert records[-1]["eval_samples"] == 2000 and not records[-1]["eval_subset"]
    assert s["final_test_accuracy"] == records[-1]["test_accuracy"]
    assert s["eval_snapshots"] == len(records) - 1 and s["snapshots_dropped"] == 0
    assert 0 < s["eval_share"] < 1 and s["finish_seconds"] >= 0


@pytest.mark.slow
def test_default_spacing_keeps_evaluation_near_its_budget(tmp_path):
    """Without --eval-every, evaluation's CPU time is about --eval-budget of the run's compute
    (a share of CPU seconds, not a wall-clock bound: generous, for a busy machine)."""
    config = TrainConfig(out=tmp_path / "run", quiet=True, workers=2, time_limit=6.0,
                         eval_budget=0.1)
    s = train(config)
    assert s["eval_snapshots"] >= 1
    assert s["eval_share"] < 2 * 0.1, s
    assert os.listdir(config.out).count(".snapshots") == 0


def test_a_cancelled_evaluator_never_holds_up_the_shutdown(tmp_path):
    """Interrupted: the thread stops at the cancel; a snapshot due just after must not be handed
    to it (nobody would take it, and closing would wait for it forever)."""
    gate = threading.Event()
    s = _scheduler(tmp_path, FakeEvaluator(gate=gate), every=0.0)
    s.start(time.perf_counter())
    s.tick(time.perf_counter(), lambda: (torch.zeros(4), {"seconds": 0.0}))
    s.cancel.set()  # the signal
    gate.set()
    s.thread.join(5)
    taken = s.taken
    s.tick(time.perf_counter(), lambda: (torch.zeros(4), {"seconds": 1.0}))
    assert s.taken == taken
    done = threading.Event()
    threading.Thread(target=lambda: (s.close(), done.set()), daemon=True).start()
    assert done.wait(5)
