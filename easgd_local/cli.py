"""`easgd-local`: the command line. Maps flags onto TrainConfig; the only module that prints.

The flags of `train` and `bench` are generated from the declarations (settings.py: the fields
of TrainConfig and BenchOptions, and each algorithm's Options), so that a setting is declared
once: its spelling, help, default and range here, in the checks and in the README come from
there (flags.py makes the parameters). :func:`build_app` builds the commands from the
declarations and the registry as they are when it runs. PyTorch loads only when a command
starts a run (:func:`load_run_modules`): --help and usage errors answer at once.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import __version__, console, settings
from . import bench as _bench
from .algorithms import all_options
from .config import ConfigError, TrainConfig
from .flags import Command, Group, command, help_facts, one_paragraph_help
from .resume import RESUMABLE_FIELDS, STOP_FIELDS, resumed  # noqa: F401 (read here by tests)
from .settings import Setting

# typer re-exports BadParameter but not its base, the usage error that every flag-parsing
# failure raises (from click, or from the copy of click that newer typer releases carry).
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

APP_HELP = "Elastic Averaging SGD on one machine: several GPUs or CPU processes."
# The --help panel of each concern (settings.CONCERNS) per command, the panels in the order
# they first appear here; a field name maps one setting to another panel.
TRAIN_PANELS = {"algorithm": "Algorithm", "stop": "Algorithm", "data": "Data",
                "system": "System", "evaluation": "System", "boxes": "System",
                "checkpoint": "Output", "output": "Output"}
BENCH_PANELS = {"bench": "Bench", **TRAIN_PANELS, "stop": "Bench", "evaluation": "Bench",
                "faults": "Bench"}

# Choices are listed here rather than imported from data/models so that `--help` and flag
# parsing stay fast; tests check the lists agree.
DATASET_CHOICES = ("mnist10k", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
MODEL_CHOICES = ("cnn", "cifar-paper", "resnet18")

# Flags of train that are no field of TrainConfig.
RESUME = Setting(
    "--resume", kind=Path, concern="checkpoint",
    help="Continue the run in this directory from its checkpoint, with its saved configuration; "
         "the options that may change on a resume (stop, evaluation, checkpoints, restarts, "
         "threads, precision, data directory) replace the saved ones.", note="See docs/faults.md.")
DECLARED = settings.declarations(TrainConfig)
TRAIN_SETTINGS = {**settings.flags(DECLARED), "resume": RESUME}


def _moved_before(named: dict[str, Setting], name: str, anchor: str) -> dict[str, Setting]:
    order = [n for n in named if n != name]
    order.insert(order.index(anchor), name)
    return {n: named[n] for n in order}


BENCH_SETTINGS = _moved_before({**settings.flags(settings.declarations(_bench.BenchOptions)),
                                **_bench.CLI_SETTINGS}, "lr", "lrs")  # --lr beside --lrs


def _as_list(text: str | None) -> list[str] | None:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    return items or None


def train(values: dict[str, Any], algorithm_options: dict[str, Any]) -> None:
    """Train a model with EASGD (or a reference) and evaluate the center against wall-clock time."""
    resume = values.pop("resume")
    for name in values:
        if TRAIN_SETTINGS[name].kind is list:
            values[name] = _as_list(values[name])
    config = TrainConfig(**values, options={k: v for k, v in algorithm_options.items()
                                            if v is not None})
    check_values(config)
    load_run_modules()
    from .launcher import train as run_training
    from .plot import write_run_files

    checkpoint = None
    if resume is not None:
        config, checkpoint = resumed(resume, config, _given_on_command_line())
    reporter = None if config.quiet else console.ProgressReporter()
    try:
        summary = run_training(config, reporter, checkpoint)
    except KeyboardInterrupt:
        if reporter is not None:
            reporter.finished()  # the bar closed before the line that ends the command
        console.INTERRUPTED[0] = console.interrupted_line(config, reporter)
        raise
    if config.out is not None:  # set by the run where it was not given
        write_run_files(Path(config.out))
    if not config.quiet:
        console.print_summary(summary, config.out)


def check_values(config: TrainConfig) -> None:
    """Each value given against its declaration (kind, choices, range), the algorithm options'
    too: a usage error is told before PyTorch loads. The run's validate() checks everything."""
    config.check_declared()
    options = all_options()
    for name, value in config.options.items():
        message = settings.problem(options[name][0].setting, value)
        if message:
            raise ConfigError(message)


# What a run needs, PyTorch among them: imported when a command starts one (load_run_modules).
RUN_MODULES = ("easgd_local.checkpoint", "easgd_local.data", "easgd_local.launcher",
               "easgd_local.output")
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def load_run_modules(names: tuple[str, ...] = RUN_MODULES) -> None:
    """Import ``names`` with Ctrl-C, SIGTERM and SIGHUP only noted; KeyboardInterrupt once they
    are in if one came. A KeyboardInterrupt raised while PyTorch loads can come out of its C++
    code, which calls back into Python (the process aborts: "terminate called after throwing an
    instance of pybind11::error_already_set"), or be swallowed there."""
    if threading.current_thread() is not threading.main_thread():  # no signals arrive there
        for name in names:
            importlib.import_module(name)
        return
    seen: list[int] = []
    before = {sig: signal.signal(sig, lambda signum, frame: seen.append(signum))
              for sig in INTERRUPTS}
    try:
        for name in names:
            importlib.import_module(name)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if seen:
        raise KeyboardInterrupt


def bench(values: dict[str, Any], algorithm_options: dict[str, Any]) -> None:
    """Compare algorithms: each trains for --time-limit (or to --target-accuracy); writes a table and a plot."""
    lr, lrs, taus = values.pop("lr"), values.pop("lrs"), values.pop("taus")
    quiet = values.pop("quiet")
    if lr is not None and lrs is not None:
        raise ConfigError("give --lr or --lrs, not both")
    options = _bench.BenchOptions(
        algos=_bench.parse_algos(values.pop("algos")),
        taus=_bench.parse_taus(taus) if taus is not None else None,
        lrs=_bench.parse_lrs(lrs) if lrs is not None else (None if lr is None else [lr]),
        devices=_as_list(values.pop("devices")),
        options={k: v for k, v in algorithm_options.items() if v is not None}, **values)
    load_run_modules()
    # '[i/n] label: ' as a run starts, the result on the same line when it ends.
    result = _bench.run_bench(
        options,
        on_start=None if quiet else (lambda text: typer.echo(text, err=True, nl=False)),
        on_done=None if quiet else (lambda text: typer.echo(text, err=True)),
        on_note=lambda text: typer.echo(text, err=True))
    if not quiet:
        typer.echo(f"bench written to {options.out}", err=True)
    typer.echo(_bench.markdown_table(result), nl=False)


def __getattr__(name: str) -> Any:
    if name == "app":  # the Typer app, for tools that load it by name
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _print_version(given: bool) -> None:
    if given:
        typer.echo(f"easgd-local {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.",
                                          callback=_print_version, is_eager=True)] = False,
) -> None:
    """Elastic Averaging SGD on one machine: several GPUs or CPU processes."""


def build_app() -> typer.Typer:
    """The command line, from the declarations and the registry as they are now."""
    app = typer.Typer(cls=Group, add_completion=True, no_args_is_help=True, help=APP_HELP,
                      rich_markup_mode="rich")
    app.callback()(_root)
    facts = help_facts()
    commands = {"train": command(train, TRAIN_SETTINGS, TRAIN_PANELS, facts),
                "bench": command(bench, BENCH_SETTINGS, BENCH_PANELS, facts),
                "evaluate": evaluate, "plot": plot, "stability": stability, "scale": scale}
    for name, fn in commands.items():
        app.command(name, cls=Command, help=one_paragraph_help(fn.__doc__))(fn)
    return app


def evaluate(
    run: Annotated[Path, typer.Argument(help="A run's directory (--out of train).",
                                        show_default=False)],
    dataset: Annotated[Optional[str], typer.Option(
        help="Evaluate on this data set instead of the run's (one the model can take).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(
        help="Where the data set is, instead of the run's --data-dir.")] = None,
) -> None:
    """Test loss and accuracy of a finished run's model (its center.pt) on the run's test data,
    as its summary.json reports them for the final model."""
    load_run_modules(("easgd_local.finished",))
    from .finished import evaluate_run

    result = evaluate_run(run, dataset=dataset, data_dir=data_dir)
    typer.echo(f"test loss {result.loss:.4f}  test accuracy {result.accuracy:.4f}  "
               f"({result.samples:,} samples)")


def plot(
    runs: Annotated[list[Path], typer.Argument(
        help="Run directories, or bench directories (each of their runs).", show_default=False)],
    out: Annotated[Path, typer.Option(help="The figure to write.")] = Path("curves.png"),
) -> None:
    """Overlay the test curves of finished runs (test accuracy and loss against seconds and
    against samples) in one figure."""
    from .plot import overlay

    typer.echo(f"written to {overlay(runs, out)}", err=True)


def scale(
    out: Annotated[Path, typer.Option(help="Directory for scale.json, scale.md and scale.png.")] = Path("runs/scale"),
    workers: Annotated[str, typer.Option("--p", help="Comma-separated numbers of emulated workers p.")] = "1,2,4,8,16",
    sizes: Annotated[str, typer.Option(help="Center sizes: resnet18, resnet50, vit-b or parameter counts.")] = "resnet18,resnet50,vit-b",
    taus: Annotated[str, typer.Option(help="Comma-separated communication periods tau.")] = "1,10",
    steps_ms: Annotated[str, typer.Option(help="Emulated local step times in milliseconds (a sleep).")] = "30,100",
    stripes: Annotated[Optional[str], typer.Option(help="Center stripes to compare; default 1 and --center-stripes' default.")] = None,
    device: Annotated[str, typer.Option(help="Where the workers' states live: cpu, or cuda[:N] for the real GPU link.")] = "cpu",
    host: Annotated[str, typer.Option(help="Without CUDA, the host's work per exchange: gpu (a GPU worker's: copies, check, locked addition) or cpu (a CPU worker's whole exchange).")] = "gpu",
    seconds: Annotated[float, typer.Option(help="The longest one point runs (shorter where cycles are short).")] = 6.0,
    copy_gbps: Annotated[float, typer.Option(help="With --host gpu on cpu: each of an exchange's two copies lasts at least size / this bandwidth in GB/s (a host-device link slower than memory, e.g. 12 for PCIe 3.0 x16); 0: unpaced.")] = 0.0,
    quick: Annotated[bool, typer.Option(help="A small grid, for a smoke test.")] = False,
) -> int:
    """The shared center's lock with many workers: emulated devices (a sleep per local step,
    real exchanges) on a grid of p, model size, tau and step time, beside a queueing model."""
    from .scale import DEFAULT_STRIPES, ScaleError, options_from_text, run_scale
    from .scale_report import markdown_table

    options = options_from_text(out, workers, sizes, taus, steps_ms,
                                stripes or f"1,{DEFAULT_STRIPES}", device, seconds, quick, host,
                                copy_gbps)
    try:
        result = run_scale(options, on_point=lambda line: typer.echo(line, err=True))
    except ScaleError as e:
        typer.echo(f"error: {_one_line(str(e))}", err=True)
        return 1
    typer.echo(markdown_table(result), nl=False)
    typer.echo(f"written to {out}", err=True)
    return 0


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


# The errors that end a command in one line, with their exit codes: 2 for bad input, 1 for a run
# that failed. Looked up among the modules loaded: one not loaded (for --help, none that imports
# PyTorch) cannot have raised its error.
ERRORS = (("easgd_local.config", "ConfigError", 2), ("easgd_local.data", "DataError", 2),
          ("easgd_local.output", "OutputError", 2), ("easgd_local.checkpoint", "CheckpointError", 2),
          ("easgd_local.launcher", "TrainError", 1))


def _exit_code(error: Exception) -> int | None:
    for module, name, code in ERRORS:
        if module in sys.modules and isinstance(error, getattr(sys.modules[module], name)):
            return code
    return None


def main(argv: list[str] | None = None) -> int:
    """Console entry point: every usage or input error is one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM and SIGHUP end a run the way Ctrl-C does: workers stopped and joined, a final
    # checkpoint, nothing left behind.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    click_command = typer.main.get_command(build_app())
    try:
        result = click_command.main(args=argv, prog_name="easgd-local", standalone_mode=False)
    except UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            # Rich help is printed as the error is made, plain help is its message; either way
            # exit code 2, as Typer's own no_args_is_help.
            if e.format_message().strip():
                typer.echo(e.format_message())
            return 2
        typer.echo(f"error: {_one_line(e.format_message())}", err=True)
        return 2
    except (KeyboardInterrupt, typer.Abort):
        typer.echo(console.INTERRUPTED[0], err=True)
        return 130
    except Exception as e:
        code = _exit_code(e)
        if code is None:
            raise
        typer.echo(f"error: {_one_line(str(e))}", err=True)
        return code
    if result == 130:  # typer turns a KeyboardInterrupt in a command into exit code 130, silently
        typer.echo(console.INTERRUPTED[0], err=True)
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
