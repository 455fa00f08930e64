"""The bench's loop: calibrate, then every planned run in turn through launcher.train, the
outputs rewritten after each."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from .figures import derive_rows, read_metrics, run_figures
from .options import BENCH_FILE, PLOT_FILE, TABLE_FILE, TRIM_FLOOR, BenchOptions, upper_target
from .plan import RunSpec, check_options, run_label
from .report import bench_header, busy_note, result_text, write_outputs

log = logging.getLogger(__name__)

TrainFn = Callable[..., dict[str, Any]]
# The single-worker references, and how many times their slowest crossing a first repeat of
# another algorithm may train (trimmed_limit).
REFERENCES = ("sgd", "msgd")
REFERENCE_FACTOR = 4.0
Say = Callable[[str], None]


def _quiet(line: str) -> None:
    pass


def run_bench(options: BenchOptions,
              on_start: Say | None = None,
              on_done: Say | None = None,
              on_note: Say | None = None,
              train_fn: TrainFn | None = None,
              calibrate_fn: Callable[[], float] | None = None) -> dict[str, Any]:
    """Run every planned run in turn, writing the outputs after each; returns bench.json's content.

    ``on_start`` receives '[i/n] label: ' as a run begins, ``on_done`` the rest of that line when
    it ends, ``on_note`` anything else the user should know (such as a missing matplotlib).
    ``train_fn`` (config, reporter) -> summary defaults to launcher.train, looked up at call time.
    A run that fails raises (launcher.TrainError) and ends the bench; bench.json then holds
    the runs finished before it.
    """
    from ..output import RunDir

    on_start, on_done, on_note = on_start or _quiet, on_done or _quiet, on_note or _quiet
    specs = check_options(options)
    out = Path(options.out)  # resolved by check_options
    if train_fn is None:
        from .. import launcher

        train_fn = launcher.train
    RunDir(out).create(also_ours=(BENCH_FILE, TABLE_FILE, PLOT_FILE, "runs"))  # one line if not
    started = time.monotonic()
    bench = bench_header(options, specs)
    busy = busy_note(bench)
    if busy:
        on_note(busy)
    if options.calibrate:
        bench["one_thread_samples_per_second"] = round((calibrate_fn or _calibrator(options))(), 1)
        on_note(f"this machine trains {options.model} at "
                f"{bench['one_thread_samples_per_second']:,.0f} samples/s on one thread")
    runs: list[dict[str, Any]] = []
    log.info("bench of %d run(s) in %s", len(specs), out)
    for spec in specs:
        spec.config.time_limit = trimmed_limit(options, spec, runs)
        runs.append(_one_run(options, spec, len(specs), train_fn, on_start, on_note))
        bench["runs"] = derive_rows(runs)
        bench["wall_seconds"] = round(time.monotonic() - started, 1)
        # Rewritten after every run: an interrupted bench keeps what it measured.
        write_outputs(out, bench, plot=False)
        on_done(result_text(runs[-1], options.target_accuracy, options.target_band))
    for note in write_outputs(out, bench, plot=True):
        log.info(note)
        on_note(note)
    return bench


def trimmed_limit(options: BenchOptions, spec: RunSpec, done: list[dict[str, Any]]) -> float:
    """The training time of a planned run, from the crossings already measured (``done``).

    Runs evaluate their snapshots after training, so a run cannot stop at its own crossing.
    Instead, in the first repeat the single-worker references (sgd, msgd) set the others'
    time: at most REFERENCE_FACTOR times the slowest reference crossing so far (a run slower
    than that loses to one worker anyway); a later repeat trains at most trim_factor times its
    own configuration's first crossing. A crossing is the upper target's where the run reached
    it, else the target's (the upper target is crossed later, and the runs must last until
    then to measure it). Never less than TRIM_FLOOR nor more than --time-limit;
    the whole limit where nothing to go by reached the target (the first reference itself, a
    bench without references). A run that does not reach the target in its time counts as
    never reaching it.
    """
    if options.trim_factor <= 0:
        return options.time_limit
    if spec.repeat == 0:
        crossings = [_crossing(run) for run in done if run["repeat"] == 0
                     and run["algo"] in REFERENCES and _crossing(run) is not None]
        bound = REFERENCE_FACTOR * max(crossings) if crossings else None
    else:
        first = next((run for run in done
                      if run["repeat"] == 0 and _same_configuration(run, spec)), None)
        crossing = _crossing(first) if first else None
        bound = None if crossing is None else options.trim_factor * crossing
    return options.time_limit if bound is None else min(options.time_limit, max(TRIM_FLOOR, bound))


def _crossing(run: dict[str, Any]) -> float | None:
    """The last crossing a run measured: the upper target's, else the target's (or None)."""
    upper = run.get("time_to_upper_s")
    return upper if upper is not None else run.get("time_to_target_s")


def _same_configuration(run: dict[str, Any], spec: RunSpec) -> bool:
    return (run["algo"], run.get("tau"), run["lr"]) == (spec.algo, spec.tau, spec.lr)


def _calibrator(options: BenchOptions) -> Callable[[], float]:
    """The machine's one-thread samples/s of the bench's model (calibrate.py)."""
    from ..calibrate import one_thread_samples_per_second

    def calibrate() -> float:
        return one_thread_samples_per_second(options.model, options.dataset, options.batch_size,
                                             data_dir=str(options.data_dir))
    return calibrate


def _one_run(options: BenchOptions, spec: RunSpec, total: int, train_fn: TrainFn,
             on_start: Say, on_note: Say) -> dict[str, Any]:
    """Train one planned run and read its figures (``run_figures`` plus its lr and repeat)."""
    label = run_label(spec.algo, spec.workers, spec.tau,
                      spec.lr if options.lrs and len(options.lrs) > 1 else None)
    if options.repeats > 1:
        label += f" (repeat {spec.repeat + 1}/{options.repeats})"
    on_start(f"[{spec.index}/{total}] {label}: ")
    out = Path(options.out)
    spec.config.out = out / "runs" / spec.name
    summary = train_fn(spec.config, None)
    records = read_metrics(spec.config.out / "metrics.jsonl")
    # Relative to the bench directory, so the directory can be moved as a whole.
    figures = run_figures({**summary, "seed": spec.config.seed}, records,
                          options.target_accuracy, str(Path("runs") / spec.name),
                          upper=upper_target(options), band=options.target_band)
    if not figures["records_complete"]:
        on_note(f"{label}: snapshots were dropped, so its records are incomplete; "
                "its time to target is left out")
    return {**figures, "lr": spec.lr, "repeat": spec.repeat,
            "time_limit_s": spec.config.time_limit}
