"""Run configuration: one dataclass per concern (concerns.py), every field declared once
(settings.py), and :class:`TrainConfig`, all of them together with the checks that span several
(train.py). The command line's flags, the checks of type and range, which fields a resume may
change and which may differ between boxes, and the documentation's option tables all come from
those declarations; every check raises :class:`ConfigError` with one readable line.
"""

from __future__ import annotations

from typing import Any

from .base import (DEFAULT_BETA, DEFAULT_BOX_BETA, DEFAULT_BOX_TAU, DEFAULT_DECAY_AT,
                   DEFAULT_DECAY_FACTOR, DEFAULT_EPOCHS, DEFAULT_MOMENTUM, PRECISIONS, SCHEDULES,
                   ConfigError)
from .concerns import (AlgorithmSettings, BoxSettings, CheckpointSettings, DataSettings,
                       EvaluationSettings, OutputSettings, StopSettings, SystemSettings)
from .resources import (EVALUATOR_MODEL_COPIES, WORKER_MEMORY_BYTES, WORKER_MODEL_COPIES,
                        available_memory, check_model_memory, cpu_threads_per_worker)
from .train import DECLARED, TrainConfig

__all__ = [
    "AlgorithmSettings", "BoxSettings", "CheckpointSettings", "ConfigError", "DataSettings",
    "DECLARED", "DEFAULT_BETA", "DEFAULT_BOX_BETA", "DEFAULT_BOX_TAU", "DEFAULT_DECAY_AT",
    "DEFAULT_DECAY_FACTOR", "DEFAULT_EPOCHS", "DEFAULT_MOMENTUM", "EVALUATOR_MODEL_COPIES",
    "EvaluationSettings", "OutputSettings", "PRECISIONS", "SCHEDULES", "StopSettings",
    "SystemSettings", "TrainConfig", "WORKER_MEMORY_BYTES", "WORKER_MODEL_COPIES",
    "available_memory", "check_model_memory", "cpu_threads_per_worker",
]


def __getattr__(name: str) -> Any:
    # The registry is looked up only when asked for, so that importing the configuration stays
    # light (the command line's --help reads the configuration without the algorithms' code).
    if name in ("ALGORITHMS", "ALGOS"):
        from ..algorithms import ALGORITHMS

        return ALGORITHMS if name == "ALGORITHMS" else tuple(ALGORITHMS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
