"""A whole training run on emulated devices (--emulate-step): 16 workers whose local steps are
sleeps, through the real launcher, supervisor, checkpoints and faults. A worker killed from
outside is replaced, the main process killed takes its workers along, and the run resumes from
its checkpoint to the end with its counters whole."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from easgd_local.checkpoint import Checkpointer
from easgd_local.control import EXCHANGES

from .helpers import _children, assert_no_leftovers, leftovers_snapshot

pytestmark = pytest.mark.slow

WORKERS, TAU, BATCH = 16, 2, 32
RUN = ("--algo", "easgd", "--workers", str(WORKERS), "--devices", "cpu", "--emulate-step",
       "0.02", "--tau", str(TAU), "--batch-size", str(BATCH), "--checkpoint-every", "1",
       "--eval-every", "100", "--max-restarts", "2")


def _train(out, *args):
    return [sys.executable, "-m", "easgd_local", "train", "--quiet", "--out", str(out), *args]


def _workers(pid):
    """The spawned workers of ``pid`` (multiprocessing's spawn_main; not its resource tracker)."""
    found = set()
    for p in _children(pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    found.add(p)
        except OSError:
            pass
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(proc, what, condition, timeout=90, every=0.1):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(every)


def _checkpoint(out):
    try:
        return Checkpointer(out).load()
    except Exception:  # not yet written, or being replaced
        return None


def test_sixteen_emulated_workers_survive_kill_9_and_resume(tmp_path):
    before = leftovers_snapshot()
    out = tmp_path / "run"
    proc = subprocess.Popen(_train(out, *RUN, "--time-limit", "120"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(proc, "checkpoint", lambda: (out / "checkpoint" / "state.pt").exists())
        first = _workers(proc.pid)
        assert len(first) == WORKERS
        os.kill(min(first), signal.SIGKILL)  # kill -9 of one worker from outside
        # The restart is counted in a checkpoint, and then every rank, the replaced one too,
        # steps on (a later checkpoint has every count higher).
        _wait_for(proc, "checkpoint after the restart",
                  lambda: (_checkpoint(out) or {}).get("restarts", 0) >= 1, every=0.5)
        at_restart = Checkpointer(out).load()["steps"]
        _wait_for(proc, "steps of every rank after the restart", lambda: bool(
            ((_checkpoint(out) or {}).get("steps", at_restart) > at_restart).all()), every=0.5)
        workers = first | _workers(proc.pid)
        assert len(workers) == WORKERS + 1
        proc.kill()  # kill -9 of the main process: its workers follow it
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in workers):
            assert time.monotonic() < deadline, [p for p in workers if _alive(p)]
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    saved = Checkpointer(out).load()
    resumed = subprocess.run(_train(out, "--resume", str(out), "--time-limit",
                                    str(saved["elapsed"] + 1.5)),
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert_no_leftovers(before)
    _check_resumed(out, saved)


def _check_resumed(out, saved):
    """The resumed run's summary and final checkpoint against the checkpoint it resumed."""
    summary = json.loads((out / "summary.json").read_text())
    assert isinstance(summary["final_test_accuracy"], float), summary
    center = torch.load(out / "center.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in center.values() if t.is_floating_point())
    assert summary["worker_restarts"] >= 1 and summary["divergences"] == 0
    assert summary["final_train_loss"] is None  # an emulated step's loss is not reported
    steps = summary["steps_per_worker"]
    assert all(now > then for now, then in zip(steps, saved["steps"].tolist()))
    assert summary["total_samples"] == sum(steps) * BATCH
    assert summary["total_samples"] > sum(saved["steps"].tolist()) * BATCH
    # The counters carried over the resume: every worker exchanged once every tau steps.
    assert summary["exchanges"] >= saved["counters"][:, EXCHANGES].sum()
    assert 0.5 * sum(steps) / TAU <= summary["exchanges"] <= 1.1 * sum(steps) / TAU, summary
    final = Checkpointer(out).load()
    for rank, (exchanged, n) in enumerate(zip(final["counters"][:, EXCHANGES].tolist(), steps)):
        assert 0.5 * n / TAU <= exchanged <= 1.1 * n / TAU + 1, (rank, exchanged, n)
