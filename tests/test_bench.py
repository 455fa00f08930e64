"""`easgd-local bench`: the pure helpers, the whole pipeline with a stand-in for training,
bad input, and one short real bench (marked slow)."""

import json
import sys
from pathlib import Path

import pytest

from easgd_local import bench, calibrate, config, launcher
from easgd_local.cli import main

from .helpers import assert_no_leftovers, leftovers_snapshot

ROW_TYPES = {
    "algo": str, "workers": int, "tau": (int, type(None)), "lr": float, "momentum": float,
    "time_to_target_s": (float, type(None)), "speedup_vs_sgd": (float, type(None)),
    "samples_per_second": float, "efficiency": (float, type(None)), "exchange_fraction": float,
    "bytes_per_sample": (float, type(None)), "final_test_accuracy": float,
    "startup_seconds": float, "train_seconds": float, "run_dir": str, "best": bool,
    "repeats": list,
}
HEADER_KEYS = {"target_accuracy", "time_limit", "dataset", "model", "batch_size", "runs",
               "repeats", "lrs", "one_thread_samples_per_second", "time_to_target_method"}


def _has_type(value, types):
    types = types if isinstance(types, tuple) else (types,)
    # A float that happens to be whole may have been computed as an int (0 bytes, 1 worker).
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, types)


def _summary(algo="easgd", workers=2, tau=10, lr=0.1, sps=1000.0, samples=10_000,
             bytes_exchanged=0, accuracy=0.9, dropped=0):
    return {"algo": algo, "workers": workers, "tau": tau, "alpha": 0.45, "momentum": 0.0, "lr": lr,
            "total_samples": samples, "startup_seconds": 1.5, "train_seconds": 10.0,
            "samples_per_second": sps, "exchanges": 0, "bytes_exchanged": bytes_exchanged,
            "exchange_fraction": 0.01, "final_test_accuracy": accuracy,
            "snapshots_dropped": dropped}


def _run(summary, time, lr=0.1, repeat=0, run_dir="r"):
    """A run's figures as run_bench collects them, with its time to target given."""
    figures = bench.run_figures(summary, [], 0.97, run_dir)
    return {**figures, "time_to_target_s": time, "lr": lr, "repeat": repeat}


# --- pure helpers ---------------------------------------------------------------------------

def test_time_to_target_interpolates_log_error_between_the_straddling_records():
    records = [{"seconds": 1.0, "test_accuracy": 0.5}, {"seconds": 2.0, "test_accuracy": 0.9},
               {"seconds": 4.0, "test_accuracy": 0.99}, {"seconds": 5.0, "test_accuracy": 0.95}]
    # Error 0.1 at 2 s and 0.01 at 4 s: 0.97 (error 0.03) is where log error has fallen
    # log(0.1/0.03) / log(0.1/0.01) of the way, at 2 + 2 * 0.5229 s.
    assert bench.time_to_target(records, 0.97) == pytest.approx(2.0 + 2.0 * 0.52288, abs=1e-4)
    assert bench.time_to_target(records, 0.99) == pytest.approx(4.0)  # reached exactly there
    assert bench.time_to_target(records, 0.9) == pytest.approx(2.0)
    assert bench.time_to_target(records, 0.3) == 1.0  # the first record already reaches it
    assert bench.time_to_target(records, 0.995) is None
    assert bench.time_to_target([], 0.5) is None
    # A perfect record (error 0) is interpolated toward the error floor, never divided by 0.
    t = bench.time_to_target([{"seconds": 1.0, "test_accuracy": 0.9},
                              {"seconds": 2.0, "test_accuracy": 1.0}], 0.99)
    assert 1.0 < t < 2.0


def test_record_spacing():
    records = [{"seconds": s, "test_accuracy": 0.5} for s in (0.5, 1.0, 1.6, 2.0)]
    assert bench.record_spacing(records) == pytest.approx(0.5)
    assert bench.record_spacing(records[:1]) is None


def test_rows_relative_to_sgd():
    runs = [_run(_summary("sgd", 1, sps=1000.0), 10.0, run_dir="runs/1"),
            _run(_summary("easgd", 2, sps=1600.0, samples=20_000, bytes_exchanged=2_000_000), 4.0,
                 run_dir="runs/2"),
            _run(_summary("easgd", 2, tau=4, sps=1800.0), None, run_dir="runs/3")]
    rows = bench.derive_rows(runs)
    assert [set(r) for r in rows] == [set(bench.ROW_KEYS)] * 3
    sgd, fast, never = rows
    assert sgd["speedup_vs_sgd"] == 1.0 and sgd["efficiency"] == 1.0 and sgd["tau"] is None
    assert fast["speedup_vs_sgd"] == pytest.approx(2.5)
    assert fast["efficiency"] == pytest.approx(1600 / (2 * 1000))
    assert fast["bytes_per_sample"] == pytest.approx(100.0) and fast["tau"] == 10
    assert never["speedup_vs_sgd"] is None and never["efficiency"] == pytest.approx(0.9)
    assert never["time_to_target_s"] is None
    assert [r["run_dir"] for r in rows] == ["runs/1", "runs/2", "runs/3"]


def test_rows_without_a_usable_reference():
    # No sgd run at all: no speed-up, no efficiency.
    rows = bench.derive_rows([_run(_summary("easgd"), 3.0)])
    assert rows[0]["speedup_vs_sgd"] is None and rows[0]["efficiency"] is None
    # sgd never reached the target: no speed-up for anyone, efficiency still defined.
    rows = bench.derive_rows([_run(_summary("sgd", 1), None), _run(_summary("easgd"), 3.0)])
    assert [r["speedup_vs_sgd"] for r in rows] == [None, None]
    assert rows[1]["efficiency"] == pytest.approx(0.5)
    # No sample trained: bytes per sample is undefined rather than a division by zero.
    rows = bench.derive_rows([_run(_summary("easgd", samples=0, sps=0.0), None)])
    assert rows[0]["bytes_per_sample"] is None


def test_repeats_give_median_and_spread_against_sgd_of_the_same_repeat():
    sgd_times, easgd_times = [10.0, 8.0, 12.0], [5.0, 2.0, None]
    runs = []
    for r in range(3):
        runs.append(_run(_summary("sgd", 1, sps=1000.0 + r), sgd_times[r], repeat=r))
        runs.append(_run(_summary("easgd", 2, sps=1800.0 + 100 * r), easgd_times[r], repeat=r))
    sgd, easgd = bench.derive_rows(runs)
    # Per repeat: 10/5 = 2, 8/2 = 4, and a run that never got there ranks lowest.
    assert [r["speedup_vs_sgd"] for r in easgd["repeats"]] == [2.0, 4.0, None]
    assert easgd["speedup_vs_sgd"] == 2.0 and easgd["speedup_vs_sgd_max"] == 4.0
    assert easgd["speedup_vs_sgd_min"] is None
    # A time never reached ranks last: median of (2, 5, never) is 5, max is never.
    assert easgd["time_to_target_s"] == 5.0 and easgd["time_to_target_s_min"] == 2.0
    assert easgd["time_to_target_s_max"] is None
    assert sgd["time_to_target_s"] == 10.0 and sgd["time_to_target_s_min"] == 8.0
    assert easgd["samples_per_second"] == 1900.0 and easgd["samples_per_second_min"] == 1800.0
    assert [r["efficiency"] for r in easgd["repeats"]] == pytest.approx(
        [1800 / 2000, 1900 / 2002, 2000 / 2004])
    assert [r["repeat"] for r in easgd["repeats"]] == [0, 1, 2]


def test_each_algorithm_at_its_best_rate_and_sgd_at_its_own():
    runs = [_run(_summary("sgd", 1), 10.0, lr=0.1), _run(_summary("sgd", 1), 6.0, lr=0.2),
            _run(_summary("easgd"), 3.0, lr=0.1), _run(_summary("easgd"), 4.0, lr=0.2)]
    rows = bench.derive_rows(runs)
    best = [(r["algo"], r["lr"]) for r in rows if r["best"]]
    assert best == [("sgd", 0.2), ("easgd", 0.1)]
    # The speed-up is against sgd at its best rate (6 s), never against a worse sgd.
    easgd_best = next(r for r in rows if r["algo"] == "easgd" and r["best"])
    assert easgd_best["speedup_vs_sgd"] == pytest.approx(2.0)
    table = bench.markdown_table(_bench_dict(rows))
    assert "all 4 (algorithm, lr) rows" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 2 + 2  # header, rule, best rows


def test_incomplete_records_give_no_time_to_target():
    records = [{"seconds": 1.0, "test_accuracy": 0.99}]
    figures = bench.run_figures(_summary(dropped=1), records, 0.97, "r")
    assert figures["time_to_target_s"] is None and not figures["records_complete"]
    assert "records incomplete" in bench.result_text(figures, 0.97)
    assert bench.run_figures(_summary(), records, 0.97, "r")["time_to_target_s"] == 1.0


def _bench_dict(rows, repeats=1):
    return {"target_accuracy": 0.97, "time_limit": 60.0, "dataset": "mnist10k", "model": "cnn",
            "batch_size": 32, "algos": ["sgd", "easgd"], "taus": [10], "workers": 2, "lr": 0.1,
            "lrs": [0.1], "momentum": 0.9, "seed": 0, "repeats": repeats, "eval_every": None,
            "devices": ["cpu"], "data_dir": "datasets", "cpu_count": 2,
            "one_thread_samples_per_second": 3000.0, "runs": rows}


def test_markdown_table():
    rows = bench.derive_rows([_run(_summary("sgd", 1), None, run_dir="runs/1-sgd-p1"),
                              _run(_summary("easgd", sps=3710.0), 8.3, run_dir="runs/2-easgd-p2-tau10")])
    text = bench.markdown_table(_bench_dict(rows))
    lines = text.splitlines()
    assert lines[0].startswith("Settings: `easgd-local bench --algos sgd,easgd --workers 2 --taus 10 ")
    assert "--time-limit 60 --target-accuracy 0.97" in lines[0] and lines[1] == ""
    assert "one thread trains 3,000 samples/s" in lines[0]
    table = lines[2:]
    assert len(table) == 2 + 2  # header, rule, one row per run
    assert len({line.count("|") for line in table}) == 1  # every line has the same columns
    assert "time to 97% (s)" in table[0]
    sgd_cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert sgd_cells[:5] == ["1", "sgd", "1", "-", "0.1"] and sgd_cells[5] == "not reached"
    easgd_cells = [c.strip() for c in table[3].strip("|").split("|")]
    assert easgd_cells[5] == "8.3" and easgd_cells[6] == "-" and easgd_cells[7] == "3,710"
    assert easgd_cells[-1] == "runs/2-easgd-p2-tau10"


def test_markdown_table_with_repeats_shows_the_spread():
    runs = [_run(_summary("easgd", sps=1000.0 * (r + 1)), 2.0 + r, repeat=r) for r in range(3)]
    text = bench.markdown_table(_bench_dict(bench.derive_rows(runs), repeats=3))
    assert "median [min, max] of 3" in text
    cells = [c.strip() for c in text.splitlines()[-1].strip("|").split("|")]
    assert cells[5] == "3.0 [2.0, 4.0]" and cells[7] == "2,000 [1,000, 3,000]"


def test_busy_machine_is_reported():
    assert bench.busy_note({"load_average": 0.3, "cpu_count": 2}) is None
    assert bench.busy_note({"load_average": None, "cpu_count": 2}) is None
    assert "load average 1.5 on 2 cores" in bench.busy_note({"load_average": 1.5, "cpu_count": 2})
    line = bench.settings_line(dict(_bench_dict([]), load_average=1.5))
    assert line.endswith("load average 1.5 at the start")


def test_progress_line():
    run = _run(_summary("easgd", sps=3710.0), 8.3)
    assert bench.progress_line(2, 5, run, 0.97) == "[2/5] easgd p=2 tau=10: 97% at 8.3 s, 3,710 samples/s"
    run = _run(_summary("sgd", 1, sps=1000.0, accuracy=0.951), None)
    assert bench.progress_line(1, 5, run, 0.975) == \
        "[1/5] sgd p=1: 97.5% not reached in 10.0 s (final 95.1%), 1,000 samples/s"


def test_plan_expands_taus_scales_momentum_and_keeps_references_single():
    algos = [a for a in ("sgd", "easgd", "eamsgd", "msgd", "ddp") if a in config.ALGOS]
    options = bench.BenchOptions(algos=algos, workers=3, taus=[1, 10], lrs=[0.2], momentum=0.75,
                                 repeats=1)
    plan = [(s.algo, s.tau, s.config.workers, s.config.lr) for s in bench.plan_runs(options)]
    expected = {"sgd": [("sgd", None, None, 0.2)],
                "easgd": [("easgd", 1, 3, 0.2), ("easgd", 10, 3, 0.2)],
                "eamsgd": [("eamsgd", 1, 3, pytest.approx(0.05)), ("eamsgd", 10, 3, pytest.approx(0.05))],
                "msgd": [("msgd", None, None, pytest.approx(0.05))],
                "ddp": [("ddp", None, 3, 0.2)]}
    assert plan == [run for a in algos for run in expected[a]]


def test_plan_interleaves_repeats_with_their_seeds_over_the_grid():
    options = bench.BenchOptions(algos=["sgd", "easgd"], taus=[10], lrs=[0.1, 0.2], repeats=3,
                                 seed=5)
    plan = bench.plan_runs(options)
    assert [(s.repeat, s.algo, s.lr, s.config.seed) for s in plan] == [
        (r, a, lr, 5 + r) for r in range(3) for a in ("sgd", "easgd") for lr in (0.1, 0.2)]
    assert all(s.config.checkpoint_every is None for s in plan)  # timed runs: no checkpoints


def test_parsing():
    assert bench.parse_taus(" 1, 10 ,") == [1, 10]
    assert bench.parse_algos("sgd, easgd") == ["sgd", "easgd"]
    assert bench.parse_lrs("0.05, 0.1") == [0.05, 0.1]
    for bad in ("0", "a", "", "5,5"):
        with pytest.raises(config.ConfigError):
            bench.parse_taus(bad)
    for bad in ("nope", "", "sgd,sgd"):
        with pytest.raises(config.ConfigError):
            bench.parse_algos(bad)
    for bad in ("0", "-1", "x", "", "nan", "inf", "0.1,0.1"):
        with pytest.raises(config.ConfigError):
            bench.parse_lrs(bad)


# --- the whole pipeline, with a stand-in for launcher.train ----------------------------------

@pytest.fixture
def fake_train(monkeypatch):
    """Replaces launcher.train: writes a run directory as train does, in no time."""
    calls = []

    def train(cfg, reporter=None):
        cfg.validate()
        calls.append(cfg)
        out = Path(cfg.out)
        out.mkdir(parents=True)
        # sgd reaches 50% after 1 s, the others after 0.5 s; msgd never does.
        reach = {"sgd": 1.0, "msgd": None}.get(cfg.algo, 0.5)
        with open(out / "metrics.jsonl", "w") as f:
            for seconds in (0.5, 1.0, 1.5):
                accuracy = 0.6 if reach is not None and seconds >= reach else 0.4
                f.write(json.dumps({"seconds": seconds, "samples": 100, "steps": [1],
                                    "test_loss": 1.0, "test_accuracy": accuracy,
                                    "train_loss": 1.0}) + "\n")
        (out / "summary.json").write_text("{}")
        return _summary(cfg.algo, cfg.workers, cfg.tau, cfg.lr, sps=1000.0 * cfg.workers,
                        bytes_exchanged=0 if cfg.workers == 1 else 50_000, accuracy=0.6)

    monkeypatch.setattr(launcher, "train", train)
    monkeypatch.setattr(calibrate, "one_thread_samples_per_second", lambda *a, **k: 3000.0)
    return calls


def _read_outputs(out):
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_pipeline_without_matplotlib(fake_train, monkeypatch, tmp_path, capsys):
    # Every matplotlib module made unimportable, as if it were not installed.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "b"
    args = ["bench", "--algos", "sgd,easgd,msgd", "--taus", "1,10", "--time-limit", "5",
            "--target-accuracy", "0.5", "--lr", "0.2", "--momentum", "0.5", "--repeats", "1",
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr()
    result, table = _read_outputs(out)
    assert not (out / "bench.png").exists()
    assert bench.NO_MATPLOTLIB in printed.err.splitlines()
    assert printed.out == table  # the table is what ends up on stdout

    assert HEADER_KEYS <= set(result) and result["target_accuracy"] == 0.5
    rows = result["runs"]
    assert [(r["algo"], r["workers"], r["tau"]) for r in rows] == [
        ("sgd", 1, None), ("easgd", 2, 1), ("easgd", 2, 10), ("msgd", 1, None)]
    assert [r["run_dir"] for r in rows] == ["runs/1-sgd-p1", "runs/2-easgd-p2-tau1",
                                            "runs/3-easgd-p2-tau10", "runs/4-msgd-p1"]
    assert all((out / r["run_dir"] / "metrics.jsonl").exists() for r in rows)
    # sgd: error 0.6 at 0.5 s, 0.4 at 1 s, so 0.5 is crossed log(0.6/0.5)/log(0.6/0.4) of the way.
    sgd_time = 0.5 + 0.5 * 0.449660
    assert [r["time_to_target_s"] for r in rows] == pytest.approx([sgd_time, 0.5, 0.5, None], abs=1e-5)
    assert [r["speedup_vs_sgd"] for r in rows] == pytest.approx([1.0, sgd_time / 0.5, sgd_time / 0.5, None], abs=1e-5)
    assert result["one_thread_samples_per_second"] == 3000.0 and result["repeats"] == 1
    assert rows[1]["efficiency"] == pytest.approx(1.0) and rows[1]["bytes_per_sample"] == 5.0
    # The momentum reference runs at lr * (1 - momentum); the others at --lr.
    assert [c.lr for c in fake_train] == [0.2, 0.2, 0.2, pytest.approx(0.1)]
    assert [c.time_limit for c in fake_train] == [5.0] * 4
    assert all(c.target_accuracy == 0.5 and c.eval_every is None for c in fake_train)
    assert len(table.splitlines()) == 2 + 2 + len(rows)
    progress = [line for line in printed.err.splitlines() if line.startswith("[")]
    assert progress == ["[1/4] sgd p=1: 50% at 0.7 s, 1,000 samples/s",
                        "[2/4] easgd p=2 tau=1: 50% at 0.5 s, 2,000 samples/s",
                        "[3/4] easgd p=2 tau=10: 50% at 0.5 s, 2,000 samples/s",
                        "[4/4] msgd p=1: 50% not reached in 10.0 s (final 60.0%), 1,000 samples/s"]


def test_pipeline_writes_the_plot(fake_train, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "b"
    assert main(["bench", "--algos", "sgd,easgd", "--quiet", "--out", str(out)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines()
           if "machine was busy" not in line and "one thread" not in line]
    assert err == []  # --quiet: no progress line, and nothing missing
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = _read_outputs(out)[0]
    assert len(result["runs"]) == 2 and result["repeats"] == 3  # the default
    assert len(fake_train) == 6


def test_pipeline_with_repeats_and_a_grid(fake_train, tmp_path, capsys):
    out = tmp_path / "b"
    args = ["bench", "--algos", "sgd,easgd", "--lrs", "0.1,0.2", "--repeats", "2",
            "--target-accuracy", "0.5", "--out", str(out)]
    assert main(args) == 0
    result, table = _read_outputs(out)
    assert [(c.algo, c.lr, c.seed) for c in fake_train] == [
        (a, lr, r) for r in range(2) for a in ("sgd", "easgd") for lr in (0.1, 0.2)]
    rows = result["runs"]
    assert [(r["algo"], r["lr"]) for r in rows] == [("sgd", 0.1), ("sgd", 0.2), ("easgd", 0.1), ("easgd", 0.2)]
    assert all(len(r["repeats"]) == 2 and set(r) == set(bench.ROW_KEYS) for r in rows)
    assert rows[0]["repeats"][1]["run_dir"] == "runs/5-sgd-p1-lr0.1-r1"
    assert sum(r["best"] for r in rows) == 2
    assert "--lrs 0.1,0.2" in table and "--repeats 2" in table


# --- bad input: one line, exit code 2, nothing written --------------------------------------

BAD = [
    (["--algos", "sgd,nope"], "nope"),
    (["--taus", "0"], "--taus"),
    (["--taus", "ten"], "--taus"),
    (["--momentum", "1"], "--momentum"),
    (["--lr", "0"], "--lr"),
    (["--time-limit", "0"], "--time-limit"),
    (["--target-accuracy", "1.5"], "--target-accuracy"),
    (["--workers", "0"], "--workers"),
    (["--devices", "tpu"], "tpu"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_exit_2_with_one_line(args, needle, capsys, tmp_path):
    assert main(["bench", "--algos", "sgd,easgd", "--out", str(tmp_path / "b"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:") and needle in err, err
    assert not (tmp_path / "b").exists()


def test_unknown_algorithm_lists_the_valid_ones(capsys, tmp_path):
    assert main(["bench", "--algos", "nope", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert all(a in err for a in config.ALGOS)


def test_existing_bench_directory_is_refused(capsys, tmp_path):
    (tmp_path / "bench.json").write_text('{"keep": true}')
    assert main(["bench", "--algos", "sgd", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a bench" in err
    assert json.loads((tmp_path / "bench.json").read_text()) == {"keep": True}
    assert not (tmp_path / "runs").exists()


# --- one short real bench -------------------------------------------------------------------

@pytest.mark.slow
def test_short_real_bench(tmp_path, capsys):
    # sgd (the reference) and one with a center; every algorithm trains in its own tests.
    algos = ["sgd", "easgd"]
    before = leftovers_snapshot()
    out = tmp_path / "bench"
    args = ["bench", "--algos", ",".join(algos), "--time-limit", "2", "--target-accuracy", "0.5",
            "--eval-every", "0.5", "--repeats", "1", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert_no_leftovers(before)

    result, table = _read_outputs(out)
    assert HEADER_KEYS <= set(result)
    assert result["time_limit"] == 2.0 and result["target_accuracy"] == 0.5
    rows = result["runs"]
    assert [r["algo"] for r in rows] == algos
    for row in rows:
        assert set(row) == set(bench.ROW_KEYS)
        for key, types in ROW_TYPES.items():
            assert _has_type(row[key], types), (key, row[key])
        assert (out / row["run_dir"] / "summary.json").exists()
        assert 0 < row["final_test_accuracy"] <= 1
    assert rows[0]["workers"] == 1 and rows[0]["speedup_vs_sgd"] in (1.0, None)
    assert rows[0]["efficiency"] == 1.0
    assert len(table.splitlines()) == 4 + len(rows) and printed.out == table
    assert sum(line.startswith("[") for line in printed.err.splitlines()) == len(rows)
    assert result["one_thread_samples_per_second"] > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert bench.NO_MATPLOTLIB in printed.err
    else:
        assert (out / "bench.png").stat().st_size > 0
