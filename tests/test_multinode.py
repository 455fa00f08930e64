"""Several boxes on torch.distributed, tried on one machine: two torchrun agents on 127.0.0.1,
each a box with one worker. Only loopback addresses; every wait is bounded; every process
started here is ended here."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from easgd_local.checkpoint import Checkpointer
from easgd_local.cli import main

from .helpers import _children

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _box(out: Path, port: int, extra=(), restarts=0, run_id="t"):
    cmd = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
           "--max-restarts", str(restarts), "--monitor-interval", "1",
           "-m", "easgd_local", "train", "--multi-node", "--quiet", "--workers", "1",
           "--threads", "1",
           "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        kids = _children(todo.pop())
        todo.extend(kids - found)
        found |= kids
    return found


def _end(procs):
    """torchrun starts each box's launcher in a session of its own: end every descendant."""
    for p in procs:
        for pid in _descendants(p.pid) | {p.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait(timeout=60)


def _launchers(agent_pid: int) -> list[int]:
    """The easgd-local launcher processes torchrun started under this agent."""
    found = []
    for pid in _children(agent_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"easgd_local" in cmd:
            found.append(pid)
    return found


def test_multi_node_without_torchrun_is_one_line(capsys, tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert main(["train", "--multi-node", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "torchrun" in err


def test_multi_node_refuses_an_algorithm_without_a_center(capsys, tmp_path):
    assert main(["train", "--multi-node", "--algo", "lsgd", "--out", str(tmp_path / "r")]) == 2
    assert "has none" in capsys.readouterr().err


@pytest.mark.slow
def test_two_boxes_train_to_97_and_agree(tmp_path):
    out, port = tmp_path / "job", _port()
    boxes = [_box(out, port, ["--epochs", "6", "--tau-root", "4"]) for _ in range(2)]
    try:
        results = [p.communicate(timeout=280) for p in boxes]
    finally:
        _end(boxes)
    assert [p.returncode for p in boxes] == [0, 0], results
    summary = json.loads((out / "summary.json").read_text())
    assert summary["boxes"] == 2 and summary["final_test_accuracy"] >= 0.97, summary
    assert summary["root_rounds"] > 10 and summary["bytes_between_boxes"] > 0
    assert summary["total_samples_all_boxes"] == 2 * summary["total_samples"]
    # The box centers, tied elastically, end close to each other; a round moves both by the same
    # amount toward their mean, so the mean reported (center.pt) is exactly theirs.
    c0 = Checkpointer(out / "box-0").load()["algorithm"]["center"]
    c1 = Checkpointer(out / "box-1").load()["algorithm"]["center"]
    assert float((c0 - c1).norm() / c0.norm()) < 0.25
    center = torch.cat([t.reshape(-1) for t in torch.load(out / "center.pt", weights_only=True).values()])
    torch.testing.assert_close(center, (c0 + c1) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_boxes_that_disagree_are_refused(tmp_path):
    out, port = tmp_path / "job", _port()
    boxes = [_box(out, port, ["--steps", "50", "--tau", str(tau)]) for tau in (10, 5)]
    try:
        results = [p.communicate(timeout=200) for p in boxes]
    finally:
        _end(boxes)
    assert all(p.returncode != 0 for p in boxes)
    assert any("the boxes disagree on the job" in err for _, err in results), results


@pytest.mark.slow
@pytest.mark.parametrize("restarts", [1, 0])
def test_a_box_killed_mid_run(tmp_path, restarts):
    """SIGKILL of one box's launcher: with --max-restarts 1 the job starts again, every box from
    its own checkpoint, and finishes; without, the other box ends within --root-timeout with one
    line and a checkpoint, whichever notices first: its exchange or its torchrun agent."""
    out, port = tmp_path / "job", _port()
    extra = ["--steps", "700", "--checkpoint-every", "1", "--root-timeout", "20", "--tau-root", "4"]
    boxes = [_box(out, port, extra, restarts=restarts) for _ in range(2)]
    try:
        deadline = time.monotonic() + 180
        while not (out / "box-1" / "checkpoint" / "state.pt").exists():
            assert time.monotonic() < deadline and all(p.poll() is None for p in boxes)
            time.sleep(0.2)
        victims = _launchers(boxes[1].pid)
        assert victims
        os.kill(victims[0], signal.SIGKILL)
        t = time.monotonic()
        results = [p.communicate(timeout=240) for p in boxes]
        took = time.monotonic() - t
    finally:
        _end(boxes)
    if restarts:
        assert [p.returncode for p in boxes] == [0, 0], results
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps_per_worker"] == [700]
    else:
        assert boxes[0].returncode != 0
        # Box 0 ends either way with its checkpoint: its exchange fails, or its own torchrun
        # agent, seeing the job fail, stops it first (SIGTERM, as Ctrl-C).
        err = results[0][1]
        ends = ("the exchange between boxes failed", "interrupted: checkpoint written")
        assert any(e in err for e in ends), err
        ours = err.split(next(e for e in ends if e in err))[0]
        assert "Traceback" not in ours  # one line from us (torchrun reports the exit after it)
        assert took < 20 + 60  # the timeout, and the box's own shutdown
        assert Checkpointer(out / "box-0").load()["elapsed"] > 0
