"""What a run tells its caller: its progress (a Reporter) and, when it cannot finish, TrainError.

The ground floor of the rooms of a run (launcher.py lists them): every room may end the run
with a TrainError, and none needs anything else of the others to do so.
"""

from __future__ import annotations

from typing import Any, Protocol

from .config import TrainConfig


class TrainError(RuntimeError):
    """The run could not finish; ``str(error)`` is one line."""


def one_line(error: BaseException, limit: int | None = None) -> str:
    """``error`` as "Type: message" on one line, its message cut at ``limit`` characters."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"


class Reporter(Protocol):
    def started(self, config: TrainConfig, total_samples: int | None) -> None: ...
    def progress(self, samples: int, elapsed: float, accuracy: float | None) -> None: ...
    def evaluated(self, record: dict[str, Any]) -> None: ...
    def finished(self) -> None: ...


class SilentReporter:
    def started(self, config: TrainConfig, total_samples: int | None) -> None: pass
    def progress(self, samples: int, elapsed: float, accuracy: float | None) -> None: pass
    def evaluated(self, record: dict[str, Any]) -> None: pass
    def finished(self) -> None: pass
