"""easgd-local: Elastic Averaging SGD and its family on one machine with several workers.

The public names are below; they are imported when first used, because every spawned worker
imports this package and pays for what it pulls in.
"""

from __future__ import annotations

# No import here, not even typing: this runs first in every command, and a Ctrl-C that comes
# before easgd_local.__main__ guards against it would print a traceback.
__version__ = "0.1.0"

__all__ = ["BenchOptions", "ConfigError", "TrainConfig", "TrainError", "run_bench", "train",
           "__version__"]

_WHERE = {"TrainConfig": "config", "ConfigError": "config", "TrainError": "launcher",
          "train": "api", "BenchOptions": "bench", "run_bench": "bench"}


def __getattr__(name: str) -> object:
    import importlib

    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
