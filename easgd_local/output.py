"""A run's output directory: config.json, metrics.jsonl, summary.json, center.pt.

Whole files are written atomically (temporary file in the same directory, flush, fsync,
rename), so a crash mid-write leaves the previous version intact, never half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULT_FILES = ("config.json", "metrics.jsonl", "summary.json", "center.pt")
# Everything else a run writes into its directory; with RESULT_FILES, the box-<k>/ directories
# of several boxes and the temporary files of atomic writes, what --out may hold and be ours.
RUN_ENTRIES = (".lock", "checkpoint", ".snapshots", ".write-test")


class OutputError(ValueError):
    """The output directory cannot be used; ``str(error)`` is one line."""


def default_out(algo: str, workers: int) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{algo}-p{workers}"


def atomic_write(path: Path, write: Any, binary: bool = False) -> None:
    """Write through ``write(file)`` into a temporary file, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_box_or_temp(name: str) -> bool:
    """box-<k>/ of several boxes, or a temporary file an atomic write left (.<name>.*.tmp)."""
    box, _, k = name.partition("-")
    return (box == "box" and k.isdigit()) or (name.startswith(".") and name.endswith(".tmp"))


def _is_our_config(path: Path) -> bool:
    """A config.json that a run wrote (a run that never started leaves only it), not a file of
    someone else's by that name."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"algo", "model", "workers"} <= saved.keys()


class RunLock:
    """An exclusive lock on a run directory for the life of a run: an fcntl lock on
    ``.lock`` in it, which the kernel drops when the process ends, however it ends. The file
    holds the holder's pid, to name it to a second process."""

    def __init__(self, path: Path):
        import fcntl

        self.path = Path(path) / ".lock"
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot write to --out {path}: {e.strerror or e}") from None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = -1
            raise OutputError(f"--out {path} is in use by another easgd-local process "
                              f"(pid {holder}); wait for it to end or choose another directory") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the lock
            self.fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    def lock(self) -> RunLock:
        """Hold this directory for one run (OutputError in one line if another process does)."""
        return RunLock(self.path)

    def create(self, also_ours: tuple[str, ...] = ()) -> None:
        """Make the directory, refusing one that already holds a run's results, and one that
        exists, is not empty and holds no run (a symlink to /etc, a project's folder): only what
        a run writes (RUN_ENTRIES, and ``also_ours``) may be in it. A run that never started
        (config.json alone) leaves a directory that a new run may take."""
        try:
            self._create(also_ours)
        except OSError as e:  # a name too long, a component that is a file, no permission
            raise OutputError(f"cannot use --out {self.path}: {e.strerror or e}") from None

    def _create(self, also_ours: tuple[str, ...]) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"--out {self.path} exists and is not a directory")
        if self.path.is_dir():
            self._refuse_taken(also_ours)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise OutputError(f"cannot write to --out {self.path}: {e.strerror or e}") from None

    def _refuse_taken(self, also_ours: tuple[str, ...]) -> None:
        names = sorted(os.listdir(self.path))
        held = [n for n in RESULT_FILES[1:] if n in names]
        # Its checkpoint, or (several boxes) one of its boxes'.
        checkpoints = [*self.path.glob("checkpoint/state*.pt"),
                       *self.path.glob("box-*/checkpoint/state*.pt")]
        if checkpoints:
            held.append(str(checkpoints[0].relative_to(self.path).parent))
        if held:
            raise OutputError(f"--out {self.path} already holds a run ({held[0]}); choose another "
                              f"directory, or continue it with: easgd-local train --resume {self.path}")
        ours = {*RESULT_FILES, *RUN_ENTRIES, *also_ours}
        foreign = [n for n in names if n not in ours and not _is_box_or_temp(n)]
        if "config.json" in names and not _is_our_config(self.path / "config.json"):
            foreign.insert(0, "config.json")
        if foreign:
            target = f" (a link to {self.path.resolve()})" if self.path.is_symlink() else ""
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise OutputError(f"--out {self.path}{target} is not empty and holds no run (it has "
                              f"{foreign[0]}{more}); choose a new or empty directory")

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write(self.path / name, lambda f: json.dump(obj, f, indent=2, sort_keys=True))

    def append_metrics(self, record: dict[str, Any]) -> None:
        # One line per evaluation, flushed at once so a crash loses at most the line being written.
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def save_state_dict(self, name: str, state_dict: dict[str, torch.Tensor]) -> None:
        atomic_write(self.path / name, lambda f: torch.save(state_dict, f), binary=True)
