"""From a run's records and summary to its figures, and from the runs to the bench's rows
(each figure the median [min, max] over the repeats). Pure functions: no files written, no
torch."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from typing import Any, Sequence

from .options import band_targets, has_tau, single_worker

# The reference every speed-up and efficiency is measured against.
REFERENCE_ALGO = "sgd"
# On a log axis an error of 0 (every test sample right) cannot be drawn or interpolated.
ERROR_FLOOR = 1e-4

TIME_TO_TARGET_METHOD = ("first crossing of a target, interpolated between the two records "
                         "that straddle it with log(1 - accuracy) linear in time (the first "
                         "record's time when it already reaches it); with a target band, the "
                         "geometric mean of the first crossings of five targets spread evenly "
                         "over the band, none if one was never reached")

# The speed-up against the best single worker: a ratio of median times with a bootstrap
# interval, resampled this many times from this seed (deterministic for the same runs).
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 2000, 0

# Figures of one run; in a row each holds the median over the repeats, with _min and _max.
# time_to_upper_s: the time to the upper target (--upper-target), read as time_to_target_s.
# samples_to_target: the samples trained (all workers together) when the target was first
# reached, read as time_to_target_s with samples for seconds; "never" alike.
TIMES = ("time_to_target_s", "time_to_upper_s", "samples_to_target")
FIGURES = (*TIMES, "speedup_vs_sgd", "samples_per_second", "efficiency",
           "exchange_fraction", "bytes_per_sample", "final_test_accuracy", "startup_seconds",
           "train_seconds", "record_spacing_s")
ROW_KEYS = ("algo", "workers", "tau", "lr", "momentum", *FIGURES,
            *(f"{k}_{end}" for k in FIGURES for end in ("min", "max")),
            "speedup_vs_best_single", "speedup_vs_best_single_low",
            "speedup_vs_best_single_high", "speedup_upper_vs_best_single",
            "speedup_upper_vs_best_single_low", "speedup_upper_vs_best_single_high",
            "sample_factor", "rate_factor", "best_single", "best", "run_dir", "repeats")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (missing file: none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log_error(accuracy: float) -> float:
    return math.log(max(1.0 - accuracy, ERROR_FLOOR))


def time_to_target(records: Sequence[dict[str, Any]], target: float,
                   at: str = "seconds") -> float | None:
    """Seconds of training at which the test accuracy first reaches ``target``.

    Between the last record below the target and the first at or above it, the error
    (1 - accuracy) is taken as linear on a log scale in time; when the very first record already
    reaches it, that record's time. ``seconds`` in metrics.jsonl counts from the start of
    training, so start-up is excluded by construction. None if no record reached it.
    ``at="samples"``: the same crossing read in samples trained instead of seconds.
    """
    before = None
    for record in records:
        accuracy = record.get("test_accuracy")
        if accuracy is None:
            continue
        if record.get(at) is None:  # records of another version, without samples
            return None
        if accuracy >= target:
            t1 = float(record[at])
            if before is None:
                return t1
            t0, a0 = before
            e0, e1, et = log_error(a0), log_error(accuracy), log_error(target)
            if e0 == e1:  # both at the floor: cannot happen below the target, but be safe
                return t1
            return t0 + (t1 - t0) * (e0 - et) / (e0 - e1)
        before = (float(record[at]), accuracy)
    return None


def band_time(records: Sequence[dict[str, Any]], targets: Sequence[float],
              at: str = "seconds") -> float | None:
    """The geometric mean of the first crossings of ``targets`` (time_to_target each); None if
    one was never reached. One crossing of an accuracy that swings by a point between snapshots
    is one lucky snapshot; several across a band average that luck out."""
    crossings = [time_to_target(records, t, at) for t in targets]
    if any(c is None for c in crossings):
        return None
    if any(c <= 0 for c in crossings):
        return min(crossings)  # reached at the very start: no logarithm to take
    return math.exp(sum(math.log(c) for c in crossings) / len(crossings))


def record_spacing(records: Sequence[dict[str, Any]]) -> float | None:
    """Median seconds between consecutive records: the resolution of the time to target."""
    times = [float(r["seconds"]) for r in records if r.get("test_accuracy") is not None]
    gaps = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(gaps) if gaps else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return numerator / denominator


def run_figures(summary: dict[str, Any], records: Sequence[dict[str, Any]], target: float,
                run_dir: str, upper: float | None = None, band: float = 0.0) -> dict[str, Any]:
    """One run's own figures (those that need no reference); see :func:`derive_rows`.
    ``upper``: the upper target, whose time is time_to_upper_s (None: not measured).
    ``band``: time_to_target_s (and samples_to_target) is the band's (band_time) over
    band_targets(target, band); 0: the first crossing of the target.

    A run whose records are incomplete (snapshots dropped) gets no time to target: a number
    read from them could be wrong."""
    complete = not summary.get("snapshots_dropped")
    targets = band_targets(target, band)
    return {
        "algo": summary["algo"], "workers": summary["workers"],
        "tau": summary["tau"] if has_tau(summary["algo"]) else None,
        "momentum": summary.get("momentum"), "seed": summary.get("seed"),
        "time_to_target_s": band_time(records, targets) if complete else None,
        "time_to_upper_s": time_to_target(records, upper) if complete and upper else None,
        "samples_to_target": band_time(records, targets, "samples") if complete else None,
        "records_complete": complete,
        "samples_per_second": summary["samples_per_second"],
        "exchange_fraction": summary["exchange_fraction"],
        "bytes_per_sample": _ratio(summary["bytes_exchanged"], summary["total_samples"]),
        "final_test_accuracy": summary["final_test_accuracy"],
        "startup_seconds": summary["startup_seconds"], "train_seconds": summary["train_seconds"],
        "record_spacing_s": record_spacing(records),
        "run_dir": run_dir,
    }


def _spread(values: Sequence[float | None], never: float | None = None) -> tuple[float | None, ...]:
    """(median, min, max). A None counts as ``never`` where given (math.inf: a time to target
    that was never reached ranks last) and is left out otherwise; a result equal to ``never``
    is None."""
    filled = [v for v in (never if v is None else v for v in values) if v is not None]
    if not filled:
        return None, None, None
    out = (statistics.median(filled), min(filled), max(filled))
    return tuple(None if never is not None and v == never else v for v in out)


def _median_time(runs: Sequence[dict[str, Any]]) -> float:
    """The median time to target of a configuration's repeats; a repeat that never reached it
    counts as math.inf (and so may the median)."""
    return statistics.median(math.inf if r["time_to_target_s"] is None else r["time_to_target_s"]
                             for r in runs)


def _rank(runs: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """Lower is better: the median time to target, then the higher median final accuracy."""
    return _median_time(runs), -statistics.median(r["final_test_accuracy"] for r in runs)


def derive_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (algo, workers, tau, lr) from the runs' figures (``run_figures`` plus
    ``lr`` from the grid and ``repeat``), in the order the configurations first appear.

    ``best`` marks each (algo, workers, tau) at its best rate (lowest median time to target).
    speedup_vs_best_single = the best single worker's median time to target / this row's, the
    best single worker being the fastest of the one-worker references (sgd, msgd) each at its
    best rate; with a 90% bootstrap interval over the repeats of both (bootstrap_ratio).
    The older figures, against sgd at its own best rate, per repeat: speedup_vs_sgd = sgd's
    time to target / this run's, against sgd of the same repeat (None when sgd never reached
    it; 0 in the spread, shown as None, when only this run never did); efficiency = samples/s /
    (workers * sgd's samples/s). Each figure of a row is the median over the repeats, with _min
    and _max.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["algo"], run["workers"], run["tau"], run["lr"]), []).append(run)
    best: dict[tuple, tuple] = {}
    for key in groups:
        if key[:3] not in best or _rank(groups[key]) < _rank(groups[best[key[:3]]]):
            best[key[:3]] = key
    reference = next((k for family, k in best.items() if family[0] == REFERENCE_ALGO), None)
    ref_by_repeat = {r["repeat"]: r for r in groups[reference]} if reference else {}
    singles = [k for k in best.values() if single_worker(k[0])]
    single = min(singles, key=lambda k: _rank(groups[k]), default=None)
    if single is not None and _median_time(groups[single]) == math.inf:
        single = None  # no single worker reached the target: nothing to measure against
    rows = []
    for key, members in groups.items():
        row = _row(key, members, ref_by_repeat)
        row.update(_versus_single(members, groups[single] if single else None))
        # The same at the upper target, nearer the plateau, where first crossings are less steady.
        row.update(_versus_single(members, groups[single] if single else None,
                                  "time_to_upper_s", "speedup_upper_vs_best_single"))
        row.update(_why(members, groups[single] if single else None))
        row["best_single"] = None if single is None else _label(single)
        row["best"] = best[key[:3]] == key
        rows.append(row)
    return rows


def _label(key: tuple) -> str:
    algo, _, _, lr = key
    return f"{algo} lr={lr:g}"


def _row(key: tuple, members: Sequence[dict[str, Any]],
         ref_by_repeat: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """A row's figures: each the median [min, max] over its repeats, the speed-up and
    efficiency against sgd of the same repeat (see derive_rows)."""
    repeats, speedups = [], []
    for run in sorted(members, key=lambda r: r["repeat"]):
        ref = ref_by_repeat.get(run["repeat"])
        ref_time = ref["time_to_target_s"] if ref is not None else None
        speedup = _ratio(ref_time, run["time_to_target_s"])
        if ref_time is not None:  # defined for this repeat: a run that never got there is 0
            speedups.append(0.0 if speedup is None else speedup)
        efficiency = (_ratio(run["samples_per_second"], run["workers"] * ref["samples_per_second"])
                      if ref is not None else None)
        repeats.append({**{k: run.get(k) for k in (
            "repeat", "seed", *FIGURES, "records_complete", "run_dir", "time_limit_s")},
            "speedup_vs_sgd": speedup, "efficiency": efficiency})
    row: dict[str, Any] = {"algo": key[0], "workers": key[1], "tau": key[2], "lr": key[3],
                           "momentum": members[0].get("momentum")}
    for k in FIGURES:
        if k == "speedup_vs_sgd":
            spread = tuple(None if v == 0.0 else v for v in _spread(speedups))
        else:
            spread = _spread([r[k] for r in repeats], math.inf if k in TIMES else None)
        row[k], row[f"{k}_min"], row[f"{k}_max"] = spread
    row["run_dir"] = repeats[0]["run_dir"]
    row["repeats"] = repeats
    return row


def _versus_single(members: Sequence[dict[str, Any]], single: Sequence[dict[str, Any]] | None,
                   time: str = "time_to_target_s",
                   name: str = "speedup_vs_best_single") -> dict[str, float | None]:
    """``name`` (the speed-up in ``time``, to the target or the upper target) with its
    bootstrap interval, ``name``_low and _high (None where undefined: no single worker reached
    the target, or this row's median never did)."""
    keys = (name, f"{name}_low", f"{name}_high")
    if single is None:
        return dict.fromkeys(keys)
    times = [[math.inf if r.get(time) is None else r[time] for r in group]
             for group in (single, members)]
    point, low, high = bootstrap_ratio(times[0], times[1])
    return {keys[0]: point or None, keys[1]: _finite(low), keys[2]: _finite(high)}


def _why(members: Sequence[dict[str, Any]],
         single: Sequence[dict[str, Any]] | None) -> dict[str, float | None]:
    """The speed-up over the best single worker split in two factors whose product is about it
    (exactly, for runs at a steady rate): sample_factor = the single worker's median samples to
    the target / this row's (statistical efficiency: above 1, fewer samples were needed) and
    rate_factor = this row's median samples/s / the single worker's (hardware efficiency).
    None where a side never reached the target."""
    if single is None:
        return {"sample_factor": None, "rate_factor": None}
    samples = [[math.inf if r.get("samples_to_target") is None else r["samples_to_target"]
                for r in group] for group in (single, members)]
    sample_factor = _median_ratio(samples[0], samples[1])
    rate_factor = _ratio(statistics.median(r["samples_per_second"] for r in members),
                         statistics.median(r["samples_per_second"] for r in single))
    return {"sample_factor": _finite(sample_factor) or None, "rate_factor": rate_factor}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # bench.json is strict JSON: no Infinity


def _median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """median(numerator) / median(denominator) of times where math.inf is "never reached": a
    denominator never reached gives 0 (even over a numerator never reached: no speed-up is
    claimed), a numerator never reached over a finite one math.inf."""
    a, b = statistics.median(numerator), statistics.median(denominator)
    if math.isinf(b):
        return 0.0
    return math.inf if math.isinf(a) else a / b


def bootstrap_ratio(numerator: Sequence[float], denominator: Sequence[float], *,
                    resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.9,
                    seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """The ratio of the medians of two samples of times (math.inf: never reached) and its
    bootstrap ``level`` interval: (ratio, low, high).

    Each resample draws both samples anew with replacement, independently (the repeats of two
    rows are not paired), and takes the ratio of their medians; the interval is the central
    ``level`` of those ratios (percentiles by nearest rank). A fixed ``seed`` makes the result
    the same for the same samples.
    """
    if not numerator or not denominator:
        raise ValueError("bootstrap_ratio needs at least one value on each side")
    rng = random.Random(seed)
    ratios = sorted(
        _median_ratio(rng.choices(numerator, k=len(numerator)),
                      rng.choices(denominator, k=len(denominator)))
        for _ in range(resamples))
    tail = (1.0 - level) / 2
    low = ratios[round(tail * (resamples - 1))]
    high = ratios[round((1.0 - tail) * (resamples - 1))]
    return _median_ratio(numerator, denominator), low, high


def shown_rows(bench: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the table: each (algo, workers, tau) at its best rate."""
    return [r for r in bench["runs"] if r.get("best", True)]

