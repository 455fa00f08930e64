"""Spawned CPU workers on mnist10k: a trained center, well-formed outputs, clean exits."""

import json
import math

import pytest
import torch

from easgd_local.config import TrainConfig
from easgd_local.data import DatasetInfo
from easgd_local.launcher import TrainError, train
from easgd_local.models import build_model

from .helpers import assert_no_leftovers, leftovers_snapshot

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {"algo", "workers", "devices", "tau", "alpha", "lr", "batch_size", "total_samples",
                "startup_seconds", "train_seconds", "samples_per_second", "exchanges",
                "bytes_exchanged", "final_test_accuracy", "final_test_loss"}
METRIC_KEYS = {"seconds", "samples", "steps", "test_loss", "test_accuracy", "train_loss"}


def _run(tmp_path, **kw):
    before = leftovers_snapshot()
    config = TrainConfig(out=tmp_path / "run", quiet=True, **kw)
    summary = train(config)
    assert_no_leftovers(before)
    return config, summary


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_easgd_two_cpu_workers_train_the_center(tmp_path):
    config, s = _run(tmp_path, algo="easgd", workers=2, epochs=3, eval_every=1.0)
    assert SUMMARY_KEYS <= set(s)
    assert s["final_test_accuracy"] >= 0.95, s
    steps = s["steps_per_worker"]
    batch = config.batch_size
    assert len(steps) == 2 and all(n == math.ceil(3 * 8000 / (2 * batch)) for n in steps)
    assert s["total_samples"] == sum(steps) * batch
    # An exchange at local steps 0, tau, 2 tau, ... of each worker; each reads and writes the center.
    numel = sum(p.numel() for p in build_model("cnn", DatasetInfo("mnist10k", 10, 1, 28)).parameters())
    assert s["exchanges"] == sum(math.ceil(n / 10) for n in steps)
    assert s["bytes_exchanged"] == s["exchanges"] * 2 * 4 * numel
    assert s["devices"] == ["cpu", "cpu"] and s["alpha"] == pytest.approx(0.45)

    records = _metrics(config.out)
    assert len(records) >= 2 and all(METRIC_KEYS <= set(r) for r in records)
    assert [r["seconds"] for r in records] == sorted(r["seconds"] for r in records)
    assert records[-1]["test_accuracy"] == s["final_test_accuracy"]
    assert records[-1]["steps"] == steps

    # center.pt is a plain state_dict of the model
    model = build_model("cnn", DatasetInfo("mnist10k", 10, 1, 28))
    model.load_state_dict(torch.load(config.out / "center.pt", weights_only=True))
    assert json.loads((config.out / "summary.json").read_text())["final_test_accuracy"] == s["final_test_accuracy"]


def test_eamsgd_improves_the_center(tmp_path):
    _, s = _run(tmp_path, algo="eamsgd", workers=2, steps=80, tau=4, lr=0.01, momentum=0.9)
    assert s["final_test_accuracy"] > 0.85, s
    assert s["exchanges"] == 2 * 20


def test_sgd_reference_publishes_its_model(tmp_path):
    """One worker, no center: the evaluated model is the worker's own, with nothing exchanged."""
    _, s = _run(tmp_path, algo="msgd", lr=0.01, steps=120)
    assert s["workers"] == 1 and s["exchanges"] == 0 and s["bytes_exchanged"] == 0 and s["alpha"] == 0
    assert s["final_test_accuracy"] > 0.85, s


def test_time_limit_without_lock(tmp_path):
    _, s = _run(tmp_path, algo="easgd", workers=2, time_limit=2.0, lock=False, eval_every=0.5)
    assert 2.0 <= s["train_seconds"] < 10.0
    assert s["final_test_accuracy"] > 0.5
    assert math.isfinite(s["final_test_loss"])


def test_worker_error_is_relayed_in_one_line(tmp_path, monkeypatch):
    from easgd_local.worker import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "1:5:raise")  # an error in the worker, as a bug would be
    before = leftovers_snapshot()
    with pytest.raises(TrainError) as err:
        train(TrainConfig(out=tmp_path / "run", quiet=True, workers=2, steps=50))
    message = str(err.value)
    assert "worker 1" in message and "injected fault" in message and "\n" not in message
    del err  # its traceback holds the run's frames, and with them the channels' semaphores
    assert_no_leftovers(before)
