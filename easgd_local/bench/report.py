"""What the user reads: bench.md (the settings line and the table), the progress and result
lines, the header of bench.json, and the writing of the three outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from .figures import TIME_TO_TARGET_METHOD, shown_rows
from .options import (BENCH_FILE, TABLE_FILE, BenchOptions, single_worker, target_label,
                      upper_target)
from .plan import RunSpec, pct, run_label
from .plot import write_plot


def settings_line(bench: dict[str, Any]) -> str:
    """The exact settings, written as the command that repeats the bench on this machine."""
    parts = ["easgd-local bench", f"--algos {','.join(bench['algos'])}"]
    if bench.get("workers") is not None:
        parts.append(f"--workers {bench['workers']}")
    lrs = bench.get("lrs") or ([bench["lr"]] if bench.get("lr") is not None else [])
    if bench.get("taus"):
        parts.append(f"--taus {','.join(str(t) for t in bench['taus'])}")
    parts += [f"--time-limit {bench['time_limit']:g}",
              f"--target-accuracy {bench['target_accuracy']:g}",
              f"--target-band {bench.get('target_band', 0):g}"]
    if bench.get("upper_target"):
        parts.append(f"--upper-target {bench['upper_target']:g}")
    if lrs:
        parts.append(f"--lrs {','.join(f'{lr:g}' for lr in lrs)}")
    parts += [f"--momentum {bench['momentum']:g}",
              f"--batch-size {bench['batch_size']}", f"--seed {bench['seed']}",
              f"--repeats {bench.get('repeats', 1)}",
              f"--trim-factor {bench.get('trim_factor', 0):g}",
              f"--dataset {bench['dataset']}"]
    if bench["dataset"] != "mnist10k":
        parts.append(f"--data-dir {bench['data_dir']}")
    parts += [f"--model {bench['model']}"]
    if bench.get("devices"):
        parts.append(f"--devices {','.join(bench['devices'])}")
    for name, value in (bench.get("options") or {}).items():
        parts.append(f"--{name.replace('_', '-')} {value:g}" if isinstance(value, float)
                     else f"--{name.replace('_', '-')} {value}")
    if bench.get("faults"):
        parts.append(f"--fault {bench['faults']}")
    if bench.get("eval_every") is not None:
        parts.append(f"--eval-every {bench['eval_every']:g}")
    if bench.get("live_eval"):
        parts.append("--live-eval")
        if bench.get("target_hold") is not None:
            parts.append(f"--target-hold {bench['target_hold']:g}")
    machine = f"; {bench['cpu_count']} CPU cores" if bench.get("cpu_count") else ""
    if bench.get("one_thread_samples_per_second"):
        machine += f", one thread trains {bench['one_thread_samples_per_second']:,.0f} samples/s"
    if bench.get("load_average") is not None:
        machine += f", load average {bench['load_average']:g} at the start"
    return f"Settings: `{' '.join(parts)}`{machine}"


def _fmt(value: float | None, spec: str, suffix: str = "", none: str = "-") -> str:
    return none if value is None else f"{value:{spec}}{suffix}"


def _with_spread(row: dict[str, Any], key: str, spec: str, suffix: str = "",
                 none: str = "-", scale: float = 1.0) -> str:
    """'median [min, max]' (just the median when there is one repeat or no spread)."""
    def f(v: float | None) -> str:
        return _fmt(None if v is None else v * scale, spec, suffix, none)

    median, low, high = row.get(key), row.get(f"{key}_min"), row.get(f"{key}_max")
    if len(row.get("repeats") or []) <= 1 or (median is None and low is None and high is None):
        return f(median)
    return f"{f(median)} [{f(low)}, {f(high)}]"


def _with_interval(row: dict[str, Any], key: str) -> str:
    """'ratio [low, high]' of a bootstrapped speed-up (just the ratio with one repeat)."""
    ratio, low, high = row.get(key), row.get(f"{key}_low"), row.get(f"{key}_high")
    if ratio is None:
        return "-"
    if len(row.get("repeats") or []) <= 1:
        return f"{ratio:.2f}x"
    return f"{ratio:.2f}x [{_fmt(low, '.2f')}, {_fmt(high, '.2f')}]"


def markdown_table(bench: dict[str, Any]) -> str:
    """bench.md: the settings line, then one row per algorithm (at its best rate), led by the
    speed-up against the best single worker; then what that speed-up is measured against."""
    rows, repeats = shown_rows(bench), bench.get("repeats", 1)
    spread = f", median [min, max] of {repeats}" if repeats > 1 else ""
    upper = bench.get("upper_target")
    # The grid's step: the momentum algorithms run at lr * (1 - momentum) (the lr train prints).
    header = ["#", "algo", "p", "tau", "step",
              "speed-up vs best single" + (" [90% interval]" if repeats > 1 else ""),
              *([f"speed-up at {pct(upper)}"] if upper else []), "samples x rate",
              f"time to {_headline(bench)} (s){spread}",
              *([f"time to {pct(upper)} (s)"] if upper else []), "speed-up vs sgd",
              "samples/s", "efficiency", "exchange time", "bytes/sample", "final accuracy",
              "start-up (s)", "run"]
    lines = [settings_line(bench), "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join(" --- " if i < 2 else " ---: " for i in range(len(header) - 1)) + "| --- |"]
    for i, r in enumerate(rows, 1):
        cells = [str(i), r["algo"], str(r["workers"]), _fmt(r["tau"], "d"), f"{r['lr']:g}",
                 _with_interval(r, "speedup_vs_best_single"),
                 *([_with_interval(r, "speedup_upper_vs_best_single")] if upper else []),
                 _why(r),
                 _with_spread(r, "time_to_target_s", ".1f", none="not reached"),
                 *([_with_spread(r, "time_to_upper_s", ".1f", none="not reached")] if upper else []),
                 _with_spread(r, "speedup_vs_sgd", ".2f", "x"),
                 _with_spread(r, "samples_per_second", ",.0f"),
                 _with_spread(r, "efficiency", ".2f"),
                 _fmt(None if r["exchange_fraction"] is None else 100 * r["exchange_fraction"], ".1f", "%"),
                 _fmt(r["bytes_per_sample"], ",.0f"), _fmt(r["final_test_accuracy"], ".4f"),
                 _fmt(r["startup_seconds"], ".1f"), r["run_dir"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + _notes(bench, rows)) + "\n"


def _why(row: dict[str, Any]) -> str:
    """'0.85 x 1.95': the speed-up's two factors, samples and rate (figures._why)."""
    sample, rate = row.get("sample_factor"), row.get("rate_factor")
    return "-" if sample is None or rate is None else f"{sample:.2f} x {rate:.2f}"


def _headline(bench: dict[str, Any]) -> str:
    """What the headline's time is to: '95%', or its band, '93-97%'."""
    return target_label(bench["target_accuracy"], bench.get("target_band") or 0.0)


# A speed-up whose interval's ends are further apart than this factor is flagged as unsettled.
UNSETTLED_SPAN = 1.5


def _unsettled(row: dict[str, Any]) -> bool:
    low, high = row.get("speedup_vs_best_single_low"), row.get("speedup_vs_best_single_high")
    if low is None or high is None or len(row.get("repeats") or []) <= 1:
        return False
    return low <= 0 or high / low > UNSETTLED_SPAN


def _notes(bench: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The lines under the table: the best single worker, and where the hidden rows are."""
    notes = []
    single = next((r.get("best_single") for r in rows if r.get("best_single")), None)
    if single:
        interval = (" with a 90% bootstrap interval over the repeats of both"
                    if bench.get("repeats", 1) > 1 else "")
        notes.append(f"Speed-up vs best single: the median time to "
                     f"{_headline(bench)} of the fastest one-worker reference at its "
                     f"best rate ({single}) over each row's median time{interval}. Samples x "
                     f"rate: that speed-up split in two, the single worker's median samples "
                     f"to {_headline(bench)} over the row's (above 1: fewer "
                     f"samples needed) times the row's median samples/s over the single "
                     f"worker's.")
    unsettled = [r["algo"] for r in rows if _unsettled(r)]
    if unsettled:
        notes.append(f"Not settled: the speed-up interval of {', '.join(unsettled)} spans more "
                     f"than {UNSETTLED_SPAN:g}x; more --repeats narrow it.")
    if bench.get("wall_seconds") is not None:
        speed = bench.get("one_thread_samples_per_second")
        notes.append(f"The bench took {bench['wall_seconds'] / 60:.1f} min of wall time"
                     + (f"; one thread trains {bench['model']} at {speed:,.0f} samples/s here."
                        if speed else "."))
    hidden = len(bench["runs"]) - len(rows)
    if hidden:
        notes.append(f"Each algorithm at its best learning rate of the grid; all "
                     f"{len(bench['runs'])} (algorithm, lr) rows are in {BENCH_FILE}.")
    return [line for note in notes for line in ("", note)]


def progress_line(index: int, total: int, run: dict[str, Any], target: float,
                  band: float = 0.0) -> str:
    """The line that ends a run, e.g. '[2/5] easgd p=2 tau=10: 97% at 8.3 s, 3,710 samples/s'."""
    head = f"[{index}/{total}] {run_label(run['algo'], run['workers'], run['tau'])}: "
    return head + result_text(run, target, band)


def result_text(run: dict[str, Any], target: float, band: float = 0.0) -> str:
    """What a finished run achieved, without the '[i/n] label: ' head."""
    label = target_label(target, band)
    if run["time_to_target_s"] is not None:
        reached = f"{label} at {run['time_to_target_s']:.1f} s"
    elif not run.get("records_complete", True):
        reached = f"{label}: records incomplete (snapshots dropped), no time to target"
    else:
        reached = (f"{label} not reached in {run['train_seconds']:.1f} s "
                   f"(final {100 * run['final_test_accuracy']:.1f}%)")
    return f"{reached}, {run['samples_per_second']:,.0f} samples/s"

def bench_header(options: BenchOptions, specs: Sequence[RunSpec]) -> dict[str, Any]:
    """bench.json without its rows: every setting shared by the runs."""
    multi = [s for s in specs if not single_worker(s.algo)]
    # The devices the runs resolved to (every GPU, else cpu): the settings line repeats them.
    devices = list(options.devices) if options.devices else specs[0].devices
    return {
        "target_accuracy": options.target_accuracy, "target_band": options.target_band,
        "upper_target": upper_target(options),
        "target_hold": options.target_hold,
        "time_limit": options.time_limit, "trim_factor": options.trim_factor,
        "dataset": options.dataset, "model": options.model, "batch_size": options.batch_size,
        "algos": list(options.algos), "taus": list(options.taus) if options.taus else None,
        "workers": multi[0].workers if multi else options.workers,
        "lr": options.lrs[0] if options.lrs else None,
        "lrs": list(options.lrs) if options.lrs else None, "momentum": options.momentum,
        "seed": options.seed, "repeats": options.repeats,
        "eval_every": options.eval_every, "eval_budget": options.eval_budget,
        "live_eval": options.live_eval, "devices": devices,
        "data_dir": str(options.data_dir), "cpu_count": os.cpu_count(),
        "threads_per_worker": specs[0].config.threads, "load_average": _load_average(),
        "one_thread_samples_per_second": None,
        "options": {k: v for k, v in options.options.items() if v is not None},
        "faults": options.faults,
        "time_to_target_method": TIME_TO_TARGET_METHOD,
        "runs": [],
    }


def _load_average() -> float | None:
    """The 1-minute load average as the bench starts (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def busy_note(bench: dict[str, Any]) -> str | None:
    """A warning when other work already kept the machine busy: every rate would be off."""
    load, cores = bench.get("load_average"), bench.get("cpu_count")
    # Half the cores busy on average is already enough to distort a run on a small machine.
    if load is None or not cores or load < 0.5 * cores:
        return None
    return (f"the machine was busy as the bench started (load average {load:g} on {cores} cores): "
            "its timings may be off")


def write_outputs(out: Path, bench: dict[str, Any], plot: bool = True) -> list[str]:
    """Write bench.json, bench.md and (with ``plot``) bench.png; returns notes for the user."""
    from ..output import atomic_write

    out = Path(out)
    atomic_write(out / BENCH_FILE, lambda f: json.dump(bench, f, indent=2))
    table = markdown_table(bench)
    atomic_write(out / TABLE_FILE, lambda f: f.write(table))
    notes: list[str] = []
    if plot:
        note = write_plot(out, bench)
        if note:
            notes.append(note)
    return notes

