"""`easgd-local bench`: its pure figures (time to target, rows, the bootstrapped speed-up
against the best single worker) and the table and lines made of them."""

import math
from typing import Any

import pytest

from easgd_local import bench


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


def test_bootstrap_ratio_of_medians_with_its_interval():
    num = [6.0, 5.0, 7.0, 6.5, 5.5, 6.0, 7.5, 6.0]
    den = [2.0, 3.0, 1.0, 2.5, 2.0, 4.0, 2.0, 1.5]
    ratio, low, high = bench.bootstrap_ratio(num, den)
    assert ratio == 3.0  # median 6 over median 2, not the median of per-pair ratios (3.4)
    # The central 90% of the resampled ratios: inside, not at, the extreme ratios 1.25 and 7.5.
    assert 1.25 < low < ratio < high < 7.5
    assert (low, high) == pytest.approx((2.18, 3.67), abs=0.01)
    assert bench.bootstrap_ratio(num, den) == (ratio, low, high)  # a fixed seed: the same
    assert bench.bootstrap_ratio(num, den, seed=1) != (ratio, low, high)
    wide, narrow = (bench.bootstrap_ratio(num, den, level=lv) for lv in (0.99, 0.5))
    assert wide[1] < low < narrow[1] and narrow[2] < high < wide[2]
    assert bench.bootstrap_ratio([2.0] * 3, [1.0] * 4) == (2.0, 2.0, 2.0)  # no spread, none
    # Three repeats each: the interval may reach the extreme ratios.
    assert bench.bootstrap_ratio([6.0, 5.0, 7.0], [4.0, 1.0, 2.0]) == (3.0, 1.25, 7.0)
    # Never reached (inf): a denominator that never gets there is no speed-up at all.
    assert bench.bootstrap_ratio([4.0], [math.inf]) == (0.0, 0.0, 0.0)
    assert bench.bootstrap_ratio([math.inf], [2.0])[0] == math.inf
    ratio, low, high = bench.bootstrap_ratio([4.0, 4.0, 4.0], [2.0, 2.0, math.inf])
    # Resamples that draw the never-reached repeat twice have no speed-up: the low end is 0.
    assert ratio == 2.0 and low == 0.0 and high == 2.0
    ratio, low, high = bench.bootstrap_ratio([4.0, 4.0], [2.0, math.inf])
    assert ratio == 0.0 and low == 0.0 and high == 2.0
    with pytest.raises(ValueError):
        bench.bootstrap_ratio([], [1.0])


def test_speedup_against_the_best_single_worker_at_its_best_rate():
    times = {("sgd", 0.1): [10.0, 8.0, 12.0], ("sgd", 0.2): [9.0, 9.0, 9.0],
             ("msgd", 0.1): [6.0, 5.0, 7.0], ("msgd", 0.2): [None, None, None],
             ("easgd", 0.1): [4.0, 1.0, 2.0]}
    runs = [_run(_summary(algo, 2 if algo == "easgd" else 1), t, lr=lr, repeat=r)
            for r in range(3) for (algo, lr), ts in times.items() for t in [ts[r]]]
    rows = {(r["algo"], r["lr"]): r for r in bench.derive_rows(runs)}
    easgd = rows[("easgd", 0.1)]
    # msgd at 0.1 is the fastest one-worker reference (median 6 s): 6 / 2 = 3.
    assert easgd["best_single"] == "msgd lr=0.1" and easgd["speedup_vs_best_single"] == 3.0
    assert (easgd["speedup_vs_best_single_low"], easgd["speedup_vs_best_single_high"]) == \
        bench.bootstrap_ratio([6.0, 5.0, 7.0], [4.0, 1.0, 2.0])[1:]
    # Kept beside it: per repeat against sgd at its best rate (0.2, 9 s), then the median.
    assert easgd["speedup_vs_sgd"] == pytest.approx(4.5)
    assert rows[("msgd", 0.1)]["speedup_vs_best_single"] == 1.0
    assert rows[("sgd", 0.2)]["speedup_vs_best_single"] == pytest.approx(6.0 / 9.0)
    assert rows[("msgd", 0.2)]["speedup_vs_best_single"] is None  # never reached
    table = bench.markdown_table(_bench_dict([rows[k] for k in rows], repeats=3))
    easgd_line = next(line for line in table.splitlines() if "| easgd |" in line)
    low, high = easgd["speedup_vs_best_single_low"], easgd["speedup_vs_best_single_high"]
    assert f"| 3.00x [{low:.2f}, {high:.2f}] |" in easgd_line
    assert table.splitlines()[-1].startswith("Each algorithm at its best learning rate")
    assert "(msgd lr=0.1)" in table and "90% bootstrap interval" in table


def test_time_to_the_upper_target():
    records = [{"seconds": 1.0, "samples": 100, "test_accuracy": 0.9},
               {"seconds": 2.0, "samples": 300, "test_accuracy": 0.96},
               {"seconds": 3.0, "samples": 400, "test_accuracy": 0.98}]
    figures = bench.run_figures(_summary(), records, 0.95, "r", upper=0.97)
    assert figures["time_to_upper_s"] == pytest.approx(bench.time_to_target(records, 0.97))
    assert 1.0 < figures["time_to_target_s"] < 2.0 < figures["time_to_upper_s"] < 3.0
    assert bench.run_figures(_summary(), records, 0.95, "r")["time_to_upper_s"] is None
    assert bench.BenchOptions().target_accuracy == 0.95  # the headline, where crossings reproduce
    assert bench.upper_target(bench.BenchOptions()) == 0.97  # 2 points above it
    assert bench.upper_target(bench.BenchOptions(target_accuracy=0.5, upper_target=0.7)) == 0.7
    assert bench.upper_target(bench.BenchOptions(target_accuracy=0.99)) is None  # 101%: none


def test_the_band_time_is_the_geometric_mean_of_five_crossings():
    """--target-band 0.02 around 95%: the first crossings of 93, 94, 95, 96 and 97%, each read
    as time_to_target reads one, then their geometric mean; None if 97% was never reached."""
    records = [{"seconds": 1.0, "samples": 100, "test_accuracy": 0.90},
               {"seconds": 2.0, "samples": 300, "test_accuracy": 0.955},
               {"seconds": 3.0, "samples": 400, "test_accuracy": 0.94},  # a dip: not a crossing
               {"seconds": 4.0, "samples": 600, "test_accuracy": 0.98}]
    assert bench.band_targets(0.95, 0.02) == [0.93, 0.94, 0.95, 0.96, 0.97]
    assert bench.band_targets(0.95, 0.0) == [0.95]
    crossings = [bench.time_to_target(records, t) for t in (0.93, 0.94, 0.95, 0.96, 0.97)]
    assert crossings[0] < crossings[2] < 2.0 < 3.0 < crossings[3] < crossings[4] < 4.0
    want = math.exp(sum(math.log(c) for c in crossings) / 5)
    figures = bench.run_figures(_summary(), records, 0.95, "r", band=0.02)
    assert figures["time_to_target_s"] == pytest.approx(want)
    assert figures["samples_to_target"] == pytest.approx(bench.band_time(
        records, [0.93, 0.94, 0.95, 0.96, 0.97], "samples"))
    assert bench.run_figures(_summary(), records, 0.95, "r")["time_to_target_s"] == \
        pytest.approx(crossings[2])  # no band: the one crossing
    assert bench.run_figures(_summary(), records[:3], 0.95, "r", band=0.02)[
        "time_to_target_s"] is None  # 96% and 97% never reached
    assert bench.target_label(0.95, 0.02) == "93-97%" and bench.target_label(0.95) == "95%"


def test_samples_to_target_read_as_the_time_is():
    """The same crossing in samples: 0.95 lies between the records at 100 and 300 samples,
    where it lies between 1 s and 2 s, at the same fraction of the way."""
    records = [{"seconds": 1.0, "samples": 100, "test_accuracy": 0.9},
               {"seconds": 2.0, "samples": 300, "test_accuracy": 0.96}]
    figures = bench.run_figures(_summary(), records, 0.95, "r")
    fraction = figures["time_to_target_s"] - 1.0
    assert figures["samples_to_target"] == pytest.approx(100 + 200 * fraction)
    assert bench.time_to_target(records, 0.99, "samples") is None
    assert bench.time_to_target([{"seconds": 1.0, "test_accuracy": 0.99}], 0.95, "samples") is None


def test_the_speed_up_splits_into_samples_and_rate():
    """sample_factor x rate_factor: the single worker needs 1,000 samples at 100/s (10 s); the
    row needs 1,250 samples at 250/s (5 s): 2x = 0.8 x 2.5."""
    runs = []
    for r in range(3):
        runs.append({**_run(_summary("sgd", 1, sps=100.0), 10.0, repeat=r),
                     "samples_to_target": 1000.0})
        runs.append({**_run(_summary("easgd", sps=250.0), 5.0, repeat=r),
                     "samples_to_target": 1250.0})
        runs.append({**_run(_summary("easgd", tau=4, sps=300.0), None, repeat=r),
                     "samples_to_target": None})
    rows = {(r["algo"], r["tau"]): r for r in bench.derive_rows(runs)}
    row = rows[("easgd", 10)]
    assert row["sample_factor"] == pytest.approx(0.8) and row["rate_factor"] == pytest.approx(2.5)
    assert row["sample_factor"] * row["rate_factor"] == pytest.approx(
        row["speedup_vs_best_single"])
    assert rows[("easgd", 4)]["sample_factor"] is None  # never reached: no factor
    assert rows[("easgd", 4)]["rate_factor"] == pytest.approx(3.0)
    table = bench.markdown_table(_bench_dict(list(rows.values()), repeats=3))
    assert "| 0.80 x 2.50 |" in table and "Samples x rate" in table



def test_incomplete_records_give_no_time_to_target():
    records = [{"seconds": 1.0, "test_accuracy": 0.99}]
    figures = bench.run_figures(_summary(dropped=1), records, 0.97, "r")
    assert figures["time_to_target_s"] is None and not figures["records_complete"]
    assert "records incomplete" in bench.result_text(figures, 0.97)
    assert bench.run_figures(_summary(), records, 0.97, "r")["time_to_target_s"] == 1.0


def _bench_dict(rows, repeats=1):
    return {"target_accuracy": 0.95, "upper_target": 0.97, "time_limit": 60.0, "dataset": "mnist10k", "model": "cnn",
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
    assert "--time-limit 60 --target-accuracy 0.95 --target-band 0 --upper-target 0.97" in lines[0]
    assert lines[1] == ""
    assert "one thread trains 3,000 samples/s" in lines[0]
    table = lines[2:]
    assert len(table) == 2 + 2  # header, rule, one row per run
    assert len({line.count("|") for line in table}) == 1  # every line has the same columns
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[5:10] == ["speed-up vs best single", "speed-up at 97%", "samples x rate",
                            "time to 95% (s)", "time to 97% (s)"]
    sgd_cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert sgd_cells[:5] == ["1", "sgd", "1", "-", "0.1"] and sgd_cells[8] == "not reached"
    easgd_cells = [c.strip() for c in table[3].strip("|").split("|")]
    # No single worker reached the target: no speed-up against it, nor against sgd.
    assert easgd_cells[5:8] == ["-", "-", "-"] and easgd_cells[8] == "8.3"
    assert easgd_cells[10] == "-" and easgd_cells[11] == "3,710"
    assert easgd_cells[-1] == "runs/2-easgd-p2-tau10"


def test_markdown_table_with_repeats_shows_the_spread():
    runs = [_run(_summary("easgd", sps=1000.0 * (r + 1)), 2.0 + r, repeat=r) for r in range(3)]
    text = bench.markdown_table(_bench_dict(bench.derive_rows(runs), repeats=3))
    assert "median [min, max] of 3" in text
    cells = [c.strip() for c in text.splitlines()[-1].strip("|").split("|")]
    assert cells[8] == "3.0 [2.0, 4.0]" and cells[11] == "2,000 [1,000, 3,000]"
    assert cells[10] == "-"  # no sgd in this bench: no speed-up against it, not "- [-, -]"


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


def _spec(algo: str, repeat: int, tau: int | None = 10, lr: float = 0.2) -> Any:
    return bench.RunSpec(index=1, algo=algo, tau=tau, lr=lr, repeat=repeat, config=None)


@pytest.mark.parametrize("factor, first, expected", [
    (3.0, 2.0, 10.0),    # 3 x 2 s is below the floor of 10 s
    (3.0, 8.0, 24.0),    # 3 x the first repeat's crossing
    (3.0, 30.0, 60.0),   # never above --time-limit
    (3.0, None, 60.0),   # the first repeat did not reach the target: the whole limit
    (0.0, 8.0, 60.0),    # trimming switched off
])
def test_later_repeats_train_a_multiple_of_the_first_crossing(factor, first, expected):
    options = bench.BenchOptions(time_limit=60.0, trim_factor=factor)
    done = [{"algo": "easgd", "tau": 10, "lr": 0.2, "repeat": 0, "time_to_target_s": first},
            {"algo": "easgd", "tau": 10, "lr": 0.4, "repeat": 0, "time_to_target_s": 1.0},
            {"algo": "sgd", "tau": None, "lr": 0.2, "repeat": 0, "time_to_target_s": 1.0}]
    assert bench.trimmed_limit(options, _spec("easgd", 1), done) == expected


@pytest.mark.parametrize("references, expected", [
    ([], 60.0),                               # the first reference itself: the whole limit
    ([("sgd", 5.0)], 20.0),                   # 4 x the reference's crossing
    ([("sgd", 5.0), ("msgd", 7.0)], 28.0),    # 4 x the slowest of the references
    ([("sgd", 5.0), ("msgd", None)], 20.0),   # a reference that never got there is no bound
    ([("sgd", None)], 60.0),                  # nothing to go by
    ([("sgd", 1.0)], 10.0),                   # the floor
    ([("sgd", 20.0)], 60.0),                  # the limit
])
def test_first_repeats_train_a_multiple_of_the_references_crossing(references, expected):
    options = bench.BenchOptions(time_limit=60.0)
    done = [{"algo": algo, "tau": None, "lr": 0.2, "repeat": 0, "time_to_target_s": t}
            for algo, t in references]
    done.append({"algo": "easgd", "tau": 10, "lr": 0.2, "repeat": 1, "time_to_target_s": 0.5})
    assert bench.trimmed_limit(options, _spec("eamsgd", 0), done) == expected
    off = bench.BenchOptions(time_limit=60.0, trim_factor=0.0)
    assert bench.trimmed_limit(off, _spec("eamsgd", 0), done) == 60.0


def test_a_later_repeat_is_trimmed_by_the_upper_crossing_where_there_is_one():
    """The upper target is crossed later: the repeats must train until then to measure it."""
    options = bench.BenchOptions(time_limit=60.0, trim_factor=3.0)
    first = {"algo": "easgd", "tau": 10, "lr": 0.2, "repeat": 0, "time_to_target_s": 4.0,
             "time_to_upper_s": 9.0}
    assert bench.trimmed_limit(options, _spec("easgd", 1), [first]) == 27.0
    assert bench.trimmed_limit(options, _spec("easgd", 1),
                               [{**first, "time_to_upper_s": None}]) == 12.0
    sgd = {**first, "algo": "sgd", "tau": None}
    assert bench.trimmed_limit(options, _spec("eamsgd", 0), [sgd]) == 36.0  # 4 x 9 s


def test_the_speed_up_at_the_upper_target_is_bootstrapped_alike():
    """speedup_upper_vs_best_single: the best single worker's median time to the upper target
    over the row's, with its interval, as the headline is at the target."""
    runs = []
    for r, (single, multi) in enumerate([(2.0, 1.0), (3.0, 1.5), (4.0, 2.0)]):
        runs.append({**_run(_summary("sgd", 1), 9.0, repeat=r), "time_to_upper_s": single})
        runs.append({**_run(_summary("easgd"), 4.0, repeat=r), "time_to_upper_s": multi})
    rows = {r["algo"]: r for r in bench.derive_rows(runs)}
    assert rows["easgd"]["speedup_upper_vs_best_single"] == pytest.approx(3.0 / 1.5)
    assert rows["easgd"]["speedup_vs_best_single"] == pytest.approx(9.0 / 4.0)
    low, high = (rows["easgd"][f"speedup_upper_vs_best_single_{k}"] for k in ("low", "high"))
    assert low <= 2.0 <= high and rows["sgd"]["speedup_upper_vs_best_single"] == 1.0
