"""--precision: autocast in the worker's forward and loss, a gradient scaler for fp16, and the
flat parameters, the exchange and the checkpoint left in float32."""

import contextlib
import json
import os

import pytest
import torch

from easgd_local import precision as precision_module
from easgd_local.checkpoint import unpack_state
from easgd_local.cli import main
from easgd_local.config import PRECISIONS, ConfigError, TrainConfig
from easgd_local.data import DatasetInfo
from easgd_local.flat import flatten_
from easgd_local.models import build_model
from easgd_local.precision import DTYPES, Precision, unsupported

MNIST = DatasetInfo("mnist10k", 10, 1, 28)


def _cnn() -> tuple:
    torch.manual_seed(0)
    state = flatten_(build_model("cnn", MNIST))
    x = torch.randn(8, 1, 28, 28)
    target = torch.randint(0, 10, (8,))
    return state, x, target


def test_every_precision_has_a_dtype():
    assert tuple(DTYPES) == PRECISIONS


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                        ("fp32", torch.float32)])
def test_the_forward_is_autocast_and_the_parameters_stay_float32(name, dtype):
    state, x, target = _cnn()
    amp = Precision(name, torch.device("cpu"), state.module.parameters())
    with amp.autocast():
        out = state.module(x)
        assert out.dtype == dtype
        loss = torch.nn.functional.cross_entropy(out, target)
    assert amp.backward(loss)
    assert state.flat.dtype == torch.float32 and state.grad.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in state.module.parameters())
    assert state.grad.abs().sum() > 0 and torch.isfinite(state.grad).all()
    assert (amp.scaler is not None) == (name == "fp16")


def test_fp16_gradients_come_back_unscaled():
    """The scaler multiplies the loss by its scale (65536 at the start) and divides the
    gradients by it again: they match those of the same loss in float32."""
    state, x, target = _cnn()
    with torch.autocast("cpu", dtype=torch.float16):
        out = state.module(x)
    reference_loss = torch.nn.functional.cross_entropy(out.float(), target)
    reference_loss.backward()
    reference = state.grad.clone()
    state.grad.zero_()
    amp = Precision("fp16", torch.device("cpu"), state.module.parameters())
    with amp.autocast():
        loss = torch.nn.functional.cross_entropy(state.module(x), target)
    assert amp.backward(loss)
    assert amp.scaler.get_scale() == 65536.0
    torch.testing.assert_close(state.grad, reference, rtol=2e-2, atol=1e-4)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    state, x, target = _cnn()
    amp = Precision("fp16", torch.device("cpu"), state.module.parameters())
    with amp.autocast():
        loss = torch.nn.functional.cross_entropy(state.module(x), target) * 1e38
    assert not amp.backward(loss)  # scaled by 65536, the gradients are inf
    assert amp.scaler.get_scale() == 32768.0
    with amp.autocast():
        loss = torch.nn.functional.cross_entropy(state.module(x), target)
    state.grad.zero_()
    assert amp.backward(loss)  # and the next step goes on (no "unscale_ already called")


def test_unsupported_precision_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    assert unsupported("bf16", "cpu") is None and unsupported("fp32", "cpu") is None
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda kind: False)
    assert unsupported("fp16", "cpu") == (
        f"this torch ({torch.__version__}) cannot autocast to fp16 on cpu")
    with pytest.raises(ConfigError, match=r"^--precision fp16: this torch .* on cpu$"):
        TrainConfig(precision="fp16", workers=2).validate()
    TrainConfig(precision="fp32", workers=2).validate()  # fp32 asks nothing
    out = tmp_path / "never"
    assert main(["train", "--precision", "fp16", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--precision fp16" in err and "\n" not in err and not out.exists()


def test_a_dtype_autocast_turns_off_for_is_unsupported(monkeypatch):
    """Autocast with a dtype the device lacks warns and computes in float32: the probe sees the
    output's dtype."""
    real = torch.autocast
    monkeypatch.setattr(torch, "autocast",
                        lambda kind, dtype: real(kind, dtype=dtype, enabled=False))
    assert unsupported("bf16", "cpu") is not None
    assert precision_module._autocasts("cpu", torch.bfloat16) is False


# -- the worker, in this process -------------------------------------------------------------

class _Pipe:
    """What a worker sends to the main process, kept."""

    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)


@contextlib.contextmanager
def one_worker(**settings):
    """A Worker of a validated one-worker run (sgd or msgd: no center, no peers) built in this
    process, its communicator started; the process's threads and seed restored after."""
    import multiprocessing as mp

    from easgd_local.control import WorkerChannels
    from easgd_local.worker import Worker

    config = TrainConfig(**{"algo": "sgd", "steps": 40, "quiet": True, **settings}).validate()
    threads = torch.get_num_threads()
    init = flatten_(build_model(config.model, MNIST)).flat.detach().clone()
    shared = config.algorithm.shared_state(config, init, init.numel())
    ch = WorkerChannels.create(config, shared, mp.get_context("spawn"), False)
    try:
        worker = Worker(0, config, ch, _Pipe(), os.getpid(), 28, 0)
        worker.comm.start(worker.y)
        yield worker
    finally:
        shared.close()
        torch.set_num_threads(threads)


def batches(worker, n):
    gen = torch.Generator().manual_seed(1)
    return [b for _, b in zip(range(n), worker.data.batches(8, generator=gen))]


def test_the_workers_step_runs_its_forward_under_bf16():
    seen = []
    with one_worker(precision="bf16") as worker:
        worker.state.module.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        before = worker.y.clone()
        for x, target in batches(worker, 3):
            assert worker.one_step(x, target)
        assert seen == [torch.bfloat16] * 3
        assert worker.y.dtype == torch.float32 and worker.state.grad.dtype == torch.float32
        assert not torch.equal(worker.y, before) and torch.isfinite(worker.y).all()
        assert torch.isfinite(worker.loss_sum) and worker.step == 3
        # what the shared state and the checkpoint take: float32
        worker.comm.finish(worker.y, worker.v)  # publishes the model to its shared slot
        assert torch.equal(worker.ch.shared["model"].snapshot(), worker.y)
        assert unpack_state(worker.snapshot())["flat"].dtype == torch.float32


def test_the_workers_fp16_step_is_skipped_when_its_gradients_overflow(monkeypatch):
    with one_worker(precision="fp16") as worker:
        x, target = batches(worker, 1)[0]
        worker.loss_fn = lambda out, t: torch.nn.functional.cross_entropy(out, t) * 1e38
        before = worker.y.clone()
        assert worker.one_step(x, target)
        assert torch.equal(worker.y, before) and worker.step == 1  # skipped, yet counted
        worker.loss_fn = torch.nn.functional.cross_entropy
        assert worker.one_step(x, target)
        assert not torch.equal(worker.y, before) and torch.isfinite(worker.y).all()


@pytest.mark.slow
def test_two_bf16_cpu_workers_train_the_center(tmp_path):
    """As test_train's short eamsgd run, in bf16; the center and the checkpoint stay float32."""
    from easgd_local.checkpoint import Checkpointer
    from easgd_local.launcher import train

    from .helpers import assert_no_leftovers, leftovers_snapshot

    before = leftovers_snapshot()
    config = TrainConfig(out=tmp_path / "run", quiet=True, algo="eamsgd", workers=2, steps=80,
                         tau=4, lr=0.01, momentum=0.9, precision="bf16")
    s = train(config)
    assert_no_leftovers(before)
    assert s["final_test_accuracy"] > 0.85, s
    assert s["exchanges"] == 2 * 20
    center = torch.load(config.out / "center.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in center.values() if t.is_floating_point())
    saved = Checkpointer(config.out).load()
    assert all(t.dtype == torch.float32 for t in saved["algorithm"].values()
               if torch.is_tensor(t) and t.is_floating_point())
    # The precision may change on a resume (the state is the same); the schedule may not.
    resume = ["train", "--quiet", "--resume", str(config.out)]
    assert main([*resume, "--schedule", "step"]) == 2
    assert main([*resume, "--precision", "fp32", "--steps", "100"]) == 0
    assert json.loads((config.out / "summary.json").read_text())["steps_per_worker"] == [100] * 2
    assert json.loads((config.out / "config.json").read_text())["precision"] == "fp32"
    assert_no_leftovers(before)
