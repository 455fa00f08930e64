"""`easgd-local scale`: the queueing model, a quick sweep end to end, and a sweep that loses a
worker to kill -9 and ends cleanly. Figures are not checked (a benchmark, not a test)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from easgd_local.scale import predict, summarize

from .helpers import _children, _descendants, _is_resource_tracker, assert_no_leftovers, \
    leftovers_snapshot


def test_model_is_m_d_1_on_the_lock():
    # cycle 1.0 + 0.1 s; service 0.05 s; p = 4: rho = 4 * 0.05 / 1.1
    m = predict(4, 10, 0.1, 0.1, 0.05, stripes=1, cores=64)
    rho = 4 * 0.05 / 1.1
    assert m["rho_lock"] == pytest.approx(rho)
    assert m["wait_mean"] == pytest.approx(rho * 0.05 / (2 * (1 - rho)))
    assert m["efficiency"] == pytest.approx(1.0 / (1.1 + m["wait_mean"]))
    assert m["exchanges_per_second"] == pytest.approx(4 * m["efficiency"] / 1.0)


def test_model_stripes_shorten_the_service_and_the_bounds_hold():
    one, eight = predict(8, 1, 0.03, 0.02, 0.02, cores=64), predict(8, 1, 0.03, 0.02, 0.02, 8, 64)
    assert eight["wait_mean"] < one["wait_mean"] and eight["efficiency"] > one["efficiency"]
    saturated = predict(16, 1, 0.01, 0.05, 0.05, cores=64)  # rho > 1: the lock bounds the flow
    assert math.isinf(saturated["wait_mean"])
    assert saturated["efficiency"] == pytest.approx(0.01 / (16 * 0.05))
    cpu_bound = predict(16, 1, 0.01, 0.05, 0.0, cores=2)  # no lock time: the cores bound it
    assert cpu_bound["efficiency"] == pytest.approx(2 * 0.01 / (16 * 0.05))


def test_summary_of_a_point():
    workers = [{"begin": 0.0, "end": 2.0, "steps": 10, "step_seconds": 1.0,
                "nominal_step_seconds": 1.0, "exchanges": 2, "exchange_seconds": 0.5,
                "held_seconds": 0.2, "waits": [0.0, 0.1], "finite": True}] * 2
    s = summarize(workers, stripes=2, step=0.1)
    assert s["exchanges_per_second"] == 2.0 and s["lock_held_share"] == pytest.approx(0.1)
    assert s["wait_mean"] == pytest.approx(0.05) and s["wait_p99"] == 0.1
    assert s["efficiency"] == 0.5 and s["exchange_share"] == 0.25 and s["finite"]


def _scale(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "easgd_local", "scale", "--quick", "--out",
                             str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_quick_sweep_writes_json_table_and_plot(tmp_path):
    before = leftovers_snapshot()
    proc = _scale(tmp_path / "s")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    result = json.loads((tmp_path / "s" / "scale.json").read_text())
    assert len(result["points"]) == 2 * 2 * 2  # p x tau x stripes of the quick grid
    for point in result["points"]:
        assert point["finite"] and point["exchanges"] > 0
        assert 0 < point["efficiency"] <= 1.05 and 0 <= point["exchange_share"] < 1
        assert point["wait_p99"] >= point["wait_mean"] >= 0
    assert result["alone"]["200000"]["exchange_seconds"] > 0
    rows = [line for line in out.splitlines() if line.startswith("| ") and "200000" in line]
    assert len(rows) == 8 and (tmp_path / "s" / "scale.png").stat().st_size > 0
    assert_no_leftovers(before)


def _sweep_workers(pid: int, timeout: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = [k for k in _children(pid) if not _is_resource_tracker(k)]
        if len(kids) == 2:
            return sorted(kids)
        time.sleep(0.1)
    raise AssertionError("the sweep's workers did not start")


def test_sweep_worker_killed_ends_cleanly(tmp_path):
    before = leftovers_snapshot()
    proc = _scale(tmp_path / "s")
    workers = _sweep_workers(proc.pid)
    time.sleep(1.0)
    os.kill(workers[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: emulated worker 1 died"), err
    assert "Traceback" not in err
    assert not (_descendants(proc.pid) if proc.poll() is None else set())
    for pid in workers:  # no orphan: both of the sweep's workers are gone
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)
    assert_no_leftovers(before)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_paced_copies_last_at_least_size_over_bandwidth(monkeypatch):
    """--copy-gbps: each of an exchange's two copies lasts at least size / bandwidth (a sleep
    for the rest after the real copy), and the exchange still adds its difference to the
    center. The sleeps are recorded, not slept, so a busy machine cannot change the result."""
    import torch

    from easgd_local import emulate
    from easgd_local.center import SharedCenter

    slept: list[float] = []
    monkeypatch.setattr(emulate.time, "sleep", slept.append)
    center = SharedCenter(torch.zeros(250_000))  # 1 MB of float32
    try:
        paced = emulate.HostSideLink(center, copy_gbps=0.0004)  # 1 MB at 0.4 MB/s: 2.5 s a copy
        assert paced.copy_seconds == pytest.approx(2.5)
        paced.exchange(torch.zeros(250_000), 0.1)
        assert len(slept) == 2 and all(2.0 < s <= 2.5 for s in slept)  # 2.5 s less the copy
        assert torch.allclose(center.snapshot(), torch.full((250_000,), 1e-6))
        assert emulate.HostSideLink(center).copy_seconds == 0.0  # unpaced by default
        slept.clear()
        emulate.HostSideLink(center).exchange(torch.zeros(250_000), 0.1)
        assert slept == []
    finally:
        center.close()


@pytest.mark.parametrize("extra, needle", [
    ({"copy_gbps": -1.0}, "--copy-gbps must be >= 0"),
    ({"copy_gbps": 12.0, "host": "cpu"}, "--copy-gbps paces"),
])
def test_bad_copy_bandwidth_is_one_line(tmp_path, extra, needle):
    from easgd_local.config import ConfigError
    from easgd_local.scale import options_from_text

    args = dict(out=tmp_path, p="1,2", sizes="resnet18", taus="1", steps_ms="30", stripes="1",
                device="cpu", seconds=1.0, quick=False)
    with pytest.raises(ConfigError, match=needle):
        options_from_text(**args, **extra)
    assert options_from_text(**args, copy_gbps=12.0).copy_gbps == 12.0
