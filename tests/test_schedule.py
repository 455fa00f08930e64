"""--warmup and --schedule: lr_at against PyTorch's own schedulers, the checks of the flags, the
lr the worker's local step takes, and a resumed run that continues its schedule."""

import json

import pytest
import torch

from easgd_local import rules
from easgd_local.cli import main
from easgd_local.config import ConfigError, TrainConfig
from easgd_local.schedule import lr_at, run_schedule

from .test_precision import batches, one_worker


def _torch_lrs(scheduler_of, steps: int, lr: float = 0.1) -> list[float]:
    """The lr PyTorch's scheduler gives each of ``steps`` optimizer steps."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = scheduler_of(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_is_pytorchs_linear_lr_from_lr_over_n():
    n = 5
    ours = [lr_at(s, 0.1, n) for s in range(12)]
    assert ours[:6] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1])
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(
        o, start_factor=1 / n, total_iters=n - 1), 12)
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert [lr_at(s, 0.1) for s in range(3)] == [0.1] * 3  # no warm-up, constant


def test_cosine_after_warmup_is_pytorchs_and_ends_at_zero():
    n, total = 4, 30
    ours = [lr_at(s, 0.1, n, "cosine", total) for s in range(total)]
    sched = torch.optim.lr_scheduler
    theirs = _torch_lrs(lambda o: sched.SequentialLR(o, [
        sched.LinearLR(o, start_factor=1 / n, total_iters=n - 1),
        sched.CosineAnnealingLR(o, T_max=total - n, eta_min=0.0)], milestones=[n]), total)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-12)
    assert ours[n] == pytest.approx(0.1) and ours[-1] < 0.1 * 0.01
    assert lr_at(total, 0.1, n, "cosine", total) == 0.0  # at the budget's end, and past it
    assert lr_at(total + 7, 0.1, n, "cosine", total) == 0.0
    assert all(a >= b for a, b in zip(ours[n:], ours[n + 1:]))  # decays monotonically


def test_step_decays_at_the_fractions_of_the_budget():
    total = 40
    ours = [lr_at(s, 0.1, 0, "step", total, decay_factor=0.5, decay_at=(0.5, 0.75))
            for s in range(total)]
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(
        o, milestones=[20, 30], gamma=0.5), total)
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert (ours[19], ours[20], ours[29], ours[30]) == pytest.approx((0.1, 0.05, 0.05, 0.025))
    # with a warm-up the two factors multiply
    assert lr_at(1, 0.1, 4, "step", 4, decay_at=(0.25,)) == pytest.approx(0.1 * 2 / 4 * 0.1)


def test_a_decaying_schedule_needs_the_budget():
    with pytest.raises(ValueError, match="budget"):
        lr_at(3, 0.1, 0, "cosine", None)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(3, 0.1, 0, "linear", 10)


def test_run_schedule_takes_the_runs_settings_and_defaults():
    config = TrainConfig(algo="easgd", workers=2, lr=0.2, warmup=10, schedule="step",
                         steps=100).validate()
    at = run_schedule(config, 100)
    assert at(0) == pytest.approx(0.02) and at(49) == pytest.approx(0.2)
    assert at(50) == pytest.approx(0.02) and at(75) == pytest.approx(0.002)  # 0.1 at 50%, 75%
    config = TrainConfig(algo="easgd", workers=2, lr=0.2, schedule="step", decay_factor=0.5,
                         decay_at=["0.2"], steps=100).validate()
    assert config.decay_at == [0.2]
    assert run_schedule(config, 100)(20) == pytest.approx(0.1)


@pytest.mark.parametrize("settings,message", [
    (dict(schedule="cosine", time_limit=5.0),
     "--schedule cosine decays over the run's budget of local steps; give --steps or --epochs "
     "(--time-limit alone sets none)"),
    (dict(decay_factor=0.5), "--decay-factor applies to --schedule step, not constant"),
    (dict(schedule="cosine", decay_at=[0.5]), "--decay-at applies to --schedule step, not cosine"),
    (dict(schedule="step", decay_at=["0.5", "1"]),
     "--decay-at must be comma-separated fractions in (0, 1) (got 0.5,1)"),
    (dict(schedule="step", decay_at=["half"]),
     "--decay-at must be comma-separated fractions in (0, 1) (got half)"),
    (dict(schedule="step", decay_factor=1.5), "--decay-factor must be in (0, 1] (got 1.5)"),
    (dict(warmup=-1), "--warmup must be >= 0 (got -1)"),
    (dict(schedule="linear"), "--schedule must be one of constant, cosine, step (got 'linear')"),
])
def test_schedule_settings_are_checked(settings, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig(workers=2, **settings).validate()
    assert str(err.value) == message


def test_a_budget_with_the_time_limit_or_none_at_all_is_fine(capsys, tmp_path):
    TrainConfig(workers=2, schedule="cosine", time_limit=5.0, steps=100).validate()
    TrainConfig(workers=2, schedule="cosine").validate()  # the default epochs
    out = tmp_path / "never"
    assert main(["train", "--schedule", "step", "--decay-at", "0.5,2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--decay-at must be comma-separated fractions in (0, 1) (got 0.5,2)")
    assert "\n" not in err and not out.exists()


def _lrs_taken(worker, steps, monkeypatch):
    """The lr of each local step ``worker`` takes over ``steps`` mini-batches."""
    taken = []
    real = rules.local_step_

    def local_step_(y, grad, lr, **kw):
        taken.append(lr)
        return real(y, grad, lr, **kw)

    monkeypatch.setattr(rules, "local_step_", local_step_)
    for x, target in batches(worker, steps):
        assert worker.one_step(x, target)
    monkeypatch.setattr(rules, "local_step_", real)
    return taken


def test_the_worker_steps_with_the_scheduled_lr_and_continues_it_when_restored(monkeypatch):
    """Half a run, its worker's state restored into a fresh worker (as --resume does), then the
    lr of its next steps: those of an unbroken run at the same steps."""
    settings = dict(algo="msgd", lr=0.05, warmup=3, schedule="cosine", steps=12)
    with one_worker(**settings) as unbroken:
        whole = _lrs_taken(unbroken, 12, monkeypatch)
    assert whole == pytest.approx([lr_at(s, 0.05, 3, "cosine", 12) for s in range(12)])
    with one_worker(**settings) as first:
        _lrs_taken(first, 6, monkeypatch)
        saved = first.snapshot()
    from easgd_local.checkpoint import unpack_state

    with one_worker(**settings) as resumed:
        resumed.restore(unpack_state(saved))
        assert resumed.step == 6
        assert _lrs_taken(resumed, 6, monkeypatch) == pytest.approx(whole[6:])


class Bias(torch.nn.Module):
    """A model whose output is one parameter whatever the input: under mean_output its gradient
    is 1 / classes in every entry, whatever the data, so where it ends is set by the lr of each
    step alone (not by the order of the data, which a resume draws afresh)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.b = torch.nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        return self.b.expand(x.shape[0], -1)


def mean_output(outputs, targets):
    return outputs.mean()


@pytest.mark.slow
def test_a_resumed_run_continues_its_schedule(tmp_path):
    """Half a run (20 steps), resumed to 40, continues its warm-up and cosine from step 20 over
    the budget the resume gives: its model ends where the lrs of those steps take it."""
    from easgd_local.checkpoint import Checkpointer
    from easgd_local.launcher import train

    from .helpers import assert_no_leftovers, leftovers_snapshot

    before = leftovers_snapshot()
    settings = dict(algo="sgd", lr=0.05, warmup=5, schedule="cosine", quiet=True,
                    eval_every=100.0, model="tests.test_schedule:Bias",
                    loss="tests.test_schedule:mean_output")
    train(TrainConfig(out=tmp_path / "unbroken", steps=40, **settings))
    train(TrainConfig(out=tmp_path / "half", steps=20, **settings))
    resumed = TrainConfig.from_dict(json.loads((tmp_path / "half" / "config.json").read_text()))
    resumed.steps = 40
    summary = train(resumed, resume=Checkpointer(tmp_path / "half").load())
    assert_no_leftovers(before)
    assert summary["steps_per_worker"] == [40]

    def ends_at(lrs):  # b after its steps: each moves every entry by -lr / classes
        return torch.full((10,), -sum(lrs) / 10)

    unbroken = [lr_at(s, 0.05, 5, "cosine", 40) for s in range(40)]
    halves = [lr_at(s, 0.05, 5, "cosine", 20) for s in range(20)] + unbroken[20:]
    for run, lrs in (("unbroken", unbroken), ("half", halves)):
        b = torch.load(tmp_path / run / "center.pt", weights_only=True)["b"]
        torch.testing.assert_close(b, ends_at(lrs), rtol=1e-5, atol=1e-6, msg=run)
