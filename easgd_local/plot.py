"""Curves of finished runs from their records (metrics.jsonl): curves.png and metrics.csv beside
them at the end of every run, and ``easgd-local plot``, which overlays several runs (a bench's
among them) in one figure.

matplotlib is an optional dependency (the `plot` extra), imported only when a figure is drawn;
without it a run writes no curves.png and says so in one log line. Nothing here imports PyTorch.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from .bench.figures import read_metrics
from .config import ConfigError

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
CURVES_FILE = "curves.png"
CSV_FILE = "metrics.csv"
NO_MATPLOTLIB = "matplotlib is not installed: no figure written; pip install matplotlib"
# (record field, y label) of each row of panels; the columns are seconds and samples.
PANELS = (("test_accuracy", "test accuracy"), ("test_loss", "loss"))
X_AXES = (("seconds", "seconds of training"), ("samples", "training samples"))


def write_run_files(run_dir: Path) -> None:
    """metrics.csv and curves.png beside the run's metrics.jsonl. A run's results are written
    already: a file that cannot be written is a warning, not a failure."""
    records = read_metrics(run_dir / METRICS)
    if not records:
        return
    try:
        write_csv(records, run_dir / CSV_FILE)
        write_figure({run_dir.name: records}, run_dir / CURVES_FILE, title=run_dir.name)
    except ImportError:
        log.warning(NO_MATPLOTLIB)
    except OSError as e:
        log.warning("cannot write the curves of %s (%s)", run_dir, e.strerror or e)


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    """The records as CSV: one column per field of any record (in the order they first come),
    a list or mapping as its JSON, a missing field empty."""
    fields = list(dict.fromkeys(key for record in records for key in record))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for record in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                             for k, v in record.items()})


def run_dirs(paths: list[Path]) -> list[Path]:
    """The runs named: a run directory (it holds metrics.jsonl) is itself; a bench directory is
    each of its runs (runs/<name>/, bench/__init__.py); anything else is a ConfigError."""
    found: list[Path] = []
    for path in paths:
        if (path / METRICS).is_file():
            found.append(path)
        elif (path / "runs").is_dir():
            runs = sorted(p for p in (path / "runs").iterdir() if (p / METRICS).is_file())
            if not runs:
                raise ConfigError(f"plot: {path} is a bench directory without a finished run")
            found += runs
        elif not path.exists():
            raise ConfigError(f"plot: {path} does not exist")
        else:
            raise ConfigError(f"plot: {path} holds no run (no {METRICS}) and no bench (no runs/)")
    return found


def overlay(paths: list[Path], out: Path) -> Path:
    """One figure of every run in ``paths`` (run_dirs), written to ``out``; ConfigError in one
    line when a path holds no run or matplotlib is missing."""
    runs = run_dirs(paths)
    curves = {_label(run, runs): read_metrics(run / METRICS) for run in runs}
    try:
        write_figure(curves, out, title=f"{len(curves)} run(s)")
    except ImportError:
        raise ConfigError(f"plot: {NO_MATPLOTLIB}") from None
    except OSError as e:
        raise ConfigError(f"plot: cannot write {out} ({e.strerror or e})") from None
    return out


def _label(run: Path, runs: list[Path]) -> str:
    """The run's directory name, with its parent's where two runs share a name (two benches)."""
    same = [r for r in runs if r.name == run.name]
    return run.name if len(same) == 1 else f"{run.parent.parent.name}/{run.name}"


def write_figure(curves: dict[str, list[dict[str, Any]]], out: Path, title: str) -> None:
    """Test accuracy and loss (the training loss dashed, where recorded) against seconds and
    against samples, one line per run (label -> records). ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(len(PANELS), len(X_AXES), squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(curves))]
    for (label, records), color in zip(curves.items(), colors):
        for row, (field, ylabel) in enumerate(PANELS):
            for col, (x_field, xlabel) in enumerate(X_AXES):
                ax = axes[row][col]
                _line(ax, records, x_field, field, color, label, "-")
                if field == "test_loss":
                    _line(ax, records, x_field, "train_loss", color, None, "--")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
    axes[1][0].set_title("test loss (training loss dashed)", fontsize="small")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(title)
    FigureCanvasAgg(fig).print_png(out)


def _line(ax: Any, records: list[dict[str, Any]], x: str, y: str, color: str,
          label: str | None, style: str) -> None:
    points = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, style, color=color, label=label, marker="." if len(points) < 30 else None)
