"""The bench's flags: :class:`BenchOptions` (each field declared once, train's declaration
reused where the flag is shared) and the checks of the lists (--algos, --taus, --lrs).

Nothing here imports torch: the CLI imports this module for its defaults, and
`easgd-local --help` should stay fast (the registry is looked up when a check runs).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import config as cfg
from ..config import ConfigError, TrainConfig
from ..settings import declarations, problem, reuse, setting

BENCH_FILE, TABLE_FILE, PLOT_FILE = "bench.json", "bench.md", "bench.png"
UPPER_BY = 0.02  # the upper target's default distance above the target (95% -> 97%)
# The least a trimmed repeat trains (--trim-factor): seconds.
TRIM_FLOOR = 10.0

TRAIN = declarations(TrainConfig)  # the settings a bench shares with train


@dataclass
class BenchOptions:
    """What one bench runs; the CLI maps its flags onto these fields one to one (but --lr, as
    --lrs with one value). A field shared with train reuses train's declaration, with the
    bench's own default or help where they differ."""

    algos: list[str] = setting(
        ["sgd", "msgd", "easgd", "eamsgd", "downpour", "ddp", "hogwild"], flag="--algos", kind=list,
        concern="bench",
        help="Comma-separated algorithms (any --algo of train), run one after another on the same "
             "data, model, initial weights and per-worker batch.")
    # None: train's default; single-worker algorithms always run 1
    workers: int | None = reuse(TRAIN["workers"])
    taus: list[int] | None = setting(
        None, flag="--taus", kind=list, concern="bench", default_text="each algorithm's own",
        help="Comma-separated communication periods; every algorithm that has a tau (not sgd, "
             "msgd, ddp, hogwild) runs once per value.")
    time_limit: float = reuse(
        TRAIN["time_limit"], default=60.0, help="Seconds of training per run (start-up not counted).")
    target_accuracy: float = reuse(
        TRAIN["target_accuracy"], default=0.95,
        help="The test accuracy each run's time to target is measured to: the headline speed-up "
             "is at it (with --live-eval a run also stops there). 95% by default: crossed on the "
             "way up, where the curve is steep, so that its time reproduces from one bench to "
             "the next.")
    # A run that stops at its crossing ends its curve there; one that trains on to --time-limit
    # spends seconds that measure nothing. It trains on past the crossing, then stops.
    target_hold: float = reuse(
        TRAIN["target_hold"], default=0.5,
        help="With --live-eval: once a run's evaluation first reaches --target-accuracy, it "
             "trains on for this share of the time that took, at least 3 s, then stops (0: at "
             "once); without --live-eval the crossing is only known after training, and runs "
             "last --time-limit.")
    # Deferred evaluation only learns a run's crossing after it trained; the first repeat of a
    # configuration then bounds the later ones, so that they do not train on for nothing.
    trim_factor: float = setting(
        3.0, flag="--trim-factor", kind=float, bounds=">= 0", concern="bench",
        help="Repeats after the first train for at most this many times their configuration's "
             "time to target in its first repeat (to the upper target, where it was reached); in "
             "the first, the runs after sgd and msgd for at most 4 times the slowest of theirs (always at least "
             f"{TRIM_FLOOR:g} s, at most --time-limit; the whole limit where nothing to go by "
             "reached the target). 0: every run lasts --time-limit.")
    # One first crossing of a target is one lucky snapshot of an oscillating accuracy; the
    # geometric mean of five crossings across a band averages that luck out (docs/bench.md).
    target_band: float = setting(
        0.02, flag="--target-band", kind=float, bounds=">= 0", concern="bench",
        help="A run's time to target is the geometric mean of its first crossings of five "
             "targets evenly spread from --target-accuracy minus this to plus this (0.02: 93, "
             "94, 95, 96 and 97%), which reproduces from one bench to the next where a single "
             "crossing does not; 0: the first crossing of --target-accuracy alone.")
    upper_target: float | None = setting(
        None, flag="--upper-target", kind=float, bounds="(0, 1]", concern="bench",
        default_text=f"--target-accuracy + {UPPER_BY:g}",
        help="A second, higher test accuracy (above --target-accuracy), nearer the plateau, whose "
             "time to reach and speed-up are reported beside the target's (its first crossing "
             "moves more from bench to bench).")
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
        5, flag="--repeats", kind=int, bounds=">= 1", concern="bench",
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


def check_values(options: BenchOptions) -> None:
    """The lists, every declared field (kind, range) and that each algorithm option given
    applies to an algorithm of the bench; ConfigError with one line."""
    from ..algorithms import all_options

    check_algos(options.algos)
    if options.taus is not None:
        check_taus(options.taus)
    # Checked here and not left to TrainConfig: the momentum algorithms see lr * (1 - momentum),
    # and an error about that product would not name the value the user typed.
    if options.lrs is not None:
        check_lrs(options.lrs)
    for name, declared in DECLARED.items():
        message = problem(declared, getattr(options, name))
        if message:
            raise ConfigError(message)
    band = options.target_band
    if band > 0 and not 0 < options.target_accuracy - band < options.target_accuracy + band <= 1:
        raise ConfigError(f"--target-band {band:g} around --target-accuracy "
                          f"{options.target_accuracy:g} leaves (0, 1]; narrow it (0: no band)")
    if options.upper_target is not None and options.upper_target <= options.target_accuracy:
        raise ConfigError(f"--upper-target must be above --target-accuracy (got "
                          f"{options.upper_target:g} <= {options.target_accuracy:g})")
    options_declared = all_options()
    for name, value in options.options.items():
        if value is None:
            continue
        option, users = options_declared[name]
        if not any(a in users for a in options.algos):
            raise ConfigError(f"{option.flag} applies to {', '.join(users)}, none of which this "
                              "bench runs")



def band_targets(target: float, band: float) -> list[float]:
    """The targets whose first crossings make a run's time to target: five evenly spread
    over [target - band, target + band], or the target alone (band 0)."""
    if band <= 0:
        return [target]
    return [round(target + band * k / 2, 6) for k in (-2, -1, 0, 1, 2)]


def target_label(target: float, band: float = 0.0) -> str:
    """'95%', or with a band '93-97%'."""
    if band <= 0:
        return f"{100 * target:g}%"
    return f"{100 * (target - band):g}-{100 * (target + band):g}%"


def upper_target(options: BenchOptions) -> float | None:
    """--upper-target, else UPPER_BY above the target (None where that is not below 1)."""
    if options.upper_target is not None:
        return options.upper_target
    upper = round(options.target_accuracy + UPPER_BY, 6)
    return upper if upper < 1 else None
