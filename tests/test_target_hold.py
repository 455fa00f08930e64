"""--target-hold: a run evaluated while it trains goes on past its first crossing of
--target-accuracy for a share of the time that took (at least 3 s), then stops."""

import json
from types import SimpleNamespace

import pytest
import torch

from easgd_local.config import TrainConfig
from easgd_local.control import STOP
from easgd_local.launcher import train
from easgd_local.records import MIN_HOLD_SECONDS, Records

from .helpers import assert_no_leftovers, leftovers_snapshot


def _stops(hold, accuracies, every=1.0):
    """Feed Records.record evaluations ``every`` seconds apart; the index of the one after
    which STOP is set (None: never)."""
    records = Records.__new__(Records)  # only what record() touches
    records.config = TrainConfig(target_accuracy=0.5, target_hold=hold)
    records.ch = SimpleNamespace(control=torch.zeros(STOP + 1, dtype=torch.int64))
    records.out = SimpleNamespace(append_metrics=lambda record: None)
    records.reporter = SimpleNamespace(evaluated=lambda record: None)
    records.metrics_lost, records.reached_at = False, None
    for i, accuracy in enumerate(accuracies):
        records.record({"seconds": every * (i + 1), "samples": 0, "steps": [], "train_loss": None,
                        "test_loss": 1.0, "test_accuracy": accuracy, "eval_samples": 10,
                        "eval_subset": True})
        if records.ch.control[STOP]:
            return i
    return None


def test_the_hold_counts_from_the_first_crossing():
    # Crossed at 2 s: no hold stops there; a hold of 0.5 trains on max(3, 1) = 3 s, to 5 s.
    assert _stops(0.0, [0.4, 0.6, 0.7]) == 1
    assert _stops(0.5, [0.4, 0.6, 0.7, 0.7, 0.7, 0.7]) == 4
    # A dip below the target does not restart the count; only a record at the target stops.
    assert _stops(0.5, [0.4, 0.6, 0.4, 0.7, 0.45, 0.6]) == 5
    # Past 6 s a share of 0.5 is more than 3 s: crossed at 8 s, it trains on to 12 s.
    assert _stops(0.5, [0.1] * 7 + [0.6] * 6) == 11
    assert _stops(0.5, [0.4, 0.45]) is None and _stops(0.0, [0.4]) is None


def _run(tmp_path, hold):
    """(train_seconds, the records taken while training), of sgd to 50% with ``hold``."""
    before = leftovers_snapshot()
    config = TrainConfig(algo="sgd", lr=0.1, out=tmp_path / f"hold{hold}", quiet=True,
                         target_accuracy=0.5, target_hold=hold, time_limit=240.0,
                         eval_every=0.25, eval_deferred=False)
    summary = train(config)
    assert_no_leftovers(before)
    records = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    return summary["train_seconds"], records[:-1]  # the last: the final evaluation


def _crossing(records):
    return next(r["seconds"] for r in records if r["test_accuracy"] >= 0.5)


def _stopped(records, seconds, until):
    """The index of the record that stopped the run: the first at the target from ``until``
    on. At most one more follows it (a snapshot taken before the workers saw the stop), and
    training ended soon after it."""
    index = next(i for i, r in enumerate(records)
                 if r["test_accuracy"] >= 0.5 and r["seconds"] >= until)
    assert len(records) - index <= 2
    assert records[index]["seconds"] <= seconds < records[index]["seconds"] + STOP_LATENCY
    return index


# From the snapshot that stops a run to the end of its training: that snapshot's evaluation,
# then the workers' next step (generous: a loaded machine evaluates and steps slowly).
STOP_LATENCY = 30.0


@pytest.mark.slow
def test_a_run_trains_on_past_its_crossing_then_stops(tmp_path):
    seconds, records = _run(tmp_path, 0.5)
    crossed = _crossing(records)
    until = crossed + max(MIN_HOLD_SECONDS, 0.5 * crossed)
    index = _stopped(records, seconds, until)
    # Every record at the target before the hold ran out let it go on.
    assert records[index]["seconds"] > crossed and seconds < 240.0


@pytest.mark.slow
def test_no_hold_stops_at_the_crossing(tmp_path):
    seconds, records = _run(tmp_path, 0.0)
    crossed = _crossing(records)
    assert records[_stopped(records, seconds, crossed)]["seconds"] == crossed
