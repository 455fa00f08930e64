"""How a run ends when it cannot succeed, or when the user ends it at any moment: workers that
keep diverging, a model that ends at chance after diverging, NaN in a user's data, a stopped
worker of a synchronous algorithm (the barrier in shared memory), Ctrl-C during the imports,
the start-up and a bench, the Python API given something other than a TrainConfig. Bounds on
time are generous: these tests assert behaviour, not speed."""

import functools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from threading import BrokenBarrierError

import pytest
import torch

from easgd_local.checkpoint import Checkpointer
from easgd_local.config import TrainConfig
from easgd_local.launcher import TrainError, train
from easgd_local.worker import FAULT_ENV

from .helpers import _children, _is_resource_tracker, assert_no_leftovers, leftovers_snapshot

ROOT = Path(__file__).resolve().parent.parent

DATA_CODE = '''
import torch


def _digits(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    return x, (x.mean((1, 2, 3)) > 0).long()


def nan_train():
    x, y = _digits(300, 0)
    x[123, 0, 5, 5] = float("nan")
    return x[:250], y[:250], x[250:], y[250:]


def inf_test():
    x, y = _digits(300, 0)
    x[260, 0, 0, 0] = float("-inf")
    return x[:250], y[:250], x[250:], y[250:]


def too_large_for_float32():
    x, y = _digits(300, 0)
    x = x.double()
    x[7, 0, 3, 3] = 1e300
    return x[:250], y[:250], x[250:], y[250:]


class Samples(torch.utils.data.Dataset):
    def __init__(self, n, seed, bad=None):
        self.x, self.targets = _digits(n, seed)
        if bad is not None:
            self.x[bad] = float("nan")

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def nan_dataset():
    return Samples(200, 0, bad=3), Samples(50, 1)


def unseen_test_class():
    """Nothing a model can learn scores on the test set: training labels are 0-8 at random,
    every test label is 9."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(700, 1, 28, 28, generator=g)
    y = torch.randint(0, 9, (700,), generator=g)
    return x[:600], y[:600], x[600:], torch.full((100,), 9)
'''


@pytest.fixture
def data_module(tmp_path, monkeypatch):
    """A module of the user's, importable as `endings_data` from the current directory."""
    (tmp_path / "endings_data.py").write_text(textwrap.dedent(DATA_CODE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("endings_data", None)
    return tmp_path


def _finite(path):
    sd = torch.load(path, weights_only=True)
    return all(torch.isfinite(t).all() for t in sd.values() if t.is_floating_point())


# --- 2. runs that keep diverging, data that cannot be learned from -----------------------------

NAN_DATA = [("endings_data:nan_train", "X_train holds NaN or infinite inputs (sample 123 is the first)"),
            ("endings_data:inf_test", "X_test holds NaN or infinite inputs (sample 10 is the first)"),
            ("endings_data:too_large_for_float32", "X_train holds NaN or infinite inputs (sample 7"),
            ("endings_data:nan_dataset", "the training set holds NaN or infinite inputs (sample 3")]


@pytest.mark.parametrize("spec,needle", NAN_DATA, ids=[s for s, _ in NAN_DATA])
def test_nan_or_infinite_inputs_are_refused_before_training(data_module, capsys, spec, needle):
    from easgd_local.cli import main

    before = leftovers_snapshot()
    out = data_module / "run"
    assert main(["train", "--quiet", "--out", str(out), "--dataset", spec, "--steps", "20"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:") and needle in err, err
    assert not out.exists()
    assert_no_leftovers(before)


@pytest.mark.slow
def test_a_run_that_keeps_diverging_fails_with_its_last_finite_center(tmp_path, monkeypatch):
    # Each injected NaN is one divergence at the worker's next exchange (every 5 steps); 2
    # workers may diverge 6 times, the 7th ends the run long before its 400 steps.
    monkeypatch.setenv(FAULT_ENV, ",".join(f"{r}:{s}:nan" for r in (0, 1) for s in range(5, 300, 10)))
    before = leftovers_snapshot()
    out = tmp_path / "run"
    with pytest.raises(TrainError) as err:
        train(TrainConfig(out=out, quiet=True, workers=2, steps=400, tau=5, eval_every=100.0))
    message = str(err.value)
    del err
    assert "\n" not in message and "the run failed" in message and "diverged" in message, message
    assert "center.pt" in message
    assert _finite(out / "center.pt")
    saved = Checkpointer(out).load()
    assert max(saved["steps"].tolist()) < 400
    assert not (out / "summary.json").exists()
    assert_no_leftovers(before)


@pytest.mark.slow
def test_a_run_that_diverged_and_ends_at_chance_fails(data_module, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "0:5:nan")
    out = data_module / "run"
    config = TrainConfig(out=out, quiet=True, workers=2, steps=40, tau=5, eval_every=100.0,
                         dataset="endings_data:unseen_test_class")
    with pytest.raises(TrainError, match="no better than chance") as err:
        train(config)
    assert "\n" not in str(err.value)
    del err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["divergences"] == 1 and summary["final_test_accuracy"] <= 0.15
    assert _finite(out / "center.pt") and Checkpointer(out).load()["elapsed"] > 0


# --- 3. a stopped worker of a synchronous algorithm --------------------------------------------

def _two_rounds(barrier, rank):
    """A spawned party: passes one round, then waits in the second until it is broken."""
    party = barrier.party(rank)
    party.wait()
    try:
        party.wait()
    except BrokenBarrierError:
        sys.exit(3)


def _count(counter):
    counter += 1


def test_the_barrier_shows_who_waits_and_breaks_without_a_lock():
    from easgd_local.barrier import Barrier

    before = leftovers_snapshot()
    ctx = torch.multiprocessing.get_context("spawn")
    counter = torch.zeros(1, dtype=torch.int64).share_memory_()
    barrier = Barrier(3, action=functools.partial(_count, counter))
    procs = [ctx.Process(target=_two_rounds, args=(barrier, rank)) for rank in (0, 1)]
    try:
        for p in procs:
            p.start()
        barrier.party(2).wait()  # the first round: all three meet, the action runs once
        assert int(counter) == 1
        deadline = time.monotonic() + 60
        while barrier.waiting() != {0, 1}:  # the second: rank 2 never comes
            assert time.monotonic() < deadline, barrier.waiting()
            time.sleep(0.01)
        barrier.abort()
        for p in procs:
            p.join(timeout=30)
        assert [p.exitcode for p in procs] == [3, 3]
        assert barrier.waiting() == set() and int(counter) == 1
        with pytest.raises(BrokenBarrierError):
            barrier.party(2).wait()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        barrier.close()
    assert_no_leftovers(before)


def _popen(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "easgd_local", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=60)


def _group_gone(pgid, wait=15.0):
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("algo,workers", [("sync-easgd", 4), ("ddp", 2)])
def test_the_stopped_worker_of_a_synchronous_run_is_the_one_declared_dead(tmp_path, algo,
                                                                          workers):
    # In lock-step at every step (--tau 1; ddp's all-reduce is at every step): every worker
    # stops stepping at the same step, none stalled longer than the others.
    before = leftovers_snapshot()
    out = tmp_path / "run"
    tau = ["--tau", "1"] if algo == "sync-easgd" else []
    proc = _popen(["train", "--quiet", "--algo", algo, "--workers", str(workers), *tau,
                   "--stall-timeout", "5", "--time-limit", "300", "--eval-every", "0.5",
                   "--out", str(out)])
    stopped = None
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        pids = sorted(p for p in _children(proc.pid) if not _is_resource_tracker(p))
        assert len(pids) == workers
        stopped = pids[1]
        os.kill(stopped, signal.SIGSTOP)
        t = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - t
    finally:
        if stopped is not None and proc.poll() is None:
            os.kill(stopped, signal.SIGCONT)
        _kill_group(proc)
    assert proc.returncode == 1, err
    assert "worker 1 made no step" in err and "worker 0 made no step" not in err, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), err
    assert took < 5 + 30, took  # the stall timeout, a few seconds, room for a busy machine
    assert _group_gone(proc.pid)
    assert_no_leftovers(before)


# --- 5. Ctrl-C at any moment -------------------------------------------------------------------

def _interrupted(proc):
    """SIGINT to the process group, as a terminal sends it; the command's stderr."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=90)
    finally:
        _kill_group(proc)
    return err


def test_the_entry_point_imports_nothing_heavy_before_its_guard():
    """The console script and `python -m easgd_local` run easgd_local.__main__:main, whose
    module imports no torch: a Ctrl-C while torch loads is caught there."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'easgd-local = "easgd_local.__main__:main"' in pyproject
    probe = subprocess.run([sys.executable, "-c", "import sys, easgd_local.__main__ as m; "
                            "print(callable(m.main), 'torch' in sys.modules)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert probe.stdout.split() == ["True", "False"], probe


@pytest.mark.slow
@pytest.mark.parametrize("after", [0.3, 1.0, 3.0])
def test_ctrl_c_at_any_moment_of_the_start_is_one_line(tmp_path, after):
    before = leftovers_snapshot()
    proc = _popen(["train", "--quiet", "--out", str(tmp_path / "run"), "--steps", "300"])
    time.sleep(after)
    err = _interrupted(proc)
    assert proc.returncode == 130, err
    # "interrupted", or once the run has its checkpoint the line that says how to continue it
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and (last == "interrupted" or last.startswith(
        "interrupted; continue with: easgd-local train --resume")), err
    assert _group_gone(proc.pid)
    assert_no_leftovers(before)


@pytest.mark.slow
def test_ctrl_c_while_training_ends_with_the_resume_command(tmp_path):
    """Once training is under way a Ctrl-C ends with one line: how far the run got and the exact
    command that continues it from the checkpoint it wrote."""
    before = leftovers_snapshot()
    out = tmp_path / "run"
    proc = _popen(["train", "--out", str(out), "--steps", "100000"])
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
    except BaseException:
        _kill_group(proc)
        raise
    err = _interrupted(proc)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"interrupted after [\d,]+ samples in [\d.]+ s; continue with: "
                        rf"easgd-local train --resume {re.escape(str(out))}", last), err
    assert "Traceback" not in err and "WARNING" not in err, err
    assert (out / "checkpoint" / "state.pt").exists()
    assert _group_gone(proc.pid)
    assert_no_leftovers(before)


@pytest.mark.slow
@pytest.mark.parametrize("after", [0.2, 1.5])
def test_ctrl_c_while_a_bench_starts_a_run_is_one_line(tmp_path, after):
    before = leftovers_snapshot()
    out = tmp_path / "bench"
    proc = _popen(["bench", "--algos", "sgd,easgd", "--time-limit", "4", "--repeats", "1",
                   "--out", str(out)])
    try:
        deadline = time.monotonic() + 180
        while not list((out / "runs").glob("*/config.json")):  # a run is starting
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
    except BaseException:
        _kill_group(proc)
        raise
    time.sleep(after)
    err = _interrupted(proc)
    assert proc.returncode == 130, err
    # On a line of its own, or ending the run's: "[1/2] sgd p=1: interrupted".
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.endswith("interrupted") and "WARNING" not in last, err
    assert _group_gone(proc.pid)
    assert_no_leftovers(before)


# --- 6. the Python API ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"algo": "easgd", "workers": 2}, "easgd", 3])
def test_the_api_says_a_config_must_be_a_trainconfig(tmp_path, bad):
    from easgd_local import train as api_train

    for call in (api_train, train):
        with pytest.raises(TypeError, match=r"config must be an easgd_local.TrainConfig .*not "
                                            + type(bad).__name__):
            call(bad)
    assert not any(tmp_path.iterdir())
