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

    def create(self) -> None:
        """Make the directory, refusing one that already holds a run's results."""
        try:
            self._create()
        except OSError as e:  # a name too long, a component that is a file, no permission
            raise OutputError(f"cannot use --out {self.path}: {e.strerror or e}") from None

    def _create(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"--out {self.path} exists and is not a directory")
        existing = [n for n in RESULT_FILES if (self.path / n).exists()]
        if existing:
            raise OutputError(f"--out {self.path} already holds a run ({existing[0]}); choose another directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise OutputError(f"cannot write to --out {self.path}: {e.strerror or e}") from None

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write(self.path / name, lambda f: json.dump(obj, f, indent=2, sort_keys=True))

    def append_metrics(self, record: dict[str, Any]) -> None:
        # One line per evaluation, flushed at once so a crash loses at most the line being written.
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def save_state_dict(self, name: str, state_dict: dict[str, torch.Tensor]) -> None:
        atomic_write(self.path / name, lambda f: torch.save(state_dict, f), binary=True)
