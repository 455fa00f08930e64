"""bench.png: the median test error of each row over time, with the spread of the repeats as
a band. matplotlib is an optional dependency (the `plot` extra), imported only here."""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from .figures import log_error, read_metrics, shown_rows
from .options import PLOT_FILE
from .plan import pct, run_label

log = logging.getLogger(__name__)

PLOT_POINTS = 200
NO_MATPLOTLIB = "matplotlib is not installed: bench.png not written; pip install matplotlib"


def error_curve(records: Sequence[dict[str, Any]], grid: Sequence[float]) -> list[float]:
    """log(test error) of one run on a time grid, linear between records; NaN outside them."""
    pts = [(float(r["seconds"]), log_error(r["test_accuracy"])) for r in records
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
    from ..output import atomic_write

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
               label=f"target {pct(bench['target_accuracy'])}")
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

