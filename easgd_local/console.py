"""What the command line prints while and after a run: the progress bar, the summary table and
the line that ends an interrupted run (part of cli.py, the only place that prints)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from .config import TrainConfig


# The line that ends an interrupted command: plain "interrupted", unless a run was interrupted
# after its checkpoint was written (interrupted_line).
INTERRUPTED = ["interrupted"]


def interrupted_line(config: TrainConfig, reporter: "ProgressReporter | None") -> str:
    """'interrupted after ... ; continue with: easgd-local train --resume OUT' once the run has
    a checkpoint to continue from; plain 'interrupted' before."""
    out = Path(config.out) if config.out is not None else None
    if out is None or not list(out.glob("**/checkpoint/state.pt")):
        return "interrupted"
    done = ""
    if reporter is not None and reporter.samples:
        done = f" after {reporter.samples:,} samples in {reporter.elapsed:.1f} s"
    return f"interrupted{done}; continue with: easgd-local train --resume {out}"


class ProgressReporter:
    """A tqdm bar over training samples with samples/s and the last center accuracy."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.samples, self.elapsed = 0, 0.0  # the last progress, for the line of an interrupt

    def started(self, config: TrainConfig, total_samples: int | None) -> None:
        from tqdm import tqdm

        typer.echo(f"{config.algo}: {config.workers} worker(s) on {','.join(config.devices)}, "
                   f"alpha={config.resolved_alpha:g} tau={config.tau} lr={config.lr:g}, "
                   f"until {config.stop_rule()}; writing {config.out}", err=True)
        self.bar = tqdm(total=total_samples, unit="sample", unit_scale=True, dynamic_ncols=True,
                        file=sys.stderr, mininterval=0.5)

    def progress(self, samples: int, elapsed: float, accuracy: float | None) -> None:
        self.samples, self.elapsed = samples, elapsed
        # tqdm's own rate column is the samples/s; update() redraws at most every mininterval.
        if self.bar is not None and samples > self.bar.n:
            self.bar.update(samples - self.bar.n)

    def evaluated(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({"center acc": f"{record['test_accuracy']:.4f}"}, refresh=False)

    def finished(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_summary(summary: dict[str, Any], out: Path | None) -> None:
    rows = [
        ("algorithm", f"{summary['algo']} (p={summary['workers']}, tau={summary['tau']}, alpha={summary['alpha']:g})"),
        ("devices", ", ".join(summary["devices"])),
        ("center test accuracy", f"{summary['final_test_accuracy']:.4f}"),
        ("center test loss", f"{summary['final_test_loss']:.4f}"),
        ("training time", f"{summary['train_seconds']:.1f} s (+ {summary['startup_seconds']:.1f} s start-up)"),
        ("samples", f"{summary['total_samples']:,} ({summary['samples_per_second']:,.0f}/s)"),
        ("exchanges", f"{summary['exchanges']:,} ({summary['bytes_exchanged'] / 1e6:,.1f} MB, "
                      f"{100 * summary['exchange_fraction']:.1f}% of worker time)"),
        ("output", str(out)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:<{width}}  {v}")
