"""What this machine can hold and run: memory for the workers and the model's copies, the
devices asked for, the threads of a CPU worker."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .base import ConfigError

if TYPE_CHECKING:
    from .train import TrainConfig

# What one spawned worker holds at the least: the interpreter with torch (the CUDA build is
# ~800 MB resident), its copy of the model and its staging buffers.
WORKER_MEMORY_BYTES = 900 * 2**20


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def check_memory(workers: int) -> None:
    """Refuse more workers than this machine can hold, before spawning any."""
    available = available_memory()
    if available is not None and workers * WORKER_MEMORY_BYTES > available:
        per = WORKER_MEMORY_BYTES / 2**30
        raise ConfigError(f"--workers {workers} needs about {workers * per:,.0f} GB ({per:.1f} GB "
                          f"per worker process) and this machine has {available / 2**30:.1f} GB "
                          "available")


# Copies of the model's flat float32 state each process holds: a worker its parameters, their
# gradients, momentum and an exchange buffer; the main process's evaluator its model, its
# gradients and a snapshot. The shared state's copies (a center, a slot per worker...) are the
# algorithm's, counted by the caller.
WORKER_MODEL_COPIES = 4
EVALUATOR_MODEL_COPIES = 3


def check_model_memory(config: "TrainConfig", values: int, shared_copies: float) -> None:
    """Refuse, in one line before anything starts, a model whose copies cannot all fit in this
    machine's memory: each CPU worker's, the evaluator's and the shared state's (``values``:
    the model's flat state; a worker on a GPU keeps its copies there)."""
    available = available_memory()
    if available is None:
        return
    model = values * 4
    cpu_workers = sum(1 for d in config.worker_devices if d == "cpu")
    copies = cpu_workers * WORKER_MODEL_COPIES + EVALUATOR_MODEL_COPIES + shared_copies
    need = config.workers * WORKER_MEMORY_BYTES + model * copies
    if need > available:
        gb = 2**30
        raise ConfigError(f"--model {config.model} has {values:,} values ({model / gb:,.1f} GB); "
                          f"held by {config.workers} worker(s), the evaluator and the shared "
                          f"state ({copies:.0f} copies) it needs about {need / gb:,.0f} GB and "
                          f"this machine has {available / gb:.1f} GB available")


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(device: str, cuda_count: int) -> None:
    if device == "cpu":
        return
    if device.startswith("cuda"):
        if cuda_count == 0:
            raise ConfigError(f"device {device} requested but CUDA is not available on this machine")
        index = device.partition(":")[2] or "0"
        if not index.isdigit() or int(index) >= cuda_count:
            raise ConfigError(f"device {device} does not exist (this machine has {cuda_count} GPU(s))")
        return
    raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N")


def cpu_threads_per_worker(config: TrainConfig) -> int:
    """--threads, or the machine's cores split between the CPU workers (at least one each)."""
    if config.threads is not None:
        return config.threads
    n_cpu = sum(1 for d in config.worker_devices if d == "cpu")
    return max(1, (os.cpu_count() or 1) // max(1, n_cpu))
