"""Run configuration: one dataclass, every field with a default and a one-line doc.

The CLI only maps flags onto :class:`TrainConfig`; every check of a value lives in
:meth:`TrainConfig.validate`, which raises :class:`ConfigError` with one readable line.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MOMENTUM = 0.9  # used by the momentum algorithms when --momentum is not given
DEFAULT_BOX_TAU = 4  # --multi-node: exchanges of a box's center between two rounds between boxes
DEFAULT_BOX_BETA = 0.9  # --multi-node: the root's moving rate, beta_root = boxes * alpha_root


def __getattr__(name: str) -> Any:
    # The registry imports torch and every algorithm module: looked up only when asked for, so
    # that importing the configuration stays light.
    if name == "ALGORITHMS":
        from .algorithms import ALGORITHMS

        return ALGORITHMS
    if name == "ALGOS":
        from .algorithms import ALGORITHMS

        return tuple(ALGORITHMS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ConfigError(ValueError):
    """An invalid setting; ``str(error)`` is one line meant for the user."""


@dataclass
class TrainConfig:
    # Algorithm
    algo: str = "eamsgd"  # a name of the registry (algorithms/__init__.py); the sweep's winner
    lr: float | None = None  # learning rate eta; None: the algorithm's (algorithms/*.py)
    tau: int = 10  # communication period: an elastic exchange every tau local steps
    beta: float | None = None  # moving rate parameterised as beta = workers * alpha (paper: 0.9)
    alpha: float | None = None  # moving rate given directly (exclusive with beta)
    momentum: float | None = None  # Nesterov momentum delta (eamsgd, msgd); default 0.9 there
    weight_decay: float = 0.0  # L2 penalty added to the gradient
    batch_size: int = 32  # per-worker mini-batch (32 is the fastest per sample on CPU cores)
    seed: int = 0  # initial weights; worker r draws its data order from seed + r
    lock: bool = True  # guard the center update with a lock (False: Hogwild-style)
    # Stop condition (the first one reached ends the run; none given -> the default epochs)
    steps: int | None = None  # local steps per worker
    epochs: float | None = None  # passes over the training set by all workers together
    time_limit: float | None = None  # seconds of training (start-up excluded)
    target_accuracy: float | None = None  # stop once an evaluation of the center reaches it
    # Data and model
    dataset: str = "mnist10k"  # a built-in name, or a user's data factory "module:attr"
    data_dir: Path = Path("datasets")
    download: bool = False
    model: str = "cnn"  # a built-in name, "torchvision:NAME", or a user's factory "module:attr"
    image_size: int | None = None  # input side for imagefolder and torchvision sets (None: theirs)
    loader_workers: int = 0  # DataLoader processes per worker, for data read from disk
    loss: str | None = None  # "module:attr" (outputs, targets) -> loss; None: cross-entropy
    metric: str | None = None  # "module:attr" (outputs, targets) -> score in [0, 1]; None: accuracy
    # System
    workers: int | None = None  # None: one per device (2 on a CPU-only machine)
    devices: list[str] | None = None  # e.g. ["cuda:0", "cuda:1"] or ["cpu"]; None: all GPUs, else cpu
    threads: int | None = None  # intra-op threads per CPU worker; None: the cores split between them
    eval_every: float | None = None  # seconds between evaluations; None: from the budget
    eval_budget: float = 0.1  # share of the run's compute that evaluation may take
    eval_samples: int = 2000  # test samples of each evaluation while training (0: all)
    eval_deferred: bool = False  # only snapshot while training; evaluate the snapshots after it
    eval_batch_size: int = 250  # small enough that stopping never waits long for an evaluation
    checkpoint_every: float | None = 60.0  # seconds between checkpoints (and one at the end)
    max_restarts: int = 3  # dead workers replaced before the run gives up
    faults: str | None = None  # injected faults "rank:step:kind[,...]" (worker.py), for demos
    multi_node: bool = False  # one box of several, started by torchrun (multinode.py)
    root_timeout: float = 60.0  # seconds a round between boxes may wait for the others
    box_tau: int | None = None  # exchanges of a box's center between two rounds between boxes
    box_beta: float | None = None  # the root's moving rate over the boxes, in (0, 1]
    # (both --multi-node only; None: DEFAULT_BOX_TAU, DEFAULT_BOX_BETA, set by validate())
    rank_offset: int = 0  # global rank of this box's worker 0 (set for --multi-node)
    stall_timeout: float | None = None  # seconds without a step before a worker is declared
    # dead; None: a generous multiple of the longest pause seen, at least STALL_FLOOR
    # Output
    out: Path | None = None  # None: runs/<timestamp>-<algo>-p<workers>
    quiet: bool = False
    # Options of one algorithm (algorithms/*.py declare them): name -> value, None = default
    options: dict[str, Any] = field(default_factory=dict)

    # Filled by validate(): the resolved values the run actually uses.
    resolved_alpha: float = field(default=0.0, init=False)
    resolved_momentum: float = field(default=0.0, init=False)
    resolved_options: dict[str, Any] = field(default_factory=dict, init=False)
    worker_devices: list[str] = field(default_factory=list, init=False)

    DEFAULT_EPOCHS = 8.0
    DEFAULT_BETA = 0.9

    @property
    def algorithm(self) -> Any:
        """The registry's object for --algo (see algorithms/base.py)."""
        from .algorithms import ALGORITHMS

        return ALGORITHMS[self.algo]

    def validate(self, cuda_count: int | None = None) -> "TrainConfig":
        """Check every value and resolve defaults that depend on others. Returns self."""
        from .algorithms import ALGORITHMS, all_options

        if self.algo not in ALGORITHMS:
            raise ConfigError(f"unknown --algo {self.algo!r}; choose one of {', '.join(ALGORITHMS)}")
        algorithm = ALGORITHMS[self.algo]
        # Every number is checked for its type and range; every float also for NaN and inf,
        # which no comparison below would catch (a NaN time limit never ends a run).
        for flag, value, kind in (
                ("--lr", self.lr, float), ("--tau", self.tau, int), ("--beta", self.beta, float),
                ("--alpha", self.alpha, float), ("--momentum", self.momentum, float),
                ("--weight-decay", self.weight_decay, float), ("--batch-size", self.batch_size, int),
                ("--seed", self.seed, int), ("--steps", self.steps, int),
                ("--epochs", self.epochs, float), ("--time-limit", self.time_limit, float),
                ("--target-accuracy", self.target_accuracy, float),
                ("--workers", self.workers, int), ("--threads", self.threads, int),
                ("--eval-every", self.eval_every, float), ("--eval-budget", self.eval_budget, float),
                ("--eval-samples", self.eval_samples, int),
                ("--checkpoint-every", self.checkpoint_every, float),
                ("--stall-timeout", self.stall_timeout, float),
                ("--root-timeout", self.root_timeout, float),
                ("--box-tau", self.box_tau, int), ("--box-beta", self.box_beta, float),
                ("--max-restarts", self.max_restarts, int),
                ("--image-size", self.image_size, int),
                ("--loader-workers", self.loader_workers, int)):
            _check_number(flag, value, kind)
        if self.lr is not None:
            _positive("--lr", self.lr)
        if self.faults:
            from .worker import parse_fault

            for item in filter(None, self.faults.split(",")):
                try:
                    rank, _, _ = parse_fault(item)
                except ValueError as e:
                    raise ConfigError(f"--fault: {e}") from None
        if self.tau < 1:
            raise ConfigError(f"--tau must be >= 1 (got {self.tau})")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"--image-size must be >= 1 (got {self.image_size})")
        if self.loader_workers < 0:
            raise ConfigError(f"--loader-workers must be >= 0 (got {self.loader_workers})")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in [0, 2^32) (got {self.seed})")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if self.checkpoint_every is not None and not self.checkpoint_every > 0:
            raise ConfigError(f"--checkpoint-every must be > 0 seconds (got {self.checkpoint_every})")
        if not self.root_timeout > 0:
            raise ConfigError(f"--root-timeout must be > 0 seconds (got {self.root_timeout})")
        self._resolve_box_level()
        if self.stall_timeout is not None and not self.stall_timeout > 0:
            raise ConfigError(f"--stall-timeout must be > 0 seconds (got {self.stall_timeout})")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0 (got {self.max_restarts})")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1 (got {self.threads})")
        if self.eval_every is not None and not self.eval_every > 0:
            raise ConfigError(f"--eval-every must be > 0 seconds (got {self.eval_every})")
        if not 0 < self.eval_budget <= 1:
            raise ConfigError(f"--eval-budget must be in (0, 1] (got {self.eval_budget})")
        if self.eval_samples < 0:
            raise ConfigError(f"--eval-samples must be >= 0 (got {self.eval_samples})")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be >= 1 (got {self.eval_batch_size})")
        for flag, value in (("--steps", self.steps), ("--epochs", self.epochs),
                            ("--time-limit", self.time_limit)):
            if value is not None and value <= 0:
                raise ConfigError(f"{flag} must be > 0 (got {value})")

        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ConfigError(f"--target-accuracy must be in (0, 1] (got {self.target_accuracy})")
        momentum_algos = [a.name for a in ALGORITHMS.values() if a.uses_momentum]
        if self.momentum is not None:
            if not algorithm.uses_momentum:
                raise ConfigError(f"--momentum applies to {', '.join(momentum_algos)}, not {self.algo}")
            if not 0 <= self.momentum < 1:
                raise ConfigError(f"--momentum must be in [0, 1) (got {self.momentum})")
        self.resolved_momentum = (
            (DEFAULT_MOMENTUM if self.momentum is None else self.momentum)
            if algorithm.uses_momentum else 0.0)
        if self.lr is None:
            self.lr = algorithm.default_lr(self.resolved_momentum)
        declared = all_options()
        for name, value in self.options.items():
            if value is None:
                continue
            if name not in declared:
                raise ConfigError(f"unknown algorithm option {name!r}")
            option, users = declared[name]
            if option not in algorithm.options:
                raise ConfigError(f"{option.flag} applies to {', '.join(users)}, not {self.algo}")
        if self.multi_node and algorithm.box_center is None:
            boxed = [a.name for a in ALGORITHMS.values() if a.box_center is not None]
            raise ConfigError(f"--multi-node ties the boxes' centers; {self.algo} has none "
                              f"(use one of {', '.join(boxed)})")

        self._resolve_devices(_cuda_count() if cuda_count is None else cuda_count)
        self._resolve_alpha(algorithm)
        self.resolved_options = {}
        algorithm.validate(self)
        return self

    def _resolve_box_level(self) -> None:
        """--box-tau and --box-beta: checked, and their defaults set, under --multi-node only."""
        given = [flag for flag, value in (("--box-tau", self.box_tau),
                                          ("--box-beta", self.box_beta)) if value is not None]
        if not self.multi_node:
            if given:
                raise ConfigError(f"{given[0]} applies to the rounds between boxes; give it with "
                                  "--multi-node")
            return
        self.box_tau = DEFAULT_BOX_TAU if self.box_tau is None else self.box_tau
        self.box_beta = DEFAULT_BOX_BETA if self.box_beta is None else self.box_beta
        if self.box_tau < 1:
            raise ConfigError(f"--box-tau must be >= 1 (got {self.box_tau})")
        if not 0 < self.box_beta <= 1:
            raise ConfigError(f"--box-beta must be in (0, 1] (got {self.box_beta})")

    def _resolve_devices(self, cuda_count: int) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be >= 1 (got {self.workers})")
        if self.algorithm.single_worker:
            if self.workers not in (None, 1):
                raise ConfigError(f"--algo {self.algo} runs one worker (got --workers {self.workers})")
            self.workers = 1
        devices = self.devices
        if devices is not None and (not isinstance(devices, list)
                                    or not all(isinstance(d, str) for d in devices)):
            raise ConfigError(f"--devices must be a list of device names (got {devices!r})")
        if not devices:
            devices = [f"cuda:{i}" for i in range(cuda_count)] or ["cpu"]
            if self.devices is None and self.workers is not None:
                devices = devices[: self.workers]
        for d in devices:
            _check_device(d, cuda_count)
        if self.workers is None:
            self.workers = len(devices) if devices != ["cpu"] else 2
        _check_memory(self.workers)
        self.devices = devices
        # Workers are dealt round-robin over the devices; several may share one GPU.
        self.worker_devices = [devices[r % len(devices)] for r in range(self.workers)]

    def _resolve_alpha(self, algorithm: Any) -> None:
        if self.alpha is not None and self.beta is not None:
            raise ConfigError("give --alpha or --beta, not both")
        if self.alpha is not None and not 0 < self.alpha <= 1:
            raise ConfigError(f"--alpha must be in (0, 1] (got {self.alpha})")
        if self.beta is not None and not 0 < self.beta <= 1:
            raise ConfigError(f"--beta must be in (0, 1] (got {self.beta})")
        self.resolved_alpha = (algorithm.resolve_alpha(self, self.alpha, self.beta)
                               if algorithm.elastic else 0.0)

    def stop_rule(self) -> str:
        """A one-line description of when the run ends."""
        parts = []
        if self.steps is not None:
            parts.append(f"{self.steps} steps/worker")
        if self.epochs is not None:
            parts.append(f"{self.epochs:g} epochs")
        if self.time_limit is not None:
            parts.append(f"{self.time_limit:g} s")
        if self.target_accuracy is not None:
            parts.append(f"center accuracy {self.target_accuracy:g}")
        return " or ".join(parts) or f"{self.DEFAULT_EPOCHS:g} epochs"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["options"] = dict(kwargs.get("options") or {})
        for k in ("data_dir", "out"):
            if kwargs.get(k) is not None:
                kwargs[k] = Path(kwargs[k])
        return cls(**kwargs)


def _positive(flag: str, value: float) -> None:
    if not value > 0:  # also rejects NaN
        raise ConfigError(f"{flag} must be > 0 (got {value})")


def _check_number(flag: str, value: Any, kind: type) -> None:
    """None (not given), or a number of the right kind; a float must be finite."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ConfigError(f"{flag} must be {'a number' if kind is float else 'an integer'} (got {value!r})")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number (got {value})")


# What one spawned worker holds at the least: the interpreter with torch (the CUDA build is
# ~800 MB resident), its copy of the model and its staging buffers.
WORKER_MEMORY_BYTES = 900 * 2**20


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _check_memory(workers: int) -> None:
    """Refuse more workers than this machine can hold, before spawning any."""
    available = _available_memory()
    if available is not None and workers * WORKER_MEMORY_BYTES > available:
        per = WORKER_MEMORY_BYTES / 2**30
        raise ConfigError(f"--workers {workers} needs about {workers * per:,.0f} GB ({per:.1f} GB "
                          f"per worker process) and this machine has {available / 2**30:.1f} GB "
                          "available")


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_device(device: str, cuda_count: int) -> None:
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
