"""Training on CUDA: skipped on machines without a GPU."""

import json

import pytest
import torch

from easgd_local.config import TrainConfig
from easgd_local.launcher import train

from .helpers import assert_no_leftovers, leftovers_snapshot

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_two_workers_share_one_gpu(tmp_path):
    before = leftovers_snapshot()
    config = TrainConfig(out=tmp_path / "run", quiet=True, workers=2, devices=["cuda:0"], epochs=3)
    s = train(config)
    assert s["devices"] == ["cuda:0", "cuda:0"]
    assert s["final_test_accuracy"] >= 0.95, s
    assert s["exchanges"] > 0 and s["bytes_exchanged"] > 0
    assert json.loads((config.out / "summary.json").read_text())["workers"] == 2
    assert_no_leftovers(before)


def test_default_devices_are_every_gpu(tmp_path):
    config = TrainConfig(out=tmp_path / "run", quiet=True).validate()
    assert config.worker_devices == [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def test_eamsgd_on_gpu(tmp_path):
    s = train(TrainConfig(out=tmp_path / "run", quiet=True, algo="eamsgd", lr=0.01, workers=2,
                          devices=["cuda:0"], steps=200))
    assert s["final_test_accuracy"] > 0.9, s
