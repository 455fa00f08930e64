"""`easgd-local bench`: several algorithms on the same problem, compared on one table and plot.

Every run of a bench is an ordinary training run (``launcher.train``) with the same data set,
model, initial weights (seed), per-worker batch, time limit and target accuracy; only the
algorithm, the number of workers and tau change. The runs go one after another, never side by
side, so that each has the whole machine. The bench directory holds:

- ``runs/<index>-<algo>-p<workers>-tau<tau>/``: each run's own directory (config.json,
  metrics.jsonl, summary.json, center.pt); algorithms without a tau drop the ``-tau`` part;
- ``bench.json``: the settings and one row per run (rewritten after every run, so an
  interrupted bench keeps the runs it finished);
- ``bench.md``: the same as a markdown table, after one line with the exact settings;
- ``bench.png``: center test error against seconds of training, one curve per run
  (only where matplotlib is installed: it is an optional dependency).

This module does not print: progress lines and notes go to callables the caller passes in
(the CLI writes them to stderr).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import config as cfg
from .config import ConfigError, TrainConfig

# output (and through it torch) is imported inside the functions that write: the CLI imports
# this module for its defaults, and `easgd-local --help` should stay fast.

log = logging.getLogger(__name__)

DEFAULT_ALGOS = "sgd,easgd,eamsgd,downpour,ddp"
DEFAULT_TIME_LIMIT = 60.0
DEFAULT_TARGET_ACCURACY = 0.97
DEFAULT_MOMENTUM = 0.9
DEFAULT_EVAL_EVERY = 1.0
# The reference every speed-up and efficiency is measured against.
REFERENCE_ALGO = "sgd"
# On a log axis an error of 0 (every test sample right) cannot be drawn; it is drawn here.
PLOT_ERROR_FLOOR = 1e-4

BENCH_FILE, TABLE_FILE, PLOT_FILE = "bench.json", "bench.md", "bench.png"
NO_MATPLOTLIB = "matplotlib is not installed: bench.png not written; pip install matplotlib"

ROW_KEYS = ("algo", "workers", "tau", "lr", "momentum", "time_to_target_s", "speedup_vs_sgd",
            "samples_per_second", "efficiency", "exchange_fraction", "bytes_per_sample",
            "final_test_accuracy", "startup_seconds", "train_seconds", "run_dir")


@dataclass
class BenchOptions:
    """What one bench runs; the CLI maps its flags onto these fields one to one."""

    algos: list[str] = field(default_factory=lambda: DEFAULT_ALGOS.split(","))
    workers: int | None = None  # None: train's default; single-worker algorithms always run 1
    taus: list[int] = field(default_factory=lambda: [TrainConfig.tau])
    time_limit: float = DEFAULT_TIME_LIMIT
    target_accuracy: float = DEFAULT_TARGET_ACCURACY
    lr: float = TrainConfig.lr
    momentum: float = DEFAULT_MOMENTUM  # momentum algorithms run with lr * (1 - momentum)
    batch_size: int = TrainConfig.batch_size
    seed: int = TrainConfig.seed
    dataset: str = TrainConfig.dataset
    data_dir: Path = TrainConfig.data_dir
    model: str = TrainConfig.model
    devices: list[str] | None = None
    eval_every: float = DEFAULT_EVAL_EVERY
    # False: each run only snapshots the center while it trains and evaluates afterwards, so
    # evaluation takes no cores from the workers it measures (runs then last --time-limit)
    live_eval: bool = False
    out: Path | None = None  # None: runs/bench-<timestamp>


@dataclass
class RunSpec:
    """One planned run: its place in the bench and the (not yet validated) TrainConfig."""

    index: int
    algo: str
    tau: int | None  # None for algorithms without a communication period
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


def parse_taus(text: str) -> list[int]:
    """Split ``--taus`` into integers; see check_taus."""
    taus = []
    for t in (t.strip() for t in text.split(",")):
        if not t:
            continue
        try:
            taus.append(int(t))
        except ValueError:
            raise ConfigError(f"--taus must be comma-separated integers (got {t!r})") from None
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


def single_worker(algo: str) -> bool:
    """The one-worker references (sgd, msgd): always run with one worker."""
    return cfg.ALGORITHMS[algo].single_worker


def uses_momentum(algo: str) -> bool:
    """Momentum algorithms (eamsgd, msgd, mdownpour): run with lr * (1 - momentum)."""
    return cfg.ALGORITHMS[algo].momentum


def has_tau(algo: str) -> bool:
    """Whether ``algo`` has a communication period: not the single-worker references, not ddp
    (synchronous data-parallel SGD all-reduces the gradients at every step)."""
    spec = cfg.ALGORITHMS[algo]
    return not (spec.single_worker or spec.ddp)


def run_label(algo: str, workers: int, tau: int | None) -> str:
    """The name of a run in progress lines and in the plot's legend."""
    return f"{algo} p={workers}" + ("" if tau is None else f" tau={tau}")


def run_name(index: int, algo: str, workers: int, tau: int | None) -> str:
    """The run's directory under <bench>/runs."""
    return f"{index}-{algo}-p{workers}" + ("" if tau is None else f"-tau{tau}")


def plan_runs(options: BenchOptions) -> list[RunSpec]:
    """One run per algorithm, or per (algorithm, tau) for algorithms that have a tau."""
    specs: list[RunSpec] = []
    for algo in options.algos:
        for tau in (options.taus if has_tau(algo) else [None]):
            momentum = options.momentum if uses_momentum(algo) else None
            # With momentum delta, a constant gradient moves the weights by lr / (1 - delta) per
            # step in the long run. Scaling lr by (1 - delta) gives every algorithm the same
            # effective step, so the comparison is about the algorithms, not the step size.
            lr = options.lr * (1.0 - options.momentum) if momentum is not None else options.lr
            # Algorithms without a communication period keep train's default tau: for them it
            # only sets how often the model is published for evaluation (every 10 steps).
            config = TrainConfig(
                algo=algo, lr=lr, tau=tau if tau is not None else TrainConfig.tau,
                momentum=momentum, batch_size=options.batch_size, seed=options.seed,
                time_limit=options.time_limit, target_accuracy=options.target_accuracy,
                dataset=options.dataset, data_dir=Path(options.data_dir), model=options.model,
                # Single-worker references refuse a worker count other than 1.
                workers=None if single_worker(algo) else options.workers,
                devices=list(options.devices) if options.devices else None,
                eval_every=options.eval_every, eval_deferred=not options.live_eval, quiet=True)
            specs.append(RunSpec(index=len(specs) + 1, algo=algo, tau=tau, config=config))
    return specs


def default_bench_out() -> Path:
    return Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"


def check_options(options: BenchOptions) -> list[RunSpec]:
    """Every check that can fail on bad input, before anything is written or started.

    Returns the planned runs with their worker counts and directories resolved.
    Raises ConfigError, data.DataError or OutputError with one line.
    """
    from .data import prepare_dataset
    from .models import MODELS
    from .output import RESULT_FILES, OutputError

    check_algos(options.algos)
    check_taus(options.taus)
    # Checked here and not left to TrainConfig: the momentum algorithms see lr * (1 - momentum),
    # and an error about that product would not name the value the user typed.
    if not options.lr > 0:
        raise ConfigError(f"--lr must be > 0 (got {options.lr})")
    if not 0 <= options.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1) (got {options.momentum})")
    if options.model not in MODELS:
        raise ConfigError(f"unknown --model {options.model!r}; choose one of {', '.join(MODELS)}")

    specs = plan_runs(options)
    for spec in specs:
        # Validate a copy: train() validates the real config again and resolves it itself.
        checked = dataclasses.replace(spec.config).validate()
        spec.workers = int(checked.workers or 1)
        spec.devices = list(checked.devices or [])
        spec.name = run_name(spec.index, spec.algo, spec.workers, spec.tau)
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


def time_to_target(records: Sequence[dict[str, Any]], target: float) -> float | None:
    """Seconds of training at the first evaluation whose test accuracy reached ``target``.

    ``seconds`` in metrics.jsonl counts from the start of training, so start-up (spawning,
    imports, data loading) is excluded by construction. None if no evaluation reached it.
    """
    for record in records:
        if record.get("test_accuracy") is not None and record["test_accuracy"] >= target:
            return float(record["seconds"])
    return None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return numerator / denominator


def derive_rows(summaries: Sequence[dict[str, Any]], times_to_target: Sequence[float | None],
                run_dirs: Sequence[str]) -> list[dict[str, Any]]:
    """One bench row per run, with the figures relative to the first ``sgd`` run (if any).

    speedup_vs_sgd = sgd's time to target / this run's (None when either never reached it);
    efficiency = samples/s / (workers * sgd's samples/s), i.e. how much of p times the
    single-worker throughput the run achieved; bytes_per_sample = bytes exchanged with the
    center per training sample.
    """
    reference = next((i for i, s in enumerate(summaries) if s["algo"] == REFERENCE_ALGO), None)
    ref_time = times_to_target[reference] if reference is not None else None
    ref_rate = summaries[reference]["samples_per_second"] if reference is not None else None
    rows = []
    for s, t, run_dir in zip(summaries, times_to_target, run_dirs):
        rate = s["samples_per_second"]
        rows.append({
            "algo": s["algo"],
            "workers": s["workers"],
            "tau": s["tau"] if has_tau(s["algo"]) else None,
            "lr": s["lr"],
            "momentum": s.get("momentum"),
            "time_to_target_s": t,
            "speedup_vs_sgd": _ratio(ref_time, t) if ref_time is not None else None,
            "samples_per_second": rate,
            "efficiency": (_ratio(rate, s["workers"] * ref_rate) if ref_rate is not None else None),
            "exchange_fraction": s["exchange_fraction"],
            "bytes_per_sample": _ratio(s["bytes_exchanged"], s["total_samples"]),
            "final_test_accuracy": s["final_test_accuracy"],
            "startup_seconds": s["startup_seconds"],
            "train_seconds": s["train_seconds"],
            "run_dir": run_dir,
        })
    return rows


def settings_line(bench: dict[str, Any]) -> str:
    """The exact settings, written as the command that repeats the bench on this machine."""
    parts = ["easgd-local bench", f"--algos {','.join(bench['algos'])}"]
    if bench.get("workers") is not None:
        parts.append(f"--workers {bench['workers']}")
    parts += [f"--taus {','.join(str(t) for t in bench['taus'])}",
              f"--time-limit {bench['time_limit']:g}",
              f"--target-accuracy {bench['target_accuracy']:g}",
              f"--lr {bench['lr']:g}", f"--momentum {bench['momentum']:g}",
              f"--batch-size {bench['batch_size']}", f"--seed {bench['seed']}",
              f"--dataset {bench['dataset']}"]
    if bench["dataset"] != "mnist10k":
        parts.append(f"--data-dir {bench['data_dir']}")
    parts += [f"--model {bench['model']}"]
    if bench.get("devices"):
        parts.append(f"--devices {','.join(bench['devices'])}")
    parts.append(f"--eval-every {bench['eval_every']:g}")
    if bench.get("live_eval"):
        parts.append("--live-eval")
    machine = f"; {bench['cpu_count']} CPU cores" if bench.get("cpu_count") else ""
    if bench.get("load_average") is not None:
        machine += f", load average {bench['load_average']:g} at the start"
    return f"Settings: `{' '.join(parts)}`{machine}"


def _fmt(value: float | None, spec: str, suffix: str = "", none: str = "-") -> str:
    return none if value is None else f"{value:{spec}}{suffix}"


def _pct(value: float) -> str:
    return f"{100 * value:g}%"


def markdown_table(bench: dict[str, Any]) -> str:
    """bench.md: the settings line, then one table row per run."""
    target = _pct(bench["target_accuracy"])
    header = ["#", "algo", "p", "tau", "lr", f"time to {target} (s)", "speed-up vs sgd",
              "samples/s", "efficiency", "exchange time", "bytes/sample", "final accuracy",
              "start-up (s)", "train (s)", "run"]
    lines = [settings_line(bench), "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join(" --- " if i < 2 else " ---: " for i in range(len(header) - 1)) + "| --- |"]
    for i, r in enumerate(bench["runs"], 1):
        cells = [str(i), r["algo"], str(r["workers"]), _fmt(r["tau"], "d"), f"{r['lr']:g}",
                 _fmt(r["time_to_target_s"], ".1f", none="not reached"),
                 _fmt(r["speedup_vs_sgd"], ".2f", "x"),
                 _fmt(r["samples_per_second"], ",.0f"), _fmt(r["efficiency"], ".2f"),
                 _fmt(None if r["exchange_fraction"] is None else 100 * r["exchange_fraction"], ".1f", "%"),
                 _fmt(r["bytes_per_sample"], ",.0f"), _fmt(r["final_test_accuracy"], ".4f"),
                 _fmt(r["startup_seconds"], ".1f"), _fmt(r["train_seconds"], ".1f"), r["run_dir"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def progress_line(index: int, total: int, row: dict[str, Any], target: float) -> str:
    """The line that ends a run, e.g. '[2/5] easgd p=2 tau=10: 97% at 8.3 s, 3,710 samples/s'."""
    head = f"[{index}/{total}] {run_label(row['algo'], row['workers'], row['tau'])}: "
    return head + result_text(row, target)


def result_text(row: dict[str, Any], target: float) -> str:
    """What a finished run achieved, without the '[i/n] label: ' head."""
    if row["time_to_target_s"] is not None:
        reached = f"{_pct(target)} at {row['time_to_target_s']:.1f} s"
    else:
        reached = (f"{_pct(target)} not reached in {row['train_seconds']:.1f} s "
                   f"(final {100 * row['final_test_accuracy']:.1f}%)")
    return f"{reached}, {row['samples_per_second']:,.0f} samples/s"


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
        "lr": options.lr, "momentum": options.momentum, "seed": options.seed,
        "eval_every": options.eval_every, "live_eval": options.live_eval, "devices": devices,
        "data_dir": str(options.data_dir), "cpu_count": os.cpu_count(),
        "threads_per_worker": specs[0].config.threads, "load_average": _load_average(),
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


def write_plot(out: Path, bench: dict[str, Any]) -> str | None:
    """bench.png: center test error against seconds of training. Returns a note if not written."""
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
    for row in bench["runs"]:
        records = read_metrics(out / row["run_dir"] / "metrics.jsonl")
        xs = [r["seconds"] for r in records]
        ys = [max(1.0 - r["test_accuracy"], PLOT_ERROR_FLOOR) for r in records]
        ax.plot(xs, ys, marker=".", label=run_label(row["algo"], row["workers"], row["tau"]))
    ax.axhline(1.0 - bench["target_accuracy"], color="grey", linestyle="--", linewidth=1,
               label=f"target {_pct(bench['target_accuracy'])}")
    ax.set_yscale("log")
    ax.set_xlabel("seconds of training (start-up excluded)")
    ax.set_ylabel("center test error (1 - accuracy)")
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
              train_fn: TrainFn | None = None) -> dict[str, Any]:
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
    RunDir(out).create()  # refuses what cannot be written, in one line
    bench = bench_header(options, specs)
    summaries: list[dict[str, Any]] = []
    times: list[float | None] = []
    run_dirs: list[str] = []
    log.info("bench of %d run(s) in %s", len(specs), out)
    busy = busy_note(bench)
    if busy and on_note:
        on_note(busy)
    for spec in specs:
        if on_start:
            on_start(f"[{spec.index}/{len(specs)}] {run_label(spec.algo, spec.workers, spec.tau)}: ")
        spec.config.out = out / "runs" / spec.name
        summary = train_fn(spec.config, None)
        records = read_metrics(spec.config.out / "metrics.jsonl")
        summaries.append(summary)
        times.append(time_to_target(records, options.target_accuracy))
        # Relative to the bench directory, so the directory can be moved as a whole.
        run_dirs.append(str(Path("runs") / spec.name))
        bench["runs"] = derive_rows(summaries, times, run_dirs)
        # Rewritten after every run: an interrupted bench keeps what it measured.
        write_outputs(out, bench, plot=False)
        if on_done:
            on_done(result_text(bench["runs"][-1], options.target_accuracy))
    for note in write_outputs(out, bench, plot=True):
        log.info(note)
        if on_note:
            on_note(note)
    return bench

