"""`easgd-local bench`: its plan, the whole pipeline with a stand-in for training, bad input,
and one short real bench (marked slow). Its pure figures are in test_bench_figures.py."""

import json
import sys
from pathlib import Path

import pytest

from easgd_local import bench, calibrate, config, launcher
from easgd_local.cli import main
from easgd_local.config import TrainConfig
from easgd_local.flags import help_facts

from .helpers import assert_no_leftovers, leftovers_snapshot
from .test_bench_figures import _summary

ROW_TYPES = {
    "algo": str, "workers": int, "tau": (int, type(None)), "lr": float, "momentum": float,
    "time_to_target_s": (float, type(None)), "speedup_vs_sgd": (float, type(None)),
    "samples_per_second": float, "efficiency": (float, type(None)), "exchange_fraction": float,
    "time_to_upper_s": (float, type(None)), "speedup_vs_best_single": (float, type(None)),
    "speedup_vs_best_single_low": (float, type(None)),
    "speedup_vs_best_single_high": (float, type(None)), "best_single": (str, type(None)),
    "bytes_per_sample": (float, type(None)), "final_test_accuracy": float,
    "startup_seconds": float, "train_seconds": float, "run_dir": str, "best": bool,
    "repeats": list,
}
HEADER_KEYS = {"target_accuracy", "target_band", "upper_target", "time_limit", "dataset", "model",
               "batch_size", "runs", "repeats", "lrs", "one_thread_samples_per_second",
               "time_to_target_method"}


def _has_type(value, types):
    types = types if isinstance(types, tuple) else (types,)
    # A float that happens to be whole may have been computed as an int (0 bytes, 1 worker).
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, types)


# --- the plan and the flags -----------------------------------------------------------------

def test_hogwild_is_a_default_row_beside_ddp():
    algos = bench.BenchOptions().algos
    assert algos[:6] == ["sgd", "msgd", "easgd", "eamsgd", "downpour", "ddp"] and "hogwild" in algos
    plan = bench.plan_runs(bench.BenchOptions(algos=["hogwild"], workers=3, taus=[1, 10],
                                              lrs=[0.2], momentum=0.5, repeats=1))
    # No communication period to sweep; a momentum algorithm, so at lr * (1 - momentum).
    assert [(s.tau, s.config.workers, s.config.lr) for s in plan] == [(None, 3, pytest.approx(0.1))]


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


def test_each_algorithm_runs_at_its_own_tau_unless_taus_is_given():
    """train's --tau default is the algorithm's (eamsgd's differs from the rest), and the bench
    without --taus runs each algorithm at it, so that its table measures train's defaults."""
    assert config.ALGORITHMS["eamsgd"].default_tau != config.ALGORITHMS["easgd"].default_tau
    for algo in ("eamsgd", "easgd", "sgd"):
        assert TrainConfig(algo=algo).validate().tau == config.ALGORITHMS[algo].default_tau
    assert TrainConfig(algo="eamsgd", tau=7).validate().tau == 7
    specs = bench.check_options(bench.BenchOptions(algos=["sgd", "easgd", "eamsgd"], repeats=1))
    assert [(s.algo, s.tau, s.config.tau) for s in specs] == [
        ("sgd", None, None), ("easgd", 10, None), ("eamsgd", 4, None)]
    assert [s.name for s in specs] == ["1-sgd-p1", "2-easgd-p2-tau10", "3-eamsgd-p2-tau4"]
    given = bench.check_options(bench.BenchOptions(algos=["eamsgd"], taus=[10], repeats=1))
    assert [(s.tau, s.config.tau) for s in given] == [(10, 10)]
    assert help_facts()["tau_defaults"] == "10 (eamsgd 4)"  # what --tau's help says


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
            "--target-accuracy", "0.5", "--target-band", "0", "--lr", "0.2", "--momentum", "0.5",
            "--repeats", "1", "--out", str(out)]  # band 0: the one crossing, exact below
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
    # settings, blank, header, rule, the rows, then a blank and what "best single" is, a blank
    # and the bench's wall time
    assert len(table.splitlines()) == 2 + 2 + len(rows) + 4
    assert "(sgd lr=0.2)" in table.splitlines()[-3]
    assert table.splitlines()[-1].startswith("The bench took ") and "3,000 samples/s" in table
    assert result["wall_seconds"] >= 0
    assert [r["best_single"] for r in rows] == ["sgd lr=0.2"] * 4
    assert [r["speedup_vs_best_single"] for r in rows] == pytest.approx(
        [1.0, sgd_time / 0.5, sgd_time / 0.5, None], abs=1e-5)
    assert result["upper_target"] == pytest.approx(0.52)
    # 0.52 is reached where 0.5 is (records at 0.4, then 0.6), a little later.
    assert rows[0]["time_to_upper_s"] > rows[0]["time_to_target_s"]
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
           if "machine was busy" not in line and "one thread" not in line
           and "of wall time" not in line]
    assert err == []  # --quiet: no progress line, and nothing missing
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = _read_outputs(out)[0]
    assert len(result["runs"]) == 2 and result["repeats"] == 5  # the default
    assert len(fake_train) == 10
    # No run reached 97%: every repeat trains the whole --time-limit.
    assert [c.time_limit for c in fake_train] == [60.0] * 10


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
    # The first sgd run trains the whole limit; the runs after it in the first repeat 4 x its
    # crossing, the second repeat 3 x its configuration's first: here both the 10 s floor.
    assert [c.time_limit for c in fake_train] == [60.0] + [10.0] * 7


# --- bad input: one line, exit code 2, nothing written --------------------------------------

BAD = [
    (["--algos", "sgd,nope"], "nope"),
    (["--taus", "0"], "--taus"),
    (["--taus", "ten"], "--taus"),
    (["--momentum", "1"], "--momentum"),
    (["--lr", "0"], "--lr"),
    (["--time-limit", "0"], "--time-limit"),
    (["--target-accuracy", "1.5"], "--target-accuracy"),
    (["--upper-target", "0.9"], "--upper-target"),  # not above the target (95%)
    (["--target-band", "0.06"], "--target-band"),  # 95% + 6 points is above 100%
    (["--target-band", "-0.01"], "--target-band"),
    (["--upper-target", "0"], "--upper-target"),
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
    assert sum(line.startswith("| ") for line in table.splitlines()) == 2 + len(rows)
    assert printed.out == table
    assert sum(line.startswith("[") for line in printed.err.splitlines()) == len(rows)
    assert result["one_thread_samples_per_second"] > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert bench.NO_MATPLOTLIB in printed.err
    else:
        assert (out / "bench.png").stat().st_size > 0
