"""Checkpoints of a run: the center, the master's state, every worker's state, the counters.

One file, ``checkpoint/state.pt``, written atomically (temporary file, flush, fsync, rename);
before a new one replaces it, the current one becomes ``state.prev.pt``. A checkpoint that
cannot be read (truncated, corrupt) is reported in one line and the previous one is used.

Checkpoints are read with ``weights_only=True``, the worker states inside them too: they hold
only tensors, numbers, strings, bytes and containers, so a crafted ``state.pt`` in a run
directory cannot run code on ``--resume``; it is refused like a corrupt one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .output import atomic_write


def unpack_state(data: bytes) -> dict:
    """A worker's state from its bytes (tensors, numbers and containers only)."""
    import io

    return torch.load(io.BytesIO(data), weights_only=True)

log = logging.getLogger(__name__)

# 3: the algorithm's shared state under "algorithm" (2: master momentum over the parameters only)
VERSION = 3
KEYS = ("version", "algorithm", "steps", "counters", "losses", "workers", "elapsed", "restarts")


class CheckpointError(ValueError):
    """No usable checkpoint; ``str(error)`` is one line."""


class Checkpointer:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / "checkpoint"
        self.current = self.dir / "state.pt"
        self.previous = self.dir / "state.prev.pt"

    def save(self, payload: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        payload = {"version": VERSION, **payload}
        tmp = self.dir / "state.next.pt"
        atomic_write(tmp, lambda f: torch.save(payload, f), binary=True)
        # Keep the previous checkpoint until the new one is in place: a crash between the two
        # renames leaves state.prev.pt, which load() falls back to.
        if self.current.exists():
            os.replace(self.current, self.previous)
        os.replace(tmp, self.current)

    def load(self) -> dict[str, Any]:
        """The newest readable checkpoint; CheckpointError when there is none."""
        problems = []
        for path in (self.current, self.previous):
            if not path.exists():
                continue
            try:
                payload = torch.load(path, weights_only=True, map_location="cpu")
                missing = [k for k in KEYS if k not in payload] if isinstance(payload, dict) else ["all"]
                if missing or payload["version"] != VERSION:
                    raise ValueError(f"not a checkpoint of this version (missing {missing})")
                for state in payload["workers"].values():
                    unpack_state(state)  # the workers would refuse it later, less clearly
                if path is self.previous:
                    log.warning("checkpoint %s is unreadable (%s); resuming from the previous one",
                                self.current, problems[-1] if problems else "missing")
                return payload
            except Exception as e:  # truncated zip, unpickling error, wrong content
                problems.append(f"{path.name}: {type(e).__name__}: {' '.join(str(e).split())[:120]}")
        if not problems:
            raise CheckpointError(f"no checkpoint in {self.dir}")
        raise CheckpointError(f"no readable checkpoint in {self.dir} ({'; '.join(problems)})")


# What a checkpoint says it was made by (key, flag): the settings that define its state. With
# the state's layout (each saved entry's name and size), --resume refuses a checkpoint that is
# not of the configuration beside it (a config.json copied from another run) in one line.
MADE_BY = (("algo", "--algo"), ("model", "--model"), ("dataset", "--dataset"),
           ("workers", "--workers"))
REFUSED = "a checkpoint resumes only the run that wrote it"


def made_by(config: Any, algorithm_state: dict[str, Any]) -> dict[str, Any]:
    """The settings that made a checkpoint and the layout of its shared state."""
    return {**{key: getattr(config, key) for key, _ in MADE_BY},
            "layout": {name: int(t.numel()) for name, t in algorithm_state.items()}}


def check_made_by(payload: dict[str, Any], config: Any, where: Path) -> None:
    """CheckpointError (one line) when the checkpoint says it was made by other settings than
    ``config`` has. A checkpoint written before checkpoints said so is checked by its layout
    alone (check_layout)."""
    made = payload.get("made_by")
    if not isinstance(made, dict):
        return
    for key, flag in MADE_BY:
        if key in made and made[key] != getattr(config, key):
            raise CheckpointError(f"--resume {where}: its checkpoint was made with {flag} "
                                  f"{made[key]}, but its config.json has {flag} "
                                  f"{getattr(config, key)}; {REFUSED}")


def check_layout(payload: dict[str, Any], sizes: dict[str, int], workers: int,
                 where: Path) -> None:
    """CheckpointError (one line) unless the saved shared state fits the one this
    configuration builds (``sizes``: each entry's name and size): every saved entry one of
    them, of its size, and one step count per worker."""
    for name, t in payload["algorithm"].items():
        size = int(t.numel()) if torch.is_tensor(t) else -1
        if name not in sizes:
            problem = f"an entry {name} that this configuration does not have"
        elif sizes[name] != size:
            problem = f"{name} of {size:,} values where this configuration has {sizes[name]:,}"
        else:
            continue
        raise CheckpointError(f"--resume {where}: its checkpoint does not match its config.json "
                              f"(it holds {problem}); {REFUSED}")
    saved = int(payload["steps"].numel()) if torch.is_tensor(payload["steps"]) else -1
    if saved != workers:
        raise CheckpointError(f"--resume {where}: its checkpoint holds {saved} workers, its "
                              f"config.json has --workers {workers}; {REFUSED}")
