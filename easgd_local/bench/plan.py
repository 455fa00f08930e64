"""The runs of a bench: every (algorithm, tau, lr) once per repeat, each an ordinary
TrainConfig, checked before anything is written or started."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import config as cfg
from ..config import ConfigError, TrainConfig
from .options import (BENCH_FILE, BenchOptions, check_values, has_tau, options_for, single_worker,
                      uses_momentum)


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


def pct(value: float) -> str:
    """An accuracy as a percentage: 0.97 -> '97%'."""
    return f"{100 * value:g}%"


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
            for tau in ((options.taus or [None]) if has_tau(algo) else [None]):
                for base_lr in (options.lrs or [None]):
                    momentum = options.momentum if uses_momentum(algo) else None
                    # With momentum delta, a constant gradient moves the weights by
                    # lr / (1 - delta) per step in the long run. Scaling lr by (1 - delta) gives
                    # every algorithm the same effective step, so the comparison is about the
                    # algorithms, not the step size. (None: the algorithm's default, which is
                    # set the same way.)
                    lr = (base_lr * (1.0 - options.momentum) if momentum is not None else base_lr
                          ) if base_lr is not None else None
                    # tau None: the algorithm's default (resolved in check_options); for those
                    # without a communication period it only sets how often the model is
                    # published for evaluation.
                    config = TrainConfig(
                        algo=algo, lr=lr, tau=tau,
                        momentum=momentum, batch_size=options.batch_size,
                        seed=options.seed + repeat,
                        time_limit=options.time_limit, target_accuracy=options.target_accuracy,
                        target_hold=options.target_hold,
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


def check_options(options: BenchOptions) -> list[RunSpec]:
    """Every check that can fail on bad input, before anything is written or started.

    Returns the planned runs with their worker counts and directories resolved.
    Raises ConfigError, data.DataError or OutputError with one line.
    """
    from ..data import prepare_dataset
    from ..models import check_model_name
    from ..output import RESULT_FILES, OutputError

    check_values(options)
    check_model_name(options.model)

    specs = plan_runs(options)
    for spec in specs:
        # Validate a copy: train() validates the real config again and resolves it itself.
        checked = dataclasses.replace(spec.config).validate()
        spec.workers = int(checked.workers or 1)
        spec.tau = checked.tau if has_tau(spec.algo) else None
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

