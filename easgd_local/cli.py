"""`easgd-local`: the command line. Maps flags onto TrainConfig; the only module that prints."""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, get_type_hints

import typer

from . import bench as _bench
from .algorithms import ALGORITHMS, all_options
from .config import DEFAULT_BOX_BETA, DEFAULT_BOX_TAU, ConfigError, TrainConfig

ALGOS = tuple(ALGORITHMS)

# typer re-exports BadParameter but not its base, the usage error that every flag-parsing
# failure raises (from click, or from the copy of click that newer typer releases carry).
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Elastic Averaging SGD on one machine: several GPUs or CPU processes.")

Algo = enum.Enum("Algo", {a: a for a in ALGOS}, type=str)
ALGO_HELP = "; ".join(f"{a.name}: {a.summary}" for a in ALGORITHMS.values()) + "."
ALGO_OPTIONS_PANEL = "Algorithm options"
LR_DEFAULTS = ", ".join(
    f"{a.name} {a.default_step:g}" + (" * (1 - momentum)" if a.uses_momentum else "")
    for a in ALGORITHMS.values())
MOMENTUM_ALGOS = ", ".join(a.name for a in ALGORITHMS.values() if a.uses_momentum)


def with_algorithm_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a Typer command one flag per option that an algorithm of the registry declares
    (algorithms/base.py: Option), so that an algorithm's options are defined in its own module.
    ``command`` receives their values as ``algorithm_options`` (name -> value, None if not given).
    """
    declared = all_options()
    hints = get_type_hints(command, include_extras=True)
    params = [p.replace(annotation=hints[p.name])
              for p in inspect.signature(command).parameters.values() if p.name != "algorithm_options"]
    annotations = {p.name: p.annotation for p in params}
    for name, (option, users) in declared.items():
        kind: Any = option.type
        if option.choices:
            kind = enum.Enum(name, {c: c for c in option.choices}, type=str)
        help_text = f"{option.help} [{', '.join(users)}]"
        annotation = Annotated[Optional[kind], typer.Option(option.flag, help=help_text,
                                                            rich_help_panel=ALGO_OPTIONS_PANEL)]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=annotation))
        annotations[name] = annotation

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        given = {}
        for name in declared:
            value = kwargs.pop(name)
            given[name] = value.value if isinstance(value, enum.Enum) else value
        return command(**kwargs, algorithm_options=given)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = annotations
    del wrapper.__wrapped__  # Typer must read the signature above, not the original's
    return wrapper
# Choices are listed here rather than imported from data/models so that `--help` and flag
# parsing stay fast; tests check the lists agree.
DATASET_CHOICES = ("mnist10k", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
MODEL_CHOICES = ("cnn", "cifar-paper", "resnet18")

ALGO_PANEL, DATA_PANEL, SYSTEM_PANEL, OUTPUT_PANEL = "Algorithm", "Data", "System", "Output"


@app.callback()
def _root() -> None:
    """Elastic Averaging SGD on one machine: several GPUs or CPU processes."""


@app.command()
@with_algorithm_options
def train(
    algo: Annotated[Algo, typer.Option(help=ALGO_HELP, rich_help_panel=ALGO_PANEL)] = Algo.eamsgd,
    lr: Annotated[Optional[float], typer.Option(help=f"Learning rate eta. (default: the algorithm's own, from the tuning sweep: {LR_DEFAULTS})", rich_help_panel=ALGO_PANEL)] = None,
    tau: Annotated[int, typer.Option(help="Communication period: an elastic exchange every tau local steps.", rich_help_panel=ALGO_PANEL)] = TrainConfig.tau,
    beta: Annotated[Optional[float], typer.Option(help="Moving rate as beta = workers * alpha, in (0, 1]. (default: 0.9)", rich_help_panel=ALGO_PANEL)] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Moving rate alpha given directly (instead of --beta).", rich_help_panel=ALGO_PANEL)] = None,
    momentum: Annotated[Optional[float], typer.Option(help=f"Nesterov momentum delta of {MOMENTUM_ALGOS}. (default: 0.9)", rich_help_panel=ALGO_PANEL)] = None,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.", rich_help_panel=ALGO_PANEL)] = TrainConfig.weight_decay,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size per worker.", rich_help_panel=ALGO_PANEL)] = TrainConfig.batch_size,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights; worker r orders its data with seed + r.", rich_help_panel=ALGO_PANEL)] = TrainConfig.seed,
    steps: Annotated[Optional[int], typer.Option(help="Stop after this many local steps per worker.", rich_help_panel=ALGO_PANEL)] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Stop after this many passes over the training set by all workers together. (default: 8 when no stop is given)", rich_help_panel=ALGO_PANEL)] = None,
    time_limit: Annotated[Optional[float], typer.Option(help="Stop after this many seconds of training (start-up not counted).", rich_help_panel=ALGO_PANEL)] = None,
    target_accuracy: Annotated[Optional[float], typer.Option(help="Stop once an evaluation of the center reaches this test accuracy.", rich_help_panel=ALGO_PANEL)] = None,
    dataset: Annotated[str, typer.Option(help="Data set: mnist10k (ships with the package), mnist, fashion-mnist, cifar10, cifar100, imagefolder (read from --data-dir), or your own data factory module:attr.", rich_help_panel=DATA_PANEL)] = "mnist10k",
    data_dir: Annotated[Path, typer.Option(help="Root of the torchvision data sets (imagefolder: the directory holding train/ and val/).", rich_help_panel=DATA_PANEL)] = TrainConfig.data_dir,
    download: Annotated[bool, typer.Option("--download", help="Download the data set into --data-dir if missing.", rich_help_panel=DATA_PANEL)] = False,
    model: Annotated[str, typer.Option(help="cnn (small, for 28x28 digits), cifar-paper (the paper's 7-layer net), resnet18, torchvision:NAME (any classification model of torchvision.models), or your own model factory module:attr.", rich_help_panel=DATA_PANEL)] = "cnn",
    workers: Annotated[Optional[int], typer.Option(help="Worker processes. (default: one per device; 2 on a CPU-only machine)", rich_help_panel=SYSTEM_PANEL)] = None,
    devices: Annotated[Optional[str], typer.Option(help="Comma-separated devices, e.g. cuda:0,cuda:1 or cpu; workers are dealt round-robin. (default: every visible GPU, else cpu)", rich_help_panel=SYSTEM_PANEL)] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Input side for imagefolder (default: the images' own size when they all share one, else 224) and a crop for the other sets.", rich_help_panel=DATA_PANEL)] = None,
    loader_workers: Annotated[int, typer.Option(help="DataLoader processes per worker, for data read from disk (imagefolder, your own Dataset).", rich_help_panel=DATA_PANEL)] = 0,
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads per CPU worker (default: the cores split between the CPU workers).", rich_help_panel=SYSTEM_PANEL)] = None,
    lock: Annotated[bool, typer.Option("--lock/--no-lock", help="Guard the center update with a lock; --no-lock runs Hogwild-style.", rich_help_panel=SYSTEM_PANEL)] = True,
    eval_every: Annotated[Optional[float], typer.Option(help="Seconds between evaluations of the center during training. (default: spaced so that evaluation takes --eval-budget of the run's compute)", rich_help_panel=SYSTEM_PANEL)] = None,
    eval_budget: Annotated[float, typer.Option(help="Share of the run's compute (cores, or GPUs) that evaluation may take; one evaluation's cost is measured at the start.", rich_help_panel=SYSTEM_PANEL)] = TrainConfig.eval_budget,
    eval_samples: Annotated[int, typer.Option(help="Test samples per evaluation while training: a fixed, seeded subset (0: the whole test set). The final evaluation always uses the whole test set.", rich_help_panel=SYSTEM_PANEL)] = TrainConfig.eval_samples,
    eval_deferred: Annotated[bool, typer.Option("--eval-deferred", help="Only snapshot the center while training and evaluate the snapshots afterwards, so that evaluation takes no cores from the workers (--target-accuracy then cannot end the run early).", rich_help_panel=SYSTEM_PANEL)] = False,
    max_restarts: Annotated[int, typer.Option(help="Dead workers replaced (from the center) before the run gives up.", rich_help_panel=SYSTEM_PANEL)] = TrainConfig.max_restarts,
    multi_node: Annotated[bool, typer.Option("--multi-node", help="One box of several, started by torchrun (see the README's \"Several machines\"): the boxes' centers are tied elastically to a root every --box-tau exchanges.", rich_help_panel=SYSTEM_PANEL)] = False,
    box_tau: Annotated[Optional[int], typer.Option(help=f"With --multi-node: exchanges of a box's center between two rounds between boxes, >= 1. (default: {DEFAULT_BOX_TAU})", rich_help_panel=SYSTEM_PANEL)] = None,
    box_beta: Annotated[Optional[float], typer.Option(help=f"With --multi-node: the root's moving rate beta_root = boxes * alpha_root, in (0, 1]. (default: {DEFAULT_BOX_BETA:g})", rich_help_panel=SYSTEM_PANEL)] = None,
    root_timeout: Annotated[float, typer.Option(help="With --multi-node: seconds a round between boxes waits for the others before the run ends with an error.", rich_help_panel=SYSTEM_PANEL)] = TrainConfig.root_timeout,
    fault: Annotated[Optional[str], typer.Option(help="Inject faults, for a demo: rank:step:kind[,...] with kind slow:F (that rank F times slower from that step), pause:S (stops S seconds), kill, exit, hang, nan.", rich_help_panel=SYSTEM_PANEL)] = None,
    stall_timeout: Annotated[Optional[float], typer.Option(help="Seconds without a step after which a worker (stopped, hung) is declared dead: killed and replaced. (default: 20 times the longest pause seen, at least 20 s)", rich_help_panel=SYSTEM_PANEL)] = None,
    checkpoint_every: Annotated[float, typer.Option(help="Seconds between checkpoints; one is also written at the end and on Ctrl-C.", rich_help_panel=OUTPUT_PANEL)] = TrainConfig.checkpoint_every,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory from its checkpoint, with its saved configuration; stop options given here replace the saved ones.", rich_help_panel=OUTPUT_PANEL)] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory. (default: runs/<timestamp>-<algo>-p<workers>)", rich_help_panel=OUTPUT_PANEL)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary table.", rich_help_panel=OUTPUT_PANEL)] = False,
    algorithm_options: Optional[dict] = None,
) -> None:
    """Train a model with EASGD (or a reference) and evaluate the center against wall-clock time."""
    from .launcher import train as run_training

    config = TrainConfig(
        algo=algo.value, lr=lr, tau=tau, beta=beta, alpha=alpha, momentum=momentum,
        weight_decay=weight_decay, batch_size=batch_size, seed=seed, lock=lock, steps=steps,
        epochs=epochs, time_limit=time_limit, target_accuracy=target_accuracy, dataset=dataset, data_dir=data_dir,
        download=download, model=model, workers=workers,
        devices=[d.strip() for d in devices.split(",") if d.strip()] if devices else None,
        threads=threads, image_size=image_size, loader_workers=loader_workers, eval_every=eval_every, eval_budget=eval_budget, eval_samples=eval_samples,
        eval_deferred=eval_deferred, out=out, quiet=quiet, max_restarts=max_restarts,
        stall_timeout=stall_timeout, faults=fault, multi_node=multi_node, root_timeout=root_timeout,
        box_tau=box_tau, box_beta=box_beta,
        checkpoint_every=checkpoint_every,
        options={k: v for k, v in (algorithm_options or {}).items() if v is not None})
    checkpoint = None
    if resume is not None:
        config, checkpoint = _resumed(resume, config, _given_on_command_line())
    reporter = None if quiet else ProgressReporter()
    summary = run_training(config, reporter, checkpoint)
    if not quiet:
        print_summary(summary, config.out)


BENCH_PANEL = "Bench"


@app.command()
@with_algorithm_options
def bench(
    algos: Annotated[str, typer.Option(help="Comma-separated algorithms (any --algo of train), run one after another on the same data, model, initial weights and per-worker batch.", rich_help_panel=BENCH_PANEL)] = _bench.DEFAULT_ALGOS,
    taus: Annotated[str, typer.Option(help="Comma-separated communication periods; every algorithm that has a tau (not sgd, msgd, ddp) runs once per value.", rich_help_panel=BENCH_PANEL)] = str(TrainConfig.tau),
    time_limit: Annotated[float, typer.Option(help="Seconds of training per run (start-up not counted).", rich_help_panel=BENCH_PANEL)] = _bench.DEFAULT_TIME_LIMIT,
    target_accuracy: Annotated[float, typer.Option(help="The test accuracy each run's time to target is measured to (with --live-eval a run also stops there).", rich_help_panel=BENCH_PANEL)] = _bench.DEFAULT_TARGET_ACCURACY,
    repeats: Annotated[int, typer.Option(help="Runs of every configuration, repeat r with seed + r; interleaved (repeat 1 of every run, then repeat 2, ...). Figures are the median [min, max].", rich_help_panel=BENCH_PANEL)] = _bench.DEFAULT_REPEATS,
    eval_every: Annotated[Optional[float], typer.Option(help="Seconds between snapshots of the center. (default: spaced by --eval-budget; the time to target is interpolated between snapshots)", rich_help_panel=BENCH_PANEL)] = None,
    eval_budget: Annotated[float, typer.Option(help="Evaluation's compute relative to a run's (its snapshots are evaluated after it trains, on the whole test set); sets the spacing of the snapshots.", rich_help_panel=BENCH_PANEL)] = _bench.DEFAULT_EVAL_BUDGET,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate eta of every run; the momentum algorithms get lr * (1 - momentum) (see --momentum). (default: each algorithm's own, as train)", rich_help_panel=ALGO_PANEL)] = None,
    lrs: Annotated[Optional[str], typer.Option(help="A grid of learning rates, e.g. 0.05,0.1,0.2: every algorithm (sgd included) runs at each, and the table shows each at its best.", rich_help_panel=ALGO_PANEL)] = None,
    momentum: Annotated[float, typer.Option(help=f"Nesterov momentum delta of the momentum algorithms ({MOMENTUM_ALGOS}). They run with lr * (1 - momentum), so that their effective step lr / (1 - momentum) equals the others' --lr.", rich_help_panel=ALGO_PANEL)] = _bench.DEFAULT_MOMENTUM,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size per worker.", rich_help_panel=ALGO_PANEL)] = TrainConfig.batch_size,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights, the same for every run.", rich_help_panel=ALGO_PANEL)] = TrainConfig.seed,
    dataset: Annotated[str, typer.Option(help="Data set: mnist10k (ships with the package), mnist, fashion-mnist, cifar10, cifar100, imagefolder (read from --data-dir), or your own data factory module:attr.", rich_help_panel=DATA_PANEL)] = "mnist10k",
    data_dir: Annotated[Path, typer.Option(help="Root of the torchvision data sets (imagefolder: the directory holding train/ and val/).", rich_help_panel=DATA_PANEL)] = TrainConfig.data_dir,
    model: Annotated[str, typer.Option(help="cnn (small, for 28x28 digits), cifar-paper (the paper's 7-layer net), resnet18, torchvision:NAME (any classification model of torchvision.models), or your own model factory module:attr.", rich_help_panel=DATA_PANEL)] = "cnn",
    workers: Annotated[Optional[int], typer.Option(help="Workers of the multi-worker algorithms; sgd and msgd always run one. Default: one per device (2 on a CPU-only machine).", rich_help_panel=SYSTEM_PANEL)] = None,
    devices: Annotated[Optional[str], typer.Option(help="Comma-separated devices, e.g. cuda:0,cuda:1 or cpu. Default: every visible GPU, else cpu.", rich_help_panel=SYSTEM_PANEL)] = None,
    out: Annotated[Optional[Path], typer.Option(help="Bench directory: bench.json, bench.md, bench.png and runs/. Default: runs/bench-<timestamp>.", rich_help_panel=OUTPUT_PANEL)] = None,
    fault: Annotated[Optional[str], typer.Option(help="Inject faults into every run, as train's --fault (e.g. 1:0:slow:5: worker 1 five times slower).", rich_help_panel=BENCH_PANEL)] = None,
    live_eval: Annotated[bool, typer.Option("--live-eval", help="Evaluate the center while each run trains, so that reaching --target-accuracy ends it early; by default runs only snapshot the center and evaluate afterwards, leaving every core to the workers being measured.", rich_help_panel=BENCH_PANEL)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress line per run (the table is still printed).", rich_help_panel=OUTPUT_PANEL)] = False,
    algorithm_options: Optional[dict] = None,
) -> None:
    """Compare algorithms: each trains for --time-limit (or to --target-accuracy); writes a table and a plot."""
    if lr is not None and lrs is not None:
        raise ConfigError("give --lr or --lrs, not both")
    options = _bench.BenchOptions(
        algos=_bench.parse_algos(algos), workers=workers, taus=_bench.parse_taus(taus),
        time_limit=time_limit, target_accuracy=target_accuracy,
        lrs=_bench.parse_lrs(lrs) if lrs is not None else (None if lr is None else [lr]),
        momentum=momentum, batch_size=batch_size, seed=seed, repeats=repeats,
        dataset=dataset, data_dir=data_dir, model=model,
        devices=[d.strip() for d in devices.split(",") if d.strip()] if devices else None,
        eval_every=eval_every, eval_budget=eval_budget, live_eval=live_eval, out=out, faults=fault,
        options={k: v for k, v in (algorithm_options or {}).items() if v is not None})
    # '[i/n] label: ' as a run starts, the result on the same line when it ends.
    result = _bench.run_bench(
        options,
        on_start=None if quiet else (lambda text: typer.echo(text, err=True, nl=False)),
        on_done=None if quiet else (lambda text: typer.echo(text, err=True)),
        on_note=lambda text: typer.echo(text, err=True))
    if not quiet:
        typer.echo(f"bench written to {options.out}", err=True)
    typer.echo(_bench.markdown_table(result), nl=False)


@app.command()
def stability(
    out: Annotated[Path, typer.Option(help="Directory for stability.json and stability.png.")] = Path("runs/stability"),
    workers: Annotated[str, typer.Option("--p", help="Comma-separated numbers of workers p.")] = "3,8",
    steps: Annotated[int, typer.Option(help="Steps of the simulated example (eta = 0.001, rho = 2.5, x = c = 1000).", min=1)] = 60_000,
) -> None:
    """The paper's section 4: round-robin EASGD and ADMM on F(x) = x^2/2, spectral radius of one
    cycle on a grid, and the paper's unstable ADMM example beside EASGD."""
    from .stability import run

    try:
        ps = [int(p) for p in workers.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--p must be comma-separated integers (got {workers!r})") from None
    if not ps or min(ps) < 1:
        raise ConfigError(f"--p values must be >= 1 (got {workers!r})")
    result, notes = run(out, ps, steps)
    for note in notes:
        typer.echo(note, err=True)
    for p in ps:
        e, a, ex = result["easgd"][str(p)], result["admm"][str(p)], result["example"][str(p)]
        typer.echo(f"p = {p}: EASGD's spectral radius <= 1 where the closed form says on "
                   f"{100 * e['agrees_with_closed_form']:.1f}% of the grid; ADMM unstable on "
                   f"{100 * a['unstable_share']:.1f}% of its grid; at the paper's example ADMM's "
                   f"radius is {ex['admm_spectral_radius']:.6f} (EASGD, alpha = "
                   f"{ex['easgd_alpha']:g}: {ex['easgd_spectral_radius']:.6f})")
    typer.echo(f"written to {out}", err=True)


STOP_FIELDS = ("steps", "epochs", "time_limit", "target_accuracy")
# What a resumed run may change: when it stops, how it is evaluated and checkpointed, where its
# data is, its restart budget (a fresh one), its threads. Everything else defines the run.
RESUMABLE_FIELDS = (*STOP_FIELDS, "data_dir", "download", "max_restarts", "stall_timeout",
                    "eval_every", "eval_budget", "eval_samples", "eval_deferred",
                    "checkpoint_every", "threads", "quiet")
# Flags that are not TrainConfig fields of the same name.
_FLAG_FIELDS = {"dataset": "dataset", "model": "model", "algo": "algo"}


def _resumed(run_dir: Path, given: TrainConfig, on_command_line: set[str]) -> tuple[TrainConfig, dict[str, Any]]:
    """The saved configuration of ``run_dir`` with the options given on the command line that
    may change on a resume (RESUMABLE_FIELDS), and its newest readable checkpoint. An option
    that cannot change and differs from the saved one is refused in one line."""
    import json

    from .checkpoint import Checkpointer

    try:
        text = (run_dir / "config.json").read_text()
    except FileNotFoundError:
        raise ConfigError(f"--resume {run_dir}: no config.json there; is it a run directory?") from None
    except OSError as e:
        raise ConfigError(f"--resume {run_dir}: cannot read config.json ({e.strerror or e}); "
                          "is it a run directory?") from None
    try:
        saved = TrainConfig.from_dict(json.loads(text))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--resume {run_dir}: config.json is unreadable ({_one_line(str(e))})") from None
    if "out" in on_command_line and given.out is not None and Path(given.out).resolve() != run_dir.resolve():
        raise ConfigError(f"--out cannot change on a resume (the run is in {run_dir})")
    resolved = None
    for name in sorted(on_command_line - {"out", "resume"}):
        if name in RESUMABLE_FIELDS:
            continue
        if name in given.options:
            if resolved is None:  # the algorithm's defaults, as the saved run used them
                import dataclasses

                resolved = dataclasses.replace(saved, options=dict(saved.options)).validate()
            before = resolved.resolved_options.get(name, saved.options.get(name))
            after = given.options.get(name)
        elif hasattr(given, name):
            before, after = getattr(saved, name), getattr(given, name)
        else:
            continue
        if before != after:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} cannot change on a resume (the run has {before}, given "
                              f"{after}); start a new run instead")
    if any(f in on_command_line for f in STOP_FIELDS):
        for f in STOP_FIELDS:
            setattr(saved, f, getattr(given, f))
    for f in RESUMABLE_FIELDS:
        if f in on_command_line and f not in STOP_FIELDS:
            setattr(saved, f, getattr(given, f))
    saved.out, saved.quiet = run_dir, given.quiet
    import dataclasses

    dataclasses.replace(saved, options=dict(saved.options)).validate()  # a mistyped config.json
    return saved, Checkpointer(run_dir).load()


class ProgressReporter:
    """A tqdm bar over training samples with samples/s and the last center accuracy."""

    def __init__(self) -> None:
        self.bar: Any = None

    def started(self, config: TrainConfig, total_samples: int | None) -> None:
        from tqdm import tqdm

        typer.echo(f"{config.algo}: {config.workers} worker(s) on {','.join(config.devices)}, "
                   f"alpha={config.resolved_alpha:g} tau={config.tau} lr={config.lr:g}, "
                   f"until {config.stop_rule()}; writing {config.out}", err=True)
        self.bar = tqdm(total=total_samples, unit="sample", unit_scale=True, dynamic_ncols=True,
                        file=sys.stderr, mininterval=0.5)

    def progress(self, samples: int, elapsed: float, accuracy: float | None) -> None:
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


def main(argv: list[str] | None = None) -> int:
    """Console entry point: every usage or input error is one line on stderr and exit code 2."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .launcher import TrainError
    from .output import OutputError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM and SIGHUP end a run the way Ctrl-C does: workers stopped and joined, a final
    # checkpoint, nothing left behind.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="easgd-local", standalone_mode=False)
    except UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError" and getattr(e, "ctx", None) is not None:
            typer.echo(e.ctx.get_help())
            return 0
        typer.echo(f"error: {_one_line(e.format_message())}", err=True)
        return 2
    except (ConfigError, DataError, OutputError, CheckpointError) as e:
        typer.echo(f"error: {_one_line(str(e))}", err=True)
        return 2
    except TrainError as e:
        typer.echo(f"error: {_one_line(str(e))}", err=True)
        return 1
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        return 130
    return result if isinstance(result, int) else 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _given_on_command_line() -> set[str]:
    """The parameters of the running command that the user gave (not their defaults)."""
    from typer.main import get_current_context

    ctx = get_current_context()
    return {name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE", "ENVIRONMENT")}


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
