"""`easgd-local`: the command line. Maps flags onto TrainConfig; the only module that prints.

The flags of `train` and `bench` are generated from the declarations (settings.py: the fields
of TrainConfig and BenchOptions, and each algorithm's Options), so that a setting is declared
once: its spelling, help, default and range here, in the checks and in the README come from
there. :func:`build_app` builds the commands from the declarations and the registry as they
are when it runs.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import logging
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import bench as _bench
from . import settings
from .algorithms import ALGORITHMS, all_options
from .config import ConfigError, TrainConfig
from .settings import Setting

# typer re-exports BadParameter but not its base, the usage error that every flag-parsing
# failure raises (from click, or from the copy of click that newer typer releases carry).
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

APP_HELP = "Elastic Averaging SGD on one machine: several GPUs or CPU processes."
ALGO_OPTIONS_PANEL = "Algorithm options"
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
         "threads, data directory) replace the saved ones.", note="See \"Faults\".")
DECLARED = settings.declarations(TrainConfig)
TRAIN_SETTINGS = {**settings.flags(DECLARED), "resume": RESUME}


def _moved_before(named: dict[str, Setting], name: str, anchor: str) -> dict[str, Setting]:
    order = [n for n in named if n != name]
    order.insert(order.index(anchor), name)
    return {n: named[n] for n in order}


BENCH_SETTINGS = _moved_before({**settings.flags(settings.declarations(_bench.BenchOptions)),
                                **_bench.CLI_SETTINGS}, "lr", "lrs")  # --lr beside --lrs

STOP_FIELDS = tuple(name for name, s in DECLARED.items() if s.concern == "stop")
# What a resumed run may change (declared resumable): when it stops, how it is evaluated and
# checkpointed, where its data is, its restart budget (a fresh one), its threads. Everything
# else defines the run.
RESUMABLE_FIELDS = tuple(name for name, s in DECLARED.items() if s.resumable)


def help_facts(readme: bool = False) -> dict[str, str]:
    """What help sentences say about the registry ({algorithms}, {lr_defaults},
    {momentum_algos} in a declaration's help), as the registry is now."""
    algorithms = ("one of the table of algorithms below" if readme else
                  "; ".join(f"{a.name}: {a.summary}" for a in ALGORITHMS.values()))
    lr_defaults = ", ".join(
        f"{a.name} {a.default_step:g}" + (" * (1 - momentum)" if a.uses_momentum else "")
        for a in ALGORITHMS.values())
    momentum_algos = ", ".join(a.name for a in ALGORITHMS.values() if a.uses_momentum)
    return {"algorithms": algorithms, "lr_defaults": lr_defaults, "momentum_algos": momentum_algos}


def _cli_type(name: str, declared: Setting) -> tuple[Any, Any]:
    """(annotation type, default) of a setting's parameter: a list is one comma-separated
    string, choices an Enum (--algo's are the registry's)."""
    default = declared.default
    if declared.kind is bool:
        return bool, default
    if declared.kind is list:
        text = None if default is None else ",".join(str(v) for v in default)
        return (str if text is not None else Optional[str]), text
    choices = tuple(ALGORITHMS) if name == "algo" else declared.choices
    kind: Any = declared.kind
    if choices:
        kind = enum.Enum(name, {c: c for c in choices}, type=str)
        default = None if default is None else kind(default)
    return (kind if default is not None else Optional[kind]), default


def _parameter(name: str, declared: Setting, panel: str, help_text: str) -> inspect.Parameter:
    from rich.markup import escape  # help is read as rich markup: "[min, max]" would vanish

    kind, default = _cli_type(name, declared)
    # A default resolved later (None here) is shown in the declaration's words.
    info = typer.Option(declared.flag, *declared.aliases, help=escape(help_text),
                        rich_help_panel=panel, show_default=declared.default_text or True)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, info])


def parameters(named: dict[str, Setting], panels: dict[str, str],
               facts: dict[str, str]) -> list[inspect.Parameter]:
    """One parameter per declared setting, then one per algorithm option of the registry
    (algorithms/base.py: Option, each declared in its algorithm's module)."""
    order = list(dict.fromkeys(panels.values()))
    panel = {name: panels.get(name) or panels[s.concern] for name, s in named.items()}
    params = [_parameter(name, s, panel[name], settings.help_text(s, facts))
              for name, s in sorted(named.items(), key=lambda item: order.index(panel[item[0]]))]
    for name, (option, users) in all_options().items():
        if name in named:
            raise TypeError(f"algorithm option {name} has the name of a setting")
        declared = option.setting
        # An option not given is None: its default is resolved with the run (resolve_options)
        # and shown in words.
        shown = (settings.default_text(declared)
                 if declared.default is not None or declared.default_text else "")
        declared = dataclasses.replace(declared, default=None, default_text=shown)
        text = f"{settings.help_text(declared)} [{', '.join(users)}]"
        params.append(_parameter(name, declared, ALGO_OPTIONS_PANEL, text))
    return params


def command(run: Callable[[dict[str, Any], dict[str, Any]], Any], named: dict[str, Setting],
            panels: dict[str, str], facts: dict[str, str]) -> Callable[..., Any]:
    """A Typer command with one flag per setting in ``named`` and per algorithm option:
    ``run(values, algorithm_options)`` receives the settings' values by name (an Enum as its
    value) and the options' (None where not given)."""
    params = parameters(named, panels, facts)
    option_names = [p.name for p in params if p.name not in named]

    def wrapper(**kwargs: Any) -> Any:
        values = {k: v.value if isinstance(v, enum.Enum) else v for k, v in kwargs.items()}
        options = {name: values.pop(name) for name in option_names}
        return run(values, options)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    wrapper.__name__, wrapper.__doc__ = run.__name__, run.__doc__
    return wrapper


def _as_list(text: str | None) -> list[str] | None:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    return items or None


def train(values: dict[str, Any], algorithm_options: dict[str, Any]) -> None:
    """Train a model with EASGD (or a reference) and evaluate the center against wall-clock time."""
    from .launcher import train as run_training

    resume = values.pop("resume")
    for name in values:
        if TRAIN_SETTINGS[name].kind is list:
            values[name] = _as_list(values[name])
    config = TrainConfig(**values, options={k: v for k, v in algorithm_options.items()
                                            if v is not None})
    checkpoint = None
    if resume is not None:
        config, checkpoint = _resumed(resume, config, _given_on_command_line())
    reporter = None if config.quiet else ProgressReporter()
    summary = run_training(config, reporter, checkpoint)
    if not config.quiet:
        print_summary(summary, config.out)


def bench(values: dict[str, Any], algorithm_options: dict[str, Any]) -> None:
    """Compare algorithms: each trains for --time-limit (or to --target-accuracy); writes a table and a plot."""
    lr, lrs, quiet = values.pop("lr"), values.pop("lrs"), values.pop("quiet")
    if lr is not None and lrs is not None:
        raise ConfigError("give --lr or --lrs, not both")
    options = _bench.BenchOptions(
        algos=_bench.parse_algos(values.pop("algos")), taus=_bench.parse_taus(values.pop("taus")),
        lrs=_bench.parse_lrs(lrs) if lrs is not None else (None if lr is None else [lr]),
        devices=_as_list(values.pop("devices")),
        options={k: v for k, v in algorithm_options.items() if v is not None}, **values)
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


def _root() -> None:
    """Elastic Averaging SGD on one machine: several GPUs or CPU processes."""


def build_app() -> typer.Typer:
    """The command line, from the declarations and the registry as they are now."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, help=APP_HELP)
    app.callback()(_root)
    facts = help_facts()
    app.command("train")(command(train, TRAIN_SETTINGS, TRAIN_PANELS, facts))
    app.command("bench")(command(bench, BENCH_SETTINGS, BENCH_PANELS, facts))
    app.command("stability")(stability)
    return app


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


def _resumed(run_dir: Path, given: TrainConfig, on_command_line: set[str]) -> tuple[TrainConfig, dict[str, Any]]:
    """The saved configuration of ``run_dir`` with the options given on the command line that
    may change on a resume (RESUMABLE_FIELDS), and its newest readable checkpoint. An option
    that cannot change and differs from the saved one is refused in one line."""
    import json

    from .checkpoint import Checkpointer, check_made_by

    config_dir, checkpoint_dir = _resume_dirs(run_dir)
    try:
        text = (config_dir / "config.json").read_text()
    except FileNotFoundError:
        raise ConfigError(f"--resume {run_dir}: no config.json in {config_dir}; is it a run "
                          "directory?") from None
    except OSError as e:
        raise ConfigError(f"--resume {run_dir}: cannot read {config_dir / 'config.json'} "
                          f"({e.strerror or e}); is it a run directory?") from None
    try:
        saved = TrainConfig.from_dict(json.loads(text))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--resume {run_dir}: {config_dir / 'config.json'} is unreadable "
                          f"({_one_line(str(e))})") from None
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
            flag = (TRAIN_SETTINGS[name].label if name in TRAIN_SETTINGS
                    else all_options()[name][0].flag)
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

    checked = dataclasses.replace(saved, options=dict(saved.options)).validate()  # a mistyped config.json
    checkpoint = Checkpointer(checkpoint_dir).load()
    check_made_by(checkpoint, checked, run_dir)  # a config.json copied from another run
    return saved, checkpoint


def _resume_dirs(run_dir: Path) -> tuple[Path, Path]:
    """Where the run in ``run_dir`` keeps its config.json and its checkpoint: both in it, but in
    a job of several boxes (resumed with the torchrun command that started it, on every box),
    where box 0 keeps its configuration in OUT and its checkpoints in OUT/box-0, and box k both
    in OUT/box-k (torchrun's RANK says which box this is; multinode.py)."""
    from .multinode import box_dir, torchrun_env

    env = torchrun_env()
    rank = None if env is None else env[0]
    if box_dir(run_dir, 0).is_dir() or (rank is not None and box_dir(run_dir, rank).is_dir()):
        if rank is None:
            raise ConfigError(f"--resume {run_dir}: a job of several boxes; resume it with the "
                              f"torchrun command that started it, on every box, with --resume "
                              f"{run_dir} added")
        return (run_dir if rank == 0 else box_dir(run_dir, rank)), box_dir(run_dir, rank)
    if re.fullmatch(r"box-\d+", run_dir.name) and (run_dir.parent / "config.json").exists():
        raise ConfigError(f"--resume {run_dir}: one box of a job of several boxes; resume the "
                          f"job with the torchrun command that started it, on every box, with "
                          f"--resume {run_dir.parent} added")
    return run_dir, run_dir


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
    click_command = typer.main.get_command(build_app())
    try:
        result = click_command.main(args=argv, prog_name="easgd-local", standalone_mode=False)
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
    if result == 130:  # typer turns a KeyboardInterrupt in a command into exit code 130, silently
        typer.echo("interrupted", err=True)
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
