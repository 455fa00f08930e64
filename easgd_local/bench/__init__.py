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

- time to target: the first crossing of a target in the run's records, interpolated between
  the two records that straddle it with the error (1 - accuracy) linear on a log scale in time;
  the headline's is the geometric mean of five such crossings across a band (--target-band:
  93-97% around 95%), the upper target's (--upper-target, 97%) one crossing;
- speed-up vs best single (the table leads with it): the median time to target of the fastest
  one-worker reference (sgd or msgd, each at its best rate) over the row's median time, with a
  90% bootstrap interval over the repeats of both (figures.bootstrap_ratio);
- speed-up vs sgd (kept beside it): per repeat, sgd's time to target (at sgd's best rate) over
  the run's, of the same repeat; then the median [min, max] over the repeats;
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

The package, one job a module: ``options`` (the flags and their checks), ``plan`` (the runs a
bench makes), ``figures`` (from records to rows), ``plot`` (bench.png), ``report`` (bench.md,
bench.json and the lines for the user) and ``run`` (the loop).
"""

from .figures import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, ERROR_FLOOR, FIGURES, REFERENCE_ALGO,
                      ROW_KEYS, TIME_TO_TARGET_METHOD, band_time, bootstrap_ratio, derive_rows,
                      read_metrics, record_spacing, run_figures, shown_rows, time_to_target)
from .options import (BENCH_FILE, CLI_SETTINGS, DECLARED, PLOT_FILE, TABLE_FILE, BenchOptions,
                      band_targets, check_algos, check_lrs, check_taus, check_values, has_tau,
                      options_for, parse_algos, parse_lrs, parse_taus, single_worker,
                      target_label, upper_target, uses_momentum)
from .plan import (RunSpec, check_options, default_bench_out, faults_for, plan_runs, run_label,
                   run_name)
from .plot import NO_MATPLOTLIB, PLOT_POINTS, error_curve, median_band, write_plot
from .report import (bench_header, busy_note, markdown_table, progress_line, result_text,
                     settings_line, write_outputs)
from .run import TrainFn, run_bench, trimmed_limit

__all__ = [
    "BENCH_FILE", "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "CLI_SETTINGS", "DECLARED",
    "ERROR_FLOOR", "FIGURES", "NO_MATPLOTLIB", "PLOT_FILE", "PLOT_POINTS", "REFERENCE_ALGO",
    "ROW_KEYS", "TABLE_FILE", "TIME_TO_TARGET_METHOD", "BenchOptions", "RunSpec", "TrainFn",
    "band_targets", "band_time", "bench_header", "bootstrap_ratio", "busy_note", "check_algos",
    "check_lrs", "check_options", "check_taus", "check_values", "default_bench_out",
    "derive_rows", "error_curve", "faults_for", "has_tau", "markdown_table", "median_band",
    "options_for", "parse_algos", "parse_lrs", "parse_taus", "plan_runs", "progress_line",
    "read_metrics", "record_spacing", "result_text", "run_bench", "run_figures", "run_label",
    "run_name", "settings_line", "shown_rows", "single_worker", "target_label",
    "time_to_target", "trimmed_limit", "upper_target", "uses_momentum", "write_outputs",
    "write_plot",
]
