"""Deferred snapshots of a run's reported model, kept for evaluation after training: in memory
up to a size, then spooled to files in the run directory (evaluate.py's deferred mode)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)


class SnapshotSpool:
    """Deferred snapshots in arrival order: in memory up to ``memory_bytes``, then as files in
    ``directory`` (deleted once read back). A snapshot that cannot be written is counted in
    ``dropped`` and logged, never lost without a word."""

    def __init__(self, directory: Path, memory_bytes: int):
        self.directory, self.memory_bytes = Path(directory), memory_bytes
        self.items: list[tuple[Tensor | Path, dict[str, Any]]] = []
        self.held = 0  # bytes in memory
        self.spooled = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.items)

    def put(self, snapshot: Tensor, meta: dict[str, Any]) -> None:
        size = snapshot.numel() * snapshot.element_size()
        if self.held + size <= self.memory_bytes:
            self.items.append((snapshot, meta))
            self.held += size
            return
        path = self.directory / f"{len(self.items):07d}.f32"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            snapshot.numpy().tofile(path)
        except OSError as e:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
            self.dropped += 1
            if self.dropped == 1:
                log.warning("cannot keep a snapshot for deferred evaluation (%s); the records of "
                            "this run are incomplete", e.strerror or e)
            return
        self.items.append((path, meta))
        self.spooled += 1

    def drain(self) -> Iterator[tuple[Tensor, dict[str, Any]]]:
        """Every snapshot in order, each file deleted once it is read back."""
        while self.items:
            item, meta = self.items.pop(0)
            if isinstance(item, Path):
                snapshot = torch.from_numpy(np.fromfile(item, dtype=np.float32))
                item.unlink(missing_ok=True)
            else:
                snapshot = item
                self.held -= snapshot.numel() * snapshot.element_size()
            yield snapshot, meta

    def close(self) -> None:
        self.items.clear()
        self.held = 0
        shutil.rmtree(self.directory, ignore_errors=True)
