"""`easgd-local bench`: several algorithms on the same problem, compared with their spread.

Every run of a bench is an ordinary training run (``launcher.train``) with the same data set,
model, per-worker batch, time limit and target accuracy; the algorithm, the number of workers,
tau and the learning rate change. A bench is run ``--repeats`` times, repeat r with seed + r for
every algorithm, and the repeats are interleaved (repeat 1 of every run, then repeat 2, ...) so
that a drift of the machine hits every algorithm alike. Runs never go side by side: each has
the whole machine.

With a grid of learning rates (``--lrs``) every algorithm runs at every rate, the reference sgd
included, and the table shows each algorithm at its own best rate (the lowest median time to
target), so that no side is tuned alone.

How a figure is read:

- time to target: the first crossing of the target in the run's records, interpolated between
  the two records that straddle it with the error (1 - accuracy) linear on a log scale in time;
- speed-up: per repeat, sgd's time to target (at sgd's best rate) over the run's, of the same
  repeat; then the median [min, max] over the repeats;
- efficiency: samples/s over (workers * sgd's samples/s of the same repeat).

The bench directory holds:

- ``runs/<index>-<algo>-p<workers>[-tau<tau>]-lr<lr>-r<repeat>/``: each run's own directory;
- ``bench.json``: the settings, the machine's one-thread samples/s, and one row per
  (algorithm, workers, tau, lr): today's figures as the median over the repeats, each with
  ``<key>_min`` and ``<key>_max``, and every repeat's own figures under ``repeats`` (rewritten
  after every run, so an interrupted bench keeps what it measured);
- ``bench.md``: the table, median [min, max], after one line with the exact settings;
- ``bench.png``: the median test-error curve per row with a band for the spread (only where
  matplotlib is installed: it is an optional dependency).

This module does not print: progress lines and notes go to callables the caller passes in
(the CLI writes them to stderr).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import config as cfg
from .config import ConfigError, TrainConfig
from .settings import declarations, problem, reuse, setting

# output (and through it torch) is imported inside the functions that write: the CLI imports
# this module for its defaults, and `easgd-local --help` should stay fast.

log = logging.getLogger(__name__)

# The reference every speed-up and efficiency is measured against.
REFERENCE_ALGO = "sgd"
# On a log axis an error of 0 (every test sample right) cannot be drawn or interpolated.
ERROR_FLOOR = 1e-4
PLOT_POINTS = 200

TIME_TO_TARGET_METHOD = ("first crossing of the target, interpolated between the two records "
                         "that straddle it with log(1 - accuracy) linear in time; the first "
                         "record's time when it already reaches the target")

BENCH_FILE, TABLE_FILE, PLOT_FILE = "bench.json", "bench.md", "bench.png"
NO_MATPLOTLIB = "matplotlib is not installed: bench.png not written; pip install matplotlib"

# Figures of one run; in a row each holds the median over the repeats, with _min and _max.
FIGURES = ("time_to_target_s", "speedup_vs_sgd", "samples_per_second", "efficiency",
           "exchange_fraction", "bytes_per_sample", "final_test_accuracy", "startup_seconds",
           "train_seconds", "record_spacing_s")
ROW_KEYS = ("algo", "workers", "tau", "lr", "momentum", *FIGURES,
            *(f"{k}_{end}" for k in FIGURES for end in ("min", "max")),
            "best", "run_dir", "repeats")


TRAIN = declarations(TrainConfig)  # the settings a bench shares with train


@dataclass
class BenchOptions:
    """What one bench runs; the CLI maps its flags onto these fields one to one (but --lr, as
    --lrs with one value). A field shared with train reuses train's declaration, with the
    bench's own default or help where they differ."""

    algos: list[str] = setting(
        ["sgd", "msgd", "easgd", "eamsgd", "downpour", "ddp"], flag="--algos", kind=list,
        concern="bench",
        help="Comma-separated algorithms (any --algo of train), run one after another on the same "
             "data, model, initial weights and per-worker batch.")
    # None: train's default; single-worker algorithms always run 1
    workers: int | None = reuse(TRAIN["workers"])
    taus: list[int] = setting(
        [TrainConfig.tau], flag="--taus", kind=list, concern="bench",
        help="Comma-separated communication periods; every algorithm that has a tau (not sgd, "
             "msgd, ddp) runs once per value.")
    time_limit: float = reuse(
        TRAIN["time_limit"], default=60.0, help="Seconds of training per run (start-up not counted).")
    target_accuracy: float = reuse(
        TRAIN["target_accuracy"], default=0.97,
        help="The test accuracy each run's time to target is measured to (with --live-eval a run "
             "also stops there).")
    lrs: list[float] | None = setting(
        None, flag="--lrs", kind=list, concern="algorithm", default_text="each algorithm's own",
        help="A grid of learning rates, e.g. 0.05,0.1,0.2: every algorithm (sgd included) runs at "
             "each, and the table shows each at its best.")
    # The momentum algorithms run with lr * (1 - momentum) (plan_runs).
    momentum: float = reuse(
        TRAIN["momentum"], default=0.9, default_text="",
        help="Nesterov momentum delta of the momentum algorithms ({momentum_algos}); they run "
             "with lr * (1 - momentum), so that their effective step lr / (1 - momentum) equals "
             "the others' --lr.")
    batch_size: int = reuse(TRAIN["batch_size"])
    seed: int = reuse(TRAIN["seed"])
    repeats: int = setting(
        3, flag="--repeats", kind=int, bounds=">= 1", concern="bench",
        help="Runs of every configuration, repeat r with seed + r; interleaved (repeat 1 of every "
             "run, then repeat 2, ...). Figures are the median [min, max].")
    dataset: str = reuse(TRAIN["dataset"])
    data_dir: Path = reuse(TRAIN["data_dir"])
    model: str = reuse(TRAIN["model"])
    devices: list[str] | None = reuse(TRAIN["devices"])
    eval_every: float | None = reuse(TRAIN["eval_every"])
    # Runs evaluate their snapshots after training (deferred), taking nothing from the workers:
    # the budget then only bounds how long that takes, so it is larger than train's, for a finer
    # resolution of the time to target. Its own setting, with train's flag and range.
    eval_budget: float = reuse(
        TRAIN["eval_budget"], default=0.25,
        help="How long evaluating a run's snapshots (after it trains, on the whole test set) may "
             "take, relative to its compute; sets the spacing of the snapshots.")
    # False: each run only snapshots the center while it trains and evaluates afterwards, so
    # evaluation takes no cores from the workers it measures (runs then last --time-limit)
    live_eval: bool = setting(
        False, flag="--live-eval", kind=bool, concern="bench",
        help="Evaluate the center while each run trains, so that reaching --target-accuracy ends "
             "it early; by default runs only snapshot the center and evaluate afterwards, leaving "
             "every core to the workers being measured.")
    calibrate: bool = True  # measure the machine's one-thread samples/s first
    faults: str | None = reuse(TRAIN["faults"])  # injected into every run
    options: dict[str, Any] = field(default_factory=dict)  # algorithm options, to those that take them
    out: Path | None = reuse(
        TRAIN["out"], default_text="runs/bench-<timestamp>",
        help="Bench directory: bench.json, bench.md, bench.png and runs/ (refused if it already "
             "holds a bench.json).")


# Flags of the command that are no field of BenchOptions.
CLI_SETTINGS = {
    "lr": dataclasses.replace(
        TRAIN["lr"], default_text="each algorithm's own, as train",
        help="Learning rate eta of every run (as --lrs with one value); the momentum algorithms "
             "get lr * (1 - momentum) (see --momentum)."),
    "quiet": dataclasses.replace(
        TRAIN["quiet"], help="No progress line per run (the table is still printed)."),
}
DECLARED = declarations(BenchOptions)


@dataclass
class RunSpec:
    """One planned run: its place in the bench and the (not yet validated) TrainConfig."""

    index: int
    algo: str
    tau: int | None  # None for algorithms without a communication period
    lr: float  # the step of the grid (momentum algorithms run at lr * (1 - momentum))
    repeat: int
    config: TrainConfig
    workers: int = 0  # resolved by validation
    devices: list[str] = field(default_factory=list)  # resolved by validation
    name: str = ""  # directory name under <bench>/runs


# ---------------------------------------------------------------------------------------------
# Parsing and planning


def parse_algos(text: str) -> list[str]:
    """Split ``--algos`` into names; see check_algos."""
    algos = [a.strip() for a in text.split(",") if a.strip()]
    check_algos(algos)
    return algos


def check_algos(algos: Sequence[str]) -> None:
    """Every name must be in config.ALGOS as it is *now*: the list grows, so none is hard-coded."""
    if not algos:
        raise ConfigError("--algos is empty; give a comma-separated list such as sgd,easgd")
    for a in algos:
        if a not in cfg.ALGOS:
            raise ConfigError(f"unknown algorithm {a!r} in --algos; choose from {', '.join(cfg.ALGOS)}")
    duplicate = next((a for i, a in enumerate(algos) if a in algos[:i]), None)
    if duplicate is not None:
        raise ConfigError(f"--algos lists {duplicate} twice")


def _split(text: str, flag: str, kind: Callable[[str], Any], example: str) -> list[Any]:
    values = []
    for t in (t.strip() for t in text.split(",")):
        if not t:
            continue
        try:
            values.append(kind(t))
        except ValueError:
            raise ConfigError(f"{flag} must be comma-separated {example} (got {t!r})") from None
    return values


def parse_taus(text: str) -> list[int]:
    """Split ``--taus`` into integers; see check_taus."""
    taus = _split(text, "--taus", int, "integers")
    check_taus(taus)
    return taus


def check_taus(taus: Sequence[int]) -> None:
    if not taus:
        raise ConfigError("--taus is empty; give comma-separated integers such as 1,10")
    for i, t in enumerate(taus):
        if t < 1:
            raise ConfigError(f"--taus values must be >= 1 (got {t})")
        if t in taus[:i]:
            raise ConfigError(f"--taus lists {t} twice")


def parse_lrs(text: str) -> list[float]:
    """Split ``--lrs`` into learning rates; see check_lrs."""
    lrs = _split(text, "--lrs", float, "numbers")
    check_lrs(lrs)
    return lrs


def check_lrs(lrs: Sequence[float]) -> None:
    if not lrs:
        raise ConfigError("--lrs is empty; give comma-separated rates such as 0.05,0.1,0.2")
    for i, lr in enumerate(lrs):
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"--lr must be > 0 and finite (got {lr})")
        if lr in lrs[:i]:
            raise ConfigError(f"--lrs lists {lr:g} twice")


def single_worker(algo: str) -> bool:
    """The one-worker references (sgd, msgd): always run with one worker."""
    return cfg.ALGORITHMS[algo].single_worker


def uses_momentum(algo: str) -> bool:
    """Momentum algorithms (eamsgd, msgd, mdownpour): run with lr * (1 - momentum)."""
    return cfg.ALGORITHMS[algo].uses_momentum


def has_tau(algo: str) -> bool:
    """Whether ``algo`` has a communication period (not the single-worker references, not ddp,
    which all-reduces the gradients at every step)."""
    return cfg.ALGORITHMS[algo].has_tau


def options_for(algo: str, options: dict[str, Any]) -> dict[str, Any]:
    """The algorithm options of a bench that ``algo`` takes (each run gets only its own)."""
    own = {o.name for o in cfg.ALGORITHMS[algo].options}
    return {k: v for k, v in options.items() if k in own and v is not None}


def run_label(algo: str, workers: int, tau: int | None, lr: float | None = None) -> str:
    """The name of a run in progress lines and in the plot's legend."""
    return (f"{algo} p={workers}" + ("" if tau is None else f" tau={tau}")
            + ("" if lr is None else f" lr={lr:g}"))


def run_name(index: int, algo: str, workers: int, tau: int | None, lr: float | None = None,
             repeat: int | None = None) -> str:
    """The run's directory under <bench>/runs."""
    return (f"{index}-{algo}-p{workers}" + ("" if tau is None else f"-tau{tau}")
            + ("" if lr is None else f"-lr{lr:g}") + ("" if repeat is None else f"-r{repeat}"))


def faults_for(algo: str, faults: str | None) -> str | None:
    """--fault for one run: a single-worker reference (sgd, msgd) has no rank 1 or above, so it
    keeps the others (malformed ones too, for train to refuse)."""
    if not faults or not single_worker(algo):
        return faults
    ranks = [(item, item.strip().split(":", 1)[0]) for item in faults.split(",")]
    kept = [item for item, rank in ranks if not (rank.isdigit() and int(rank) >= 1)]
    return ",".join(kept) or None


def plan_runs(options: BenchOptions) -> list[RunSpec]:
    """Every (algorithm, tau, lr) once per repeat, repeat-major: repeat 0 of every run first."""
    specs: list[RunSpec] = []
    for repeat in range(options.repeats):
        for algo in options.algos:
            for tau in (options.taus if has_tau(algo) else [None]):
                for base_lr in (options.lrs or [None]):
                    momentum = options.momentum if uses_momentum(algo) else None
                    # With momentum delta, a constant gradient moves the weights by
                    # lr / (1 - delta) per step in the long run. Scaling lr by (1 - delta) gives
                    # every algorithm the same effective step, so the comparison is about the
                    # algorithms, not the step size. (None: the algorithm's default, which is
                    # set the same way.)
                    lr = (base_lr * (1.0 - options.momentum) if momentum is not None else base_lr
                          ) if base_lr is not None else None
                    # Algorithms without a communication period keep train's default tau: for
                    # them it only sets how often the model is published for evaluation.
                    config = TrainConfig(
                        algo=algo, lr=lr, tau=tau if tau is not None else TrainConfig.tau,
                        momentum=momentum, batch_size=options.batch_size,
                        seed=options.seed + repeat,
                        time_limit=options.time_limit, target_accuracy=options.target_accuracy,
                        dataset=options.dataset, data_dir=Path(options.data_dir),
                        model=options.model,
                        # Single-worker references refuse a worker count other than 1.
                        workers=None if single_worker(algo) else options.workers,
                        devices=list(options.devices) if options.devices else None,
                        eval_every=options.eval_every, eval_budget=options.eval_budget,
                        eval_deferred=not options.live_eval,
                        # A timed run is measured, not kept: no periodic checkpoints in it.
                        checkpoint_every=None, quiet=True,
                        faults=faults_for(algo, options.faults),
                        options=options_for(algo, options.options))
                    step = base_lr if base_lr is not None else cfg.ALGORITHMS[algo].default_step
                    specs.append(RunSpec(index=len(specs) + 1, algo=algo, tau=tau, lr=step,
                                         repeat=repeat, config=config))
    return specs


def default_bench_out() -> Path:
    return Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"


def check_values(options: BenchOptions) -> None:
    """The lists, every declared field (kind, range) and that each algorithm option given
    applies to an algorithm of the bench; ConfigError with one line."""
    from .algorithms import all_options

    check_algos(options.algos)
    check_taus(options.taus)
    # Checked here and not left to TrainConfig: the momentum algorithms see lr * (1 - momentum),
    # and an error about that product would not name the value the user typed.
    if options.lrs is not None:
        check_lrs(options.lrs)
    for name, declared in DECLARED.items():
        message = problem(declared, getattr(options, name))
        if message:
            raise ConfigError(message)
    options_declared = all_options()
    for name, value in options.options.items():
        if value is None:
            continue
        option, users = options_declared[name]
        if not any(a in users for a in options.algos):
            raise ConfigError(f"{option.flag} applies to {', '.join(users)}, none of which this "
                              "bench runs")


def check_options(options: BenchOptions) -> list[RunSpec]:
    """Every check that can fail on bad input, before anything is written or started.

    Returns the planned runs with their worker counts and directories resolved.
    Raises ConfigError, data.DataError or OutputError with one line.
    """
    from .data import prepare_dataset
    from .models import MODELS
    from .output import RESULT_FILES, OutputError

    check_values(options)
    if options.model not in MODELS and ":" not in options.model:
        raise ConfigError(f"unknown --model {options.model!r}; choose one of {', '.join(MODELS)}, "
                          "torchvision:NAME or module:factory")

    specs = plan_runs(options)
    for spec in specs:
        # Validate a copy: train() validates the real config again and resolves it itself.
        checked = dataclasses.replace(spec.config).validate()
        spec.workers = int(checked.workers or 1)
        spec.devices = list(checked.devices or [])
        grid = spec.lr if options.lrs and len(options.lrs) > 1 else None
        spec.name = run_name(spec.index, spec.algo, spec.workers, spec.tau, grid,
                             spec.repeat if options.repeats > 1 else None)
    # Every run gets the per-worker resources of the largest one, so that the one-worker
    # reference measures what one worker of the others can do: a device each on GPUs, and on
    # CPUs the same number of intra-op threads (not all the cores for a lone worker).
    threads = max(1, (os.cpu_count() or 1) // max(spec.workers for spec in specs))
    for spec in specs:
        spec.config.threads = threads
    prepare_dataset(options.dataset, Path(options.data_dir), download=False)

    out = Path(options.out) if options.out is not None else default_bench_out()
    options.out = out
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory")
    if (out / BENCH_FILE).exists():
        raise OutputError(f"--out {out} already holds a bench ({BENCH_FILE}); choose another directory")
    # A run directory left by an earlier, interrupted bench would stop this one half-way.
    for spec in specs:
        run_dir = out / "runs" / spec.name
        held = next((n for n in RESULT_FILES if (run_dir / n).exists()), None)
        if held is not None:
            raise OutputError(f"--out {out} already holds a run in runs/{spec.name} ({held}); "
                              "choose another directory")
    return specs


# ---------------------------------------------------------------------------------------------
# Pure helpers: from metrics and summaries to rows and tables


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (missing file: none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _log_error(accuracy: float) -> float:
    return math.log(max(1.0 - accuracy, ERROR_FLOOR))


def time_to_target(records: Sequence[dict[str, Any]], target: float) -> float | None:
    """Seconds of training at which the test accuracy first reaches ``target``.

    Between the last record below the target and the first at or above it, the error
    (1 - accuracy) is taken as linear on a log scale in time; when the very first record already
    reaches it, that record's time. ``seconds`` in metrics.jsonl counts from the start of
    training, so start-up is excluded by construction. None if no record reached it.
    """
    before = None
    for record in records:
        accuracy = record.get("test_accuracy")
        if accuracy is None:
            continue
        if accuracy >= target:
            t1 = float(record["seconds"])
            if before is None:
                return t1
            t0, a0 = before
            e0, e1, et = _log_error(a0), _log_error(accuracy), _log_error(target)
            if e0 == e1:  # both at the floor: cannot happen below the target, but be safe
                return t1
            return t0 + (t1 - t0) * (e0 - et) / (e0 - e1)
        before = (float(record["seconds"]), accuracy)
    return None


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
                run_dir: str) -> dict[str, Any]:
    """One run's own figures (those that need no reference); see :func:`derive_rows`.

    A run whose records are incomplete (snapshots dropped) gets no time to target: a number
    read from them could be wrong."""
    complete = not summary.get("snapshots_dropped")
    return {
        "algo": summary["algo"], "workers": summary["workers"],
        "tau": summary["tau"] if has_tau(summary["algo"]) else None,
        "momentum": summary.get("momentum"), "seed": summary.get("seed"),
        "time_to_target_s": time_to_target(records, target) if complete else None,
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


def derive_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (algo, workers, tau, lr) from the runs' figures (``run_figures`` plus
    ``lr`` from the grid and ``repeat``), in the order the configurations first appear.

    The reference is sgd at its own best rate (lowest median time to target). Per repeat:
    speedup_vs_sgd = sgd's time to target / this run's, against sgd of the same repeat (None
    when sgd never reached it; 0 in the spread, shown as None, when only this run never did);
    efficiency = samples/s / (workers * sgd's samples/s). Each figure of a row is the median
    over the repeats, with _min and _max; ``best`` marks each (algo, workers, tau) at its best
    rate.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["algo"], run["workers"], run["tau"], run["lr"]), []).append(run)

    def rank(key: tuple) -> tuple[float, float]:
        median_time = _spread([r["time_to_target_s"] for r in groups[key]], math.inf)[0]
        accuracy = statistics.median(r["final_test_accuracy"] for r in groups[key])
        return (math.inf if median_time is None else median_time, -accuracy)

    best: dict[tuple, tuple] = {}
    for key in groups:
        if key[:3] not in best or rank(key) < rank(best[key[:3]]):
            best[key[:3]] = key
    reference = next((k for family, k in best.items() if family[0] == REFERENCE_ALGO), None)
    ref_by_repeat = {r["repeat"]: r for r in groups[reference]} if reference else {}

    rows = []
    for key, members in groups.items():
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
                "repeat", "seed", *FIGURES, "records_complete", "run_dir")},
                "speedup_vs_sgd": speedup, "efficiency": efficiency})
        row: dict[str, Any] = {"algo": key[0], "workers": key[1], "tau": key[2], "lr": key[3],
                               "momentum": members[0].get("momentum")}
        for k in FIGURES:
            if k == "speedup_vs_sgd":
                spread = tuple(None if v == 0.0 else v for v in _spread(speedups))
            else:
                spread = _spread([r[k] for r in repeats], math.inf if k == "time_to_target_s" else None)
            row[k], row[f"{k}_min"], row[f"{k}_max"] = spread
        row["best"] = best[key[:3]] == key
        row["run_dir"] = repeats[0]["run_dir"]
        row["repeats"] = repeats
        rows.append(row)
    return rows


def settings_line(bench: dict[str, Any]) -> str:
    """The exact settings, written as the command that repeats the bench on this machine."""
    parts = ["easgd-local bench", f"--algos {','.join(bench['algos'])}"]
    if bench.get("workers") is not None:
        parts.append(f"--workers {bench['workers']}")
    lrs = bench.get("lrs") or ([bench["lr"]] if bench.get("lr") is not None else [])
    parts += [f"--taus {','.join(str(t) for t in bench['taus'])}",
              f"--time-limit {bench['time_limit']:g}",
              f"--target-accuracy {bench['target_accuracy']:g}"]
    if lrs:
        parts.append(f"--lrs {','.join(f'{lr:g}' for lr in lrs)}")
    parts += [f"--momentum {bench['momentum']:g}",
              f"--batch-size {bench['batch_size']}", f"--seed {bench['seed']}",
              f"--repeats {bench.get('repeats', 1)}",
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
    machine = f"; {bench['cpu_count']} CPU cores" if bench.get("cpu_count") else ""
    if bench.get("one_thread_samples_per_second"):
        machine += f", one thread trains {bench['one_thread_samples_per_second']:,.0f} samples/s"
    if bench.get("load_average") is not None:
        machine += f", load average {bench['load_average']:g} at the start"
    return f"Settings: `{' '.join(parts)}`{machine}"


def _fmt(value: float | None, spec: str, suffix: str = "", none: str = "-") -> str:
    return none if value is None else f"{value:{spec}}{suffix}"


def _pct(value: float) -> str:
    return f"{100 * value:g}%"


def _with_spread(row: dict[str, Any], key: str, spec: str, suffix: str = "",
                 none: str = "-", scale: float = 1.0) -> str:
    """'median [min, max]' (just the median when there is one repeat or no spread)."""
    def f(v: float | None) -> str:
        return _fmt(None if v is None else v * scale, spec, suffix, none)

    median, low, high = row.get(key), row.get(f"{key}_min"), row.get(f"{key}_max")
    if len(row.get("repeats") or []) <= 1:
        return f(median)
    return f"{f(median)} [{f(low)}, {f(high)}]"


def shown_rows(bench: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the table: each (algo, workers, tau) at its best rate."""
    return [r for r in bench["runs"] if r.get("best", True)]


def markdown_table(bench: dict[str, Any]) -> str:
    """bench.md: the settings line, then one row per algorithm (at its best rate)."""
    target = _pct(bench["target_accuracy"])
    repeats = bench.get("repeats", 1)
    spread = f", median [min, max] of {repeats}" if repeats > 1 else ""
    header = ["#", "algo", "p", "tau", "lr", f"time to {target} (s){spread}", "speed-up vs sgd",
              "samples/s", "efficiency", "exchange time", "bytes/sample", "final accuracy",
              "start-up (s)", "run"]
    lines = [settings_line(bench), "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join(" --- " if i < 2 else " ---: " for i in range(len(header) - 1)) + "| --- |"]
    for i, r in enumerate(shown_rows(bench), 1):
        cells = [str(i), r["algo"], str(r["workers"]), _fmt(r["tau"], "d"), f"{r['lr']:g}",
                 _with_spread(r, "time_to_target_s", ".1f", none="not reached"),
                 _with_spread(r, "speedup_vs_sgd", ".2f", "x"),
                 _with_spread(r, "samples_per_second", ",.0f"),
                 _with_spread(r, "efficiency", ".2f"),
                 _fmt(None if r["exchange_fraction"] is None else 100 * r["exchange_fraction"], ".1f", "%"),
                 _fmt(r["bytes_per_sample"], ",.0f"), _fmt(r["final_test_accuracy"], ".4f"),
                 _fmt(r["startup_seconds"], ".1f"), r["run_dir"]]
        lines.append("| " + " | ".join(cells) + " |")
    hidden = len(bench["runs"]) - len(shown_rows(bench))
    if hidden:
        lines += ["", f"Each algorithm at its best learning rate of the grid; all {len(bench['runs'])} "
                      f"(algorithm, lr) rows are in {BENCH_FILE}."]
    return "\n".join(lines) + "\n"


def progress_line(index: int, total: int, run: dict[str, Any], target: float) -> str:
    """The line that ends a run, e.g. '[2/5] easgd p=2 tau=10: 97% at 8.3 s, 3,710 samples/s'."""
    head = f"[{index}/{total}] {run_label(run['algo'], run['workers'], run['tau'])}: "
    return head + result_text(run, target)


def result_text(run: dict[str, Any], target: float) -> str:
    """What a finished run achieved, without the '[i/n] label: ' head."""
    if run["time_to_target_s"] is not None:
        reached = f"{_pct(target)} at {run['time_to_target_s']:.1f} s"
    elif not run.get("records_complete", True):
        reached = f"{_pct(target)}: records incomplete (snapshots dropped), no time to target"
    else:
        reached = (f"{_pct(target)} not reached in {run['train_seconds']:.1f} s "
                   f"(final {100 * run['final_test_accuracy']:.1f}%)")
    return f"{reached}, {run['samples_per_second']:,.0f} samples/s"


# ---------------------------------------------------------------------------------------------
# Writing


def bench_header(options: BenchOptions, specs: Sequence[RunSpec]) -> dict[str, Any]:
    """bench.json without its rows: every setting shared by the runs."""
    multi = [s for s in specs if not single_worker(s.algo)]
    # The devices the runs resolved to (every GPU, else cpu): the settings line repeats them.
    devices = list(options.devices) if options.devices else specs[0].devices
    return {
        "target_accuracy": options.target_accuracy, "time_limit": options.time_limit,
        "dataset": options.dataset, "model": options.model, "batch_size": options.batch_size,
        "algos": list(options.algos), "taus": list(options.taus),
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
    from .output import atomic_write

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


def error_curve(records: Sequence[dict[str, Any]], grid: Sequence[float]) -> list[float]:
    """log(test error) of one run on a time grid, linear between records; NaN outside them."""
    pts = [(float(r["seconds"]), _log_error(r["test_accuracy"])) for r in records
           if r.get("test_accuracy") is not None]
    out = []
    for t in grid:
        value = math.nan
        for (t0, e0), (t1, e1) in zip(pts, pts[1:]):
            if t0 <= t <= t1:
                value = e0 if t1 == t0 else e0 + (e1 - e0) * (t - t0) / (t1 - t0)
                break
        out.append(value)
    return out


def median_band(curves: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Pointwise median, min and max over curves, ignoring NaN (NaN where none has a value)."""
    med, low, high = [], [], []
    for column in zip(*curves):
        values = [v for v in column if not math.isnan(v)]
        med.append(statistics.median(values) if values else math.nan)
        low.append(min(values) if values else math.nan)
        high.append(max(values) if values else math.nan)
    return med, low, high


def write_plot(out: Path, bench: dict[str, Any]) -> str | None:
    """bench.png: the median test error of each shown row against seconds of training, with a
    band from the best to the worst repeat. Returns a note if not written."""
    # matplotlib is an optional dependency (the `plot` extra): import it only here.
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.debug("matplotlib import failed", exc_info=True)
        return NO_MATPLOTLIB
    from .output import atomic_write

    # The object-oriented API without pyplot: no global figure state and no GUI backend.
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row in shown_rows(bench):
        runs = [read_metrics(out / r["run_dir"] / "metrics.jsonl") for r in row["repeats"]]
        end = max((rec[-1]["seconds"] for rec in runs if rec), default=0.0)
        if not end:
            continue
        grid = [end * i / (PLOT_POINTS - 1) for i in range(PLOT_POINTS)]
        med, low, high = median_band([error_curve(rec, grid) for rec in runs])
        keep = [i for i, v in enumerate(med) if not math.isnan(v)]
        xs = [grid[i] for i in keep]
        label = run_label(row["algo"], row["workers"], row["tau"],
                          row["lr"] if len(bench.get("lrs") or []) > 1 else None)
        (line,) = ax.plot(xs, [math.exp(med[i]) for i in keep], label=label)
        if len(runs) > 1:
            ax.fill_between(xs, [math.exp(low[i]) for i in keep], [math.exp(high[i]) for i in keep],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.axhline(1.0 - bench["target_accuracy"], color="grey", linestyle="--", linewidth=1,
               label=f"target {_pct(bench['target_accuracy'])}")
    ax.set_yscale("log")
    ax.set_xlabel("seconds of training (start-up excluded)")
    repeats = bench.get("repeats", 1)
    ax.set_ylabel("test error (1 - accuracy)" + (f", median of {repeats}" if repeats > 1 else ""))
    ax.set_title(f"{bench['dataset']}, {bench['model']}, batch {bench['batch_size']} per worker")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    target = out / PLOT_FILE
    atomic_write(target, lambda f: fig.savefig(f, format="png"), binary=True)
    return None


# ---------------------------------------------------------------------------------------------
# Running


TrainFn = Callable[..., dict[str, Any]]


def run_bench(options: BenchOptions,
              on_start: Callable[[str], None] | None = None,
              on_done: Callable[[str], None] | None = None,
              on_note: Callable[[str], None] | None = None,
              train_fn: TrainFn | None = None,
              calibrate_fn: Callable[[], float] | None = None) -> dict[str, Any]:
    """Run every planned run in turn, writing the outputs after each; returns bench.json's content.

    ``on_start`` receives '[i/n] label: ' as a run begins, ``on_done`` the rest of that line when
    it ends, ``on_note`` anything else the user should know (such as a missing matplotlib).
    ``train_fn`` (config, reporter) -> summary defaults to launcher.train, looked up at call time.
    A run that fails raises (launcher.TrainError) and ends the bench; bench.json then holds
    the runs finished before it.
    """
    from .output import RunDir

    specs = check_options(options)
    out = Path(options.out)  # resolved by check_options
    if train_fn is None:
        from . import launcher

        train_fn = launcher.train
    RunDir(out).create(also_ours=(BENCH_FILE, TABLE_FILE, PLOT_FILE, "runs"))  # one line if not
    bench = bench_header(options, specs)
    busy = busy_note(bench)
    if busy and on_note:
        on_note(busy)
    if options.calibrate:
        if calibrate_fn is None:
            from .calibrate import one_thread_samples_per_second

            def calibrate_fn() -> float:
                return one_thread_samples_per_second(options.model, options.dataset,
                                                     options.batch_size,
                                                     data_dir=str(options.data_dir))
        bench["one_thread_samples_per_second"] = round(calibrate_fn(), 1)
        if on_note:
            on_note(f"this machine trains {options.model} at "
                    f"{bench['one_thread_samples_per_second']:,.0f} samples/s on one thread")
    runs: list[dict[str, Any]] = []
    log.info("bench of %d run(s) in %s", len(specs), out)
    for spec in specs:
        label = run_label(spec.algo, spec.workers, spec.tau,
                          spec.lr if options.lrs and len(options.lrs) > 1 else None)
        if options.repeats > 1:
            label += f" (repeat {spec.repeat + 1}/{options.repeats})"
        if on_start:
            on_start(f"[{spec.index}/{len(specs)}] {label}: ")
        spec.config.out = out / "runs" / spec.name
        summary = train_fn(spec.config, None)
        records = read_metrics(spec.config.out / "metrics.jsonl")
        # Relative to the bench directory, so the directory can be moved as a whole.
        figures = run_figures({**summary, "seed": spec.config.seed}, records,
                              options.target_accuracy, str(Path("runs") / spec.name))
        runs.append({**figures, "lr": spec.lr, "repeat": spec.repeat})
        if not figures["records_complete"] and on_note:
            on_note(f"{label}: snapshots were dropped, so its records are incomplete; "
                    "its time to target is left out")
        bench["runs"] = derive_rows(runs)
        # Rewritten after every run: an interrupted bench keeps what it measured.
        write_outputs(out, bench, plot=False)
        if on_done:
            on_done(result_text(figures, options.target_accuracy))
    for note in write_outputs(out, bench, plot=True):
        log.info(note)
        if on_note:
            on_note(note)
    return bench
