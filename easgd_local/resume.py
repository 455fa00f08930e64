"""--resume: a run's saved configuration with what the command line may change on a resume,
and its newest readable checkpoint (train's --resume in cli.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .algorithms import all_options
from .config import ConfigError, TrainConfig
from .settings import declarations

DECLARED = declarations(TrainConfig)
STOP_FIELDS = tuple(name for name, s in DECLARED.items() if s.concern == "stop")
# What a resumed run may change (declared resumable): when it stops, how it is evaluated and
# checkpointed, where its data is, its restart budget (a fresh one), its threads. Everything
# else defines the run.
RESUMABLE_FIELDS = tuple(name for name, s in DECLARED.items() if s.resumable)


def resumed(run_dir: Path, given: TrainConfig, on_command_line: set[str]) -> tuple[TrainConfig, dict[str, Any]]:
    """The saved configuration of ``run_dir`` with the options given on the command line that
    may change on a resume (RESUMABLE_FIELDS), and its newest readable checkpoint. An option
    that cannot change and differs from the saved one is refused in one line."""
    from .checkpoint import Checkpointer, check_made_by
    from .finished import saved_config

    config_dir, checkpoint_dir = resume_dirs(run_dir)
    saved = saved_config(run_dir, f"--resume {run_dir}", config_dir)
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
            flag = DECLARED[name].label if name in DECLARED else all_options()[name][0].flag
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


def resume_dirs(run_dir: Path) -> tuple[Path, Path]:
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
