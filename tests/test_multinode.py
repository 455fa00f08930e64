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

import torch.distributed as dist

from easgd_local.checkpoint import Checkpointer
from easgd_local.cli import main
from easgd_local.config import TrainConfig
from easgd_local.hierarchy import REPLICATED, Level
from easgd_local.multinode import BoxLink, config_hash
from easgd_local.shared import ProcessLock, SharedTensor

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


def _boxes_level(beta=0.9, boxes=2, tau=4):
    return Level("boxes", "root of the boxes", boxes, tau, beta, REPLICATED)


def test_one_round_moves_the_box_toward_the_root_and_the_root_toward_the_mean(monkeypatch):
    """Synchronous EASGD one level up, pinned on numbers exact in float32: box 0's center moves
    toward the root, not toward the boxes' mean; the root moves toward the mean at 2 alpha.
    What travels is each box's move d_k = alpha (c_k - r) and its done flag."""
    c0 = torch.tensor([1.0, -2.0, 4.0, 0.5, 8.0])
    c1 = torch.tensor([3.0, 0.0, -4.0, 2.5, 8.0])  # the other box's center
    r = torch.tensor([0.0, 1.0, 2.0, -1.0, 6.0])
    alpha = 0.25
    seen = []

    def other_box(t, **kwargs):  # the all-reduce adds box 1's move and its done flag
        seen.append(t.clone())
        t.add_(torch.cat([alpha * (c1 - r), torch.tensor([1.0])]))

    monkeypatch.setattr(dist, "all_reduce", other_box)
    center = SharedTensor(c0, ProcessLock())
    link = BoxLink(rank=0, world=2, level=_boxes_level(beta=2 * alpha), timeout=1.0,
                   root=r.clone())
    try:
        link.round(center, exchanges=4.0, done=True)
        assert torch.equal(seen[0], torch.cat([alpha * (c0 - r), torch.tensor([1.0])]))
        assert torch.equal(center.data, c0 - alpha * (c0 - r))
        assert torch.equal(link.root, r + 2 * alpha * ((c0 + c1) / 2 - r))
        assert link.all_done and link.rounds == 1 and link.last_exchanges == 4.0
        assert torch.equal(link.state()["root"], link.root) and link.state()["rounds"] == 1
    finally:
        center.lock.close()


def test_the_root_is_box_0s_and_comes_back_from_a_checkpoint(monkeypatch):
    """start_root broadcasts from box 0: its initial center, or the root of its checkpoint."""
    box0 = torch.tensor([5.0, 6.0])
    calls = []

    def from_box_0(t, src):  # what box 1 receives
        calls.append(src)
        t.copy_(box0)

    monkeypatch.setattr(dist, "broadcast", from_box_0)
    link = BoxLink(rank=1, world=2, level=_boxes_level(), timeout=1.0)
    link.start_root(torch.tensor([1.0, 2.0]), None)
    assert torch.equal(link.root, box0) and link.rounds == 0
    # After a restart box 1 has a root of its own, saved at another round: box 0's wins.
    link = BoxLink(rank=1, world=2, level=_boxes_level(), timeout=1.0)
    link.start_root(torch.tensor([1.0, 2.0]), {"root": torch.tensor([3.0, 4.0]), "rounds": 9})
    assert torch.equal(link.root, box0) and link.rounds == 9
    saved = {"root": torch.tensor([7.0, 8.0]), "rounds": 12}
    monkeypatch.setattr(dist, "broadcast", lambda t, src: calls.append(src))  # we are box 0
    link = BoxLink(rank=0, world=2, level=_boxes_level(), timeout=1.0)
    link.start_root(torch.tensor([1.0, 2.0]), saved)
    assert torch.equal(link.root, saved["root"]) and link.rounds == 12 and calls == [0, 0, 0]


BOX_ALGOS = ["easgd", "eamsgd", "downpour", "easgd-tree"]
BAD_BOX = [(["--box-beta", "-1"], "--box-beta must be in (0, 1]"),
           (["--box-beta", "7"], "--box-beta must be in (0, 1]"),
           (["--box-beta", "0"], "--box-beta must be in (0, 1]"),
           (["--box-beta", "nan"], "--box-beta must be a finite number"),
           (["--box-tau", "0"], "--box-tau must be >= 1")]


@pytest.mark.parametrize("algo", BOX_ALGOS)
@pytest.mark.parametrize("args,needle", BAD_BOX, ids=[" ".join(a) for a, _ in BAD_BOX])
def test_bad_box_options_are_one_line(algo, args, needle, capsys, tmp_path, monkeypatch):
    """Checked before torchrun's environment is looked for: one line, exit 2, nothing written."""
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "r"
    assert main(["train", "--multi-node", "--algo", algo, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err, err
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["--box-tau", "4"], "--box-tau applies to the rounds between boxes"),
    (["--box-beta", "0.5"], "--box-beta applies to the rounds between boxes"),
    (["--multi-node", "--algo", "easgd", "--tau-root", "2"],
     "--tau-root applies to easgd-tree, not easgd"),
    (["--multi-node", "--algo", "eamsgd", "--beta-root", "0.5"],
     "--beta-root applies to easgd-tree"),
])
def test_box_options_go_with_multi_node_and_tree_options_with_the_tree(args, needle, capsys,
                                                                         tmp_path):
    assert main(["train", "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err, err


def test_the_tree_takes_both_levels_and_the_boxes_agree_on_them(capsys, tmp_path, monkeypatch):
    """easgd-tree under --multi-node: --tau-root is the tree's in a box, --box-tau the boxes'
    (validation passes; torchrun's environment is what is missing). --box-tau and --box-beta are
    part of what the boxes must agree on."""
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    args = ["train", "--multi-node", "--algo", "easgd-tree", "--workers", "2", "--tau-root", "2",
            "--beta-root", "0.5", "--box-tau", "3", "--box-beta", "0.7",
            "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert "torchrun" in capsys.readouterr().err
    config = TrainConfig(algo="easgd-tree", workers=2, multi_node=True, box_tau=3, box_beta=0.7,
                         options={"tau_root": 2, "beta_root": 0.5}).validate()
    assert config.resolved_options["tau_root"] == 2 and config.box_tau == 3
    default = TrainConfig(algo="easgd", workers=1, multi_node=True).validate()
    assert (default.box_tau, default.box_beta) == (4, 0.9)
    same = TrainConfig(algo="easgd", workers=1, multi_node=True, box_tau=4, box_beta=0.9).validate()
    assert config_hash(same) == config_hash(default)
    for change in ({"box_tau": 5}, {"box_beta": 0.8}):
        other = TrainConfig(algo="easgd", workers=1, multi_node=True, **change).validate()
        assert config_hash(other) != config_hash(default)


@pytest.mark.slow
def test_two_boxes_train_to_97_and_agree(tmp_path):
    out, port = tmp_path / "job", _port()
    boxes = [_box(out, port, ["--epochs", "6", "--box-tau", "4"]) for _ in range(2)]
    try:
        results = [p.communicate(timeout=280) for p in boxes]
    finally:
        _end(boxes)
    assert [p.returncode for p in boxes] == [0, 0], results
    summary = json.loads((out / "summary.json").read_text())
    assert summary["boxes"] == 2 and summary["final_test_accuracy"] >= 0.97, summary
    assert summary["root_rounds"] > 10 and summary["bytes_between_boxes"] > 0
    assert summary["total_samples_all_boxes"] == 2 * summary["total_samples"]
    assert summary["box_tau"] == 4 and summary["alpha_root"] == pytest.approx(0.9 / 2)
    # The tree of centers as data: each box's worker tied to its center, the centers to the root.
    levels = [(lv["children"], lv["count"], lv["period"], lv["transport"])
              for lv in summary["hierarchy"]]
    assert levels == [("workers", 1, summary["tau"], "shared"), ("boxes", 2, 4, "replicated")]
    assert summary["hierarchy"][1]["alpha"] == pytest.approx(0.9 / 2)
    # Box 0 alone evaluates while training; box 1's configuration is its own, unchanged.
    box1 = json.loads((out / "box-1" / "summary.json").read_text())
    assert summary["eval_snapshots"] > 0 and box1["eval_snapshots"] == 0
    config1 = json.loads((out / "box-1" / "config.json").read_text())
    assert config1["eval_every"] is None
    # The box centers, tied elastically to the root, end close to each other. The root is
    # replicated: both boxes end after the same last round with the same root, and that root is
    # the model reported (center.pt), not the mean of the centers.
    saved = [Checkpointer(out / f"box-{k}").load() for k in (0, 1)]
    c0, c1 = (s["algorithm"]["center"] for s in saved)
    assert float((c0 - c1).norm() / c0.norm()) < 0.25
    root = saved[0]["box"]["root"]
    assert torch.equal(root, saved[1]["box"]["root"])
    assert saved[0]["box"]["rounds"] == saved[1]["box"]["rounds"] == summary["root_rounds"]
    center = torch.cat([t.reshape(-1) for t in torch.load(out / "center.pt", weights_only=True).values()])
    torch.testing.assert_close(center, root.to(center.dtype), rtol=0, atol=0)
    assert not torch.equal(root, (c0 + c1) / 2)


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
    extra = ["--steps", "700", "--checkpoint-every", "1", "--root-timeout", "20", "--box-tau", "4"]
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
        # Each box resumed its center from its own checkpoint and the root from box 0's: the
        # replicas agree to the end.
        roots = [Checkpointer(out / f"box-{k}").load()["box"]["root"] for k in (0, 1)]
        assert torch.equal(roots[0], roots[1])
    else:
        assert boxes[0].returncode != 0
        # Box 0 ends either way with its checkpoint: its exchange fails, or its own torchrun
        # agent, seeing the job fail, stops it first (SIGTERM, as Ctrl-C).
        err = results[0][1]
        ends = ("the exchange between boxes failed", "; continue with: easgd-local train --resume")
        assert any(e in err for e in ends), err
        ours = err.split(next(e for e in ends if e in err))[0]
        assert "Traceback" not in ours  # one line from us (torchrun reports the exit after it)
        assert took < 20 + 60  # the timeout, and the box's own shutdown
        assert Checkpointer(out / "box-0").load()["elapsed"] > 0


def test_resume_takes_each_boxs_own_configuration_and_checkpoint(tmp_path, monkeypatch, capsys):
    """Box 0 keeps its configuration in OUT and its checkpoints in OUT/box-0, box k both in
    OUT/box-k; --resume OUT without torchrun, or --resume OUT/box-k, says what to do."""
    from easgd_local.resume import resume_dirs as _resume_dirs

    out = tmp_path / "job"
    for k in (0, 1):
        (out / f"box-{k}").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "box-1" / "config.json").write_text("{}")
    for key, value in (("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RANK", "0")
    assert _resume_dirs(out) == (out, out / "box-0")
    monkeypatch.setenv("RANK", "1")
    assert _resume_dirs(out) == (out / "box-1", out / "box-1")
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key)
    for where, needle in ((out, "a job of several boxes; resume it with the torchrun command"),
                          (out / "box-0", "one box of a job of several boxes")):
        assert main(["train", "--resume", str(where)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err and f"--resume {out} added" in err, err


@pytest.mark.slow
def test_a_job_of_two_boxes_is_resumed_by_hand(tmp_path):
    """A box killed without --max-restarts ends the job; the same torchrun command with
    --resume OUT added, on both boxes, continues it: box 0 from OUT/box-0/checkpoint with the
    configuration in OUT, box 1 from OUT/box-1, to the end."""
    out = tmp_path / "job"
    extra = ["--steps", "600", "--checkpoint-every", "1", "--root-timeout", "20", "--box-tau", "4"]
    port = _port()
    boxes = [_box(out, port, extra) for _ in range(2)]
    try:
        deadline = time.monotonic() + 180
        while not all((out / f"box-{k}" / "checkpoint" / "state.pt").exists() for k in (0, 1)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in boxes)
            time.sleep(0.2)
        victims = _launchers(boxes[1].pid)
        assert victims
        os.kill(victims[0], signal.SIGKILL)
        for p in boxes:
            p.communicate(timeout=240)
    finally:
        _end(boxes)
    assert boxes[0].returncode != 0
    steps = [Checkpointer(out / f"box-{k}").load()["steps"].tolist() for k in (0, 1)]
    assert all(s[0] < 600 for s in steps), steps

    port = _port()
    boxes = [_box(out, port, [*extra, "--resume", str(out)], run_id="again") for _ in range(2)]
    try:
        results = [p.communicate(timeout=280) for p in boxes]
    finally:
        _end(boxes)
    assert [p.returncode for p in boxes] == [0, 0], results
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_per_worker"] == [600] and summary["boxes"] == 2, summary
    saved = [Checkpointer(out / f"box-{k}").load() for k in (0, 1)]
    assert [s["steps"].tolist() for s in saved] == [[600], [600]]
    assert torch.equal(saved[0]["box"]["root"], saved[1]["box"]["root"])
