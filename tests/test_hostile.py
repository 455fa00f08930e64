"""What a hostile user tried: ddp with a relative --out, a stopped worker (also one holding a
lock), two processes on one run directory, a test image that cannot be read, a full disk,
SIGTERM to the whole process group, SIGHUP, a signal during the final evaluation, --resume with
options that cannot change and with a new restart budget. Bounds on time are generous: these
tests assert behaviour, and scripts/ measures the promises in seconds."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from easgd_local.checkpoint import Checkpointer, unpack_state
from easgd_local.config import TrainConfig
from easgd_local.launcher import train
from easgd_local.worker import FAULT_ENV

from .helpers import _children, _is_resource_tracker, assert_no_leftovers, leftovers_snapshot

pytestmark = pytest.mark.slow

CMD = [sys.executable, "-m", "easgd_local", "train", "--quiet"]


def _popen(args, cwd=None, env_extra=None, **kw):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([*CMD, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _workers(proc):
    return sorted(p for p in _children(proc.pid) if not _is_resource_tracker(p))


def _one_line_error(stderr):
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --- 1. ddp meets on a loopback port, not at a path ---------------------------------------------

def test_ddp_with_a_relative_out_and_two_at_once(tmp_path):
    before = leftovers_snapshot()
    procs = [_popen(["--algo", "ddp", "--out", f"runs/r{i}", "--steps", "20"], cwd=tmp_path)
             for i in range(2)]
    for p in procs:
        assert p.wait(timeout=240) == 0, p.communicate()
    assert all((tmp_path / f"runs/r{i}" / "summary.json").exists() for i in range(2))
    assert not any("rendezvous" in p.name for p in tmp_path.rglob("*"))
    assert_no_leftovers(before)


# --- 2. stopped and hung workers --------------------------------------------------------------

def test_a_stopped_worker_cannot_hold_the_run_past_its_time_limit(tmp_path):
    out = tmp_path / "run"
    proc = _popen(["--out", str(out), "--time-limit", "6", "--checkpoint-every", "0.5",
                   "--stall-timeout", "600"])
    _wait_for(out / "checkpoint" / "state.pt", proc)
    os.kill(_workers(proc)[0], signal.SIGSTOP)
    t = time.monotonic()
    assert proc.wait(timeout=120) == 0, proc.communicate()
    assert time.monotonic() - t < 60  # it was still going 47 s past its limit before
    assert json.loads((out / "summary.json").read_text())["train_seconds"] < 6 + 30


def test_a_worker_stopped_holding_the_lock_is_declared_dead_and_replaced(tmp_path):
    out = tmp_path / "run"
    proc = _popen(["--out", str(out), "--time-limit", "20", "--tau", "1", "--stall-timeout", "3",
                   "--eval-every", "0.5"], env_extra={FAULT_ENV: "1:30:stop-in-lock"})
    assert proc.wait(timeout=180) == 0, proc.communicate()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["worker_restarts"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["test_accuracy"] > 0.8 and len(records) > 2  # snapshots went on


# --- 3. one run directory, one process ---------------------------------------------------------

def test_a_second_process_on_a_running_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    first = _popen(["--out", str(out), "--time-limit", "8", "--checkpoint-every", "0.5"])
    _wait_for(out / "checkpoint" / "state.pt", first)
    config_before = (out / "config.json").read_text()
    second = subprocess.run([*CMD, "--resume", str(out)], capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert "in use by another easgd-local process" in _one_line_error(second.stderr)
    assert (out / "config.json").read_text() == config_before
    assert first.wait(timeout=120) == 0, first.communicate()
    seconds = [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert seconds == sorted(seconds)  # one time axis


# --- 4. a failed evaluation, a full disk -------------------------------------------------------

def _image_folder(root, corrupt_val=True):
    from PIL import Image

    for split in ("train", "val"):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(12 if split == "train" else 4):
                Image.new("RGB", (28, 28), (120 * c, 30 * i % 255, 90)).save(d / f"{i}.png")
    if corrupt_val:
        (root / "val" / "c1" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")


@pytest.mark.parametrize("live", [True, False])
def test_an_unreadable_test_image_never_costs_the_model(tmp_path, live):
    data = tmp_path / "data"
    _image_folder(data)
    out = tmp_path / "run"
    args = ["--dataset", "imagefolder", "--data-dir", str(data), "--model", "cnn", "--out", str(out),
            "--steps", "30", "--batch-size", "8", "--workers", "2", "--eval-samples", "0"]
    args += ["--eval-every", "0.2"] if live else ["--eval-deferred"]
    proc = subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "evaluation failed" in _one_line_error(proc.stderr)
    assert (out / "center.pt").exists() and Checkpointer(out).load()["steps"].tolist() == [30, 30]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_error"] and summary["final_test_accuracy"] is None


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, caplog):
    real_save = Checkpointer.save
    calls = []

    def save(self, payload):
        calls.append(1)
        if len(calls) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(self, payload)

    monkeypatch.setattr(Checkpointer, "save", save)
    out = tmp_path / "run"
    s = train(TrainConfig(out=out, quiet=True, workers=2, steps=400, checkpoint_every=0.2,
                          eval_every=100.0))
    assert s["final_test_accuracy"] > 0.8 and (out / "center.pt").exists()
    assert len(calls) >= 3
    assert Checkpointer(out).load()["elapsed"] > 0  # the last one written is intact
    assert any("checkpoint not written (No space left on device); the previous one is kept"
               in r.message for r in caplog.records)


# --- 5. signals other than Ctrl-C --------------------------------------------------------------

def test_sigterm_to_the_whole_group_keeps_fresh_worker_states(tmp_path):
    """As `timeout`, systemd and Slurm send it: every process gets SIGTERM. The workers leave
    the decision to the main process, which collects their final states."""
    out = tmp_path / "run"
    proc = _popen(["--out", str(out), "--time-limit", "60", "--checkpoint-every", "0.3"],
                  start_new_session=True)
    _wait_for(out / "checkpoint" / "state.prev.pt", proc)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 130, proc.communicate()
    saved = Checkpointer(out).load()
    steps = saved["steps"].tolist()
    # Fresh: each worker's state is from its last step, not from an earlier periodic checkpoint.
    assert [int(unpack_state(saved["workers"][r])["step"]) for r in (0, 1)] == steps


def test_sighup_ends_the_run_like_ctrl_c(tmp_path):
    out = tmp_path / "run"
    proc = _popen(["--out", str(out), "--time-limit", "60", "--checkpoint-every", "0.5"])
    _wait_for(out / "checkpoint" / "state.pt", proc)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=60) == 130, proc.communicate()
    assert "interrupted" in proc.stderr.read()
    assert Checkpointer(out).load()["elapsed"] > 0


def test_sigterm_during_the_final_evaluation_ends_it(tmp_path):
    out = tmp_path / "run"
    # Many deferred snapshots: their evaluation after training takes far longer than the wait.
    proc = _popen(["--out", str(out), "--time-limit", "3", "--eval-deferred", "--eval-every",
                   "0.02"])
    _wait_for(out / "center.pt", proc)  # written first when training ends
    proc.send_signal(signal.SIGTERM)
    t = time.monotonic()
    assert proc.wait(timeout=120) == 130, proc.communicate()
    assert time.monotonic() - t < 30
    assert Checkpointer(out).load()["elapsed"] >= 3


# --- 6. --resume -------------------------------------------------------------------------------

def test_resume_refuses_what_cannot_change_and_takes_what_can(tmp_path):
    out = tmp_path / "run"
    first = subprocess.run([*CMD, "--out", str(out), "--steps", "60", "--max-restarts", "0"],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, FAULT_ENV: "1:20:kill"})
    assert first.returncode == 1 and "--max-restarts 0" in first.stderr
    for args, needle in ((["--algo", "easgd"], "--algo cannot change"),
                         (["--tau", "3"], "--tau cannot change"),
                         (["--out", str(tmp_path / "other")], "--out cannot change")):
        bad = subprocess.run([*CMD, "--resume", str(out), *args], capture_output=True, text=True,
                             timeout=120)
        assert bad.returncode == 2 and needle in _one_line_error(bad.stderr)
    # A new restart budget, and a worker that dies again within it.
    again = subprocess.run([*CMD, "--resume", str(out), "--max-restarts", "1", "--steps", "90"],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, FAULT_ENV: "1:50:kill"})
    assert again.returncode == 0, again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["worker_restarts"] == 1 and summary["steps_per_worker"] == [90, 90]


# --- 7. input that slipped past validation ------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--time-limit", "nan"], "--time-limit"),
    (["--epochs", "nan"], "--epochs"),
    (["--epochs", "inf"], "--epochs"),
    (["--lr", "inf"], "--lr"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--eval-every", "inf"], "--eval-every"),
    (["--batch-size", "9000"], "exceeds the 8000 training samples"),
    (["--workers", "1000000"], "GB per worker process"),
    (["--seed", str(2**64)], "--seed"),
    (["--stall-timeout", "0"], "--stall-timeout"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_values_that_slipped_through_get_one_line_and_exit_2(args, needle, tmp_path):
    proc = subprocess.run([*CMD, "--out", str(tmp_path / "run"), *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert needle in _one_line_error(proc.stderr)
    assert not (tmp_path / "run").exists()


def test_paths_and_saved_configs_that_slipped_through(tmp_path):
    def run(*args):
        proc = subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        return _one_line_error(proc.stderr)

    assert "File name too long" in run("--out", str(tmp_path / ("x" * 300) / "run"))
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "--resume" in run("--resume", str(a_file))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "config.json is unreadable" in run("--resume", str(broken))
    (broken / "config.json").write_text(json.dumps({"algo": "easgd", "workers": "two"}))
    assert "--workers must be an integer" in run("--resume", str(broken))


# --- 8. a checkpoint beside another run's config.json -------------------------------------------

def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path, capsys):
    """A run's directory with another run's config.json: the checkpoint says what made it
    (algorithm, model, data set, workers, its shared state's layout) and --resume refuses what
    does not match in one line, exit code 2; a checkpoint that does not say so (written before
    they did) is checked by its layout."""
    import torch

    from easgd_local.cli import main

    out = tmp_path / "run"
    train(TrainConfig(algo="eamsgd", workers=2, steps=20, eval_every=100.0, out=out, quiet=True))
    saved = json.loads((out / "config.json").read_text())

    def resume_with(**changed):
        (out / "config.json").write_text(json.dumps({**saved, **changed}))
        code = main(["train", "--quiet", "--resume", str(out), "--steps", "30"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and err.startswith("error:"), err
        return err

    assert "made with --algo eamsgd" in resume_with(algo="easgd")  # the same layout
    assert "made with --workers 2" in resume_with(workers=4)
    assert "made with --model cnn" in resume_with(model="cifar-paper")
    ck = Checkpointer(out)
    payload = torch.load(ck.current, weights_only=True)
    del payload["made_by"]
    torch.save(payload, ck.current)
    assert "center.last of 2 values where this configuration has 4" in resume_with(workers=4)
    assert "an entry center.last that this configuration does not have" in resume_with(
        algo="downpour", momentum=None)
    assert "does not match" in resume_with(model="cifar-paper")
    (out / "config.json").write_text(json.dumps(saved))
    assert main(["train", "--quiet", "--resume", str(out), "--steps", "30"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps_per_worker"] == [30, 30]
