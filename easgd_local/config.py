"""Run configuration: one dataclass, every field declared once (settings.py).

Each field carries its :class:`~.settings.Setting`: the command line's flags, the checks of type
and range, which fields a resume may change and which may differ between boxes, and the
README's table all come from those declarations. Every check of a value lives in
:meth:`TrainConfig.validate`, which raises :class:`ConfigError` with one readable line.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .settings import declarations, internal, problem, setting

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
    """Every setting of a run, each declared once (settings.py): its flag, help, default, range,
    concern, and whether a resume may change it and boxes may differ in it."""

    DEFAULT_EPOCHS = 8.0
    DEFAULT_BETA = 0.9

    # Algorithm
    algo: str = setting(
        "eamsgd", flag="--algo", concern="algorithm",
        help="The algorithm: {algorithms}.")
    lr: float | None = setting(
        None, flag="--lr", kind=float, bounds="> 0", concern="algorithm",
        default_text="the algorithm's",
        help="Learning rate eta; by default each algorithm's own, from the tuning sweeps: "
             "{lr_defaults}.")
    tau: int = setting(
        10, flag="--tau", kind=int, bounds=">= 1", concern="algorithm",
        help="Communication period: an exchange every tau local steps (for sgd, msgd and ddp: "
             "how often the model is published for evaluation).")
    beta: float | None = setting(
        None, flag="--beta", kind=float, bounds="(0, 1]", concern="algorithm",
        default_text=f"{DEFAULT_BETA:g}", help="Moving rate as beta = workers * alpha.")
    alpha: float | None = setting(
        None, flag="--alpha", kind=float, bounds="(0, 1]", concern="algorithm",
        help="Moving rate alpha given directly (not together with --beta).")
    momentum: float | None = setting(
        None, flag="--momentum", kind=float, bounds="[0, 1)", concern="algorithm",
        default_text=f"{DEFAULT_MOMENTUM:g}",
        help="Nesterov momentum delta of {momentum_algos}; an error with the others.",
        note="It acts in the workers' local steps; mdownpour's on the center.")
    weight_decay: float = setting(
        0.0, flag="--weight-decay", kind=float, bounds=">= 0", concern="algorithm",
        help="L2 penalty added to the gradient.", note="(The paper: 1e-4 on CIFAR.)")
    batch_size: int = setting(
        32, flag="--batch-size", kind=int, bounds=">= 1", concern="algorithm",
        help="Mini-batch size per worker.")
    seed: int = setting(
        0, flag="--seed", kind=int, bounds="[0, 2^32)", concern="algorithm",
        help="Seed of the initial weights (every worker starts from the same center); worker r "
             "orders its data with seed + r.")
    lock: bool = setting(
        True, flag="--lock/--no-lock", kind=bool, concern="system",
        help="Guard writes to shared state with locks; --no-lock runs Hogwild-style.")
    # Stop condition (the first one reached ends the run; none given -> the default epochs)
    steps: int | None = setting(
        None, flag="--steps", kind=int, bounds="> 0", concern="stop", resumable=True,
        help="Stop after this many local steps per worker.")
    epochs: float | None = setting(
        None, flag="--epochs", kind=float, bounds="> 0", concern="stop", resumable=True,
        default_text=f"{DEFAULT_EPOCHS:g} when no stop is given",
        help="Stop after this many passes over the training set by all workers together.",
        note="Each worker runs epochs * N / (workers * batch) steps.")
    time_limit: float | None = setting(
        None, flag="--time-limit", kind=float, bounds="> 0", concern="stop", resumable=True,
        help="Stop after this many seconds of training (start-up not counted).")
    target_accuracy: float | None = setting(
        None, flag="--target-accuracy", kind=float, bounds="(0, 1]", concern="stop",
        resumable=True, help="Stop once an evaluation of the center reaches this test accuracy.")
    # Data and model
    dataset: str = setting(
        "mnist10k", flag="--dataset", concern="data",
        help="Data set: mnist10k (ships with the package), mnist, fashion-mnist, cifar10, "
             "cifar100, imagefolder (read from --data-dir), or your own data factory module:attr.",
        note="The torchvision sets are held as tensors on each worker's device; imagefolder "
             "reads train/ and val/ class directories from disk; see \"Your own model and data\".")
    data_dir: Path = setting(
        Path("datasets"), flag="--data-dir", kind=Path, concern="data", resumable=True,
        per_box=True,
        help="Root of the torchvision data sets (imagefolder: the directory holding train/ and "
             "val/).")
    download: bool = setting(
        False, flag="--download", kind=bool, concern="data", resumable=True, per_box=True,
        help="Download the data set into --data-dir if missing.")
    model: str = setting(
        "cnn", flag="--model", concern="data",
        help="cnn (small, for 28x28 digits), cifar-paper (the paper's 7-layer net), resnet18, "
             "torchvision:NAME (any classification model of torchvision.models), or your own "
             "model factory module:attr.",
        note="torchvision:NAME, e.g. torchvision:mobilenet_v3_small: no weights downloaded, "
             "num_classes from the data, grayscale repeated to 3 channels.")
    image_size: int | None = setting(
        None, flag="--image-size", kind=int, bounds=">= 1", concern="data",
        default_text="the data's",
        help="Input side: for imagefolder the images' own size when they all share one (else "
             "224), resized; for the other sets a center crop.")
    loader_workers: int = setting(
        0, flag="--loader-workers", kind=int, bounds=">= 0", concern="data", per_box=True,
        help="DataLoader processes per worker, for data read from disk (imagefolder, your own "
             "Dataset).")
    loss: str | None = internal(
        None, concern="data",
        help="A loss \"module:attr\" (outputs, targets) -> loss; None: cross-entropy.")
    metric: str | None = internal(
        None, concern="data",
        help="A metric \"module:attr\" (outputs, targets) -> score in [0, 1]; None: accuracy.")
    # System
    workers: int | None = setting(
        None, flag="--workers", kind=int, bounds=">= 1", concern="system",
        default_text="one per device; 2 on a CPU-only machine",
        help="Worker processes; several may share a GPU.", note="sgd and msgd run one.")
    devices: list[str] | None = setting(
        None, flag="--devices", kind=list, concern="system", per_box=True,
        default_text="every visible GPU, else cpu",
        help="Comma-separated devices, e.g. cuda:0,cuda:1 or cpu; workers are dealt round-robin.")
    threads: int | None = setting(
        None, flag="--threads", kind=int, bounds=">= 1", concern="system", resumable=True,
        per_box=True, default_text="the cores split between the CPU workers",
        help="Intra-op threads per CPU worker.")
    max_restarts: int = setting(
        3, flag="--max-restarts", kind=int, bounds=">= 0", concern="system", resumable=True,
        per_box=True,
        help="Dead workers replaced (from the center) before the run gives up; a resumed run "
             "gets a fresh budget.")
    stall_timeout: float | None = setting(
        None, flag="--stall-timeout", kind=float, bounds="> 0", unit="seconds", concern="system",
        resumable=True, per_box=True,
        default_text="20 times the longest pause seen, at least 20 s",
        help="Seconds without a step after which a worker (stopped, hung, frozen holding a lock) "
             "is declared dead: killed and replaced.")
    faults: str | None = setting(
        None, flag="--fault", concern="system", per_box=True,
        help="Inject faults, for a demo: rank:step:kind[,...] with kind slow:F (that rank F "
             "times slower from that step), pause:S (stops S seconds), kill, exit, hang, nan; "
             "rank below --workers.")
    # Evaluation
    eval_every: float | None = setting(
        None, flag="--eval-every", kind=float, bounds="> 0", unit="seconds",
        concern="evaluation", resumable=True, per_box=True, default_text="from --eval-budget",
        help="Seconds between evaluations (with --eval-deferred: snapshots) of the center while "
             "training; by default spaced so that evaluation takes --eval-budget of the compute.")
    eval_budget: float = setting(
        0.1, flag="--eval-budget", kind=float, bounds="(0, 1]", concern="evaluation",
        resumable=True, per_box=True,
        help="Share of the run's compute (cores, or GPUs) that evaluation may take while "
             "training; one evaluation's cost is measured at the start.")
    eval_samples: int = setting(
        2000, flag="--eval-samples", kind=int, bounds=">= 0", concern="evaluation",
        resumable=True, per_box=True,
        help="Test samples per evaluation while training: a fixed, seeded subset (0: the whole "
             "test set); the final evaluation always uses the whole test set.")
    eval_deferred: bool = setting(
        False, flag="--eval-deferred", kind=bool, concern="evaluation", resumable=True,
        per_box=True,
        help="Only snapshot the center while training and evaluate the snapshots afterwards, so "
             "that evaluation takes no cores from the workers (--target-accuracy then cannot "
             "end the run early).",
        note="The snapshots' times are exact; they are evaluated on the whole test set.")
    # small enough that stopping never waits long for an evaluation
    eval_batch_size: int = internal(250, kind=int, bounds=">= 1", concern="evaluation")
    # Checkpoints
    checkpoint_every: float | None = setting(
        60.0, flag="--checkpoint-every", kind=float, bounds="> 0", unit="seconds",
        concern="checkpoint", resumable=True, per_box=True,
        help="Seconds between checkpoints; one is also written at the end, on Ctrl-C or SIGTERM, "
             "and when the run fails.")
    # Several boxes (multinode.py)
    multi_node: bool = setting(
        False, flag="--multi-node", kind=bool, concern="boxes", per_box=True,
        help="One box of several, started by torchrun (see the README's \"Several machines\"): "
             "the boxes' centers are tied elastically to a root every --box-tau exchanges.")
    box_tau: int | None = setting(
        None, flag="--box-tau", kind=int, bounds=">= 1", concern="boxes",
        default_text=str(DEFAULT_BOX_TAU),
        help="With --multi-node: exchanges of a box's center between two rounds between boxes.")
    box_beta: float | None = setting(
        None, flag="--box-beta", kind=float, bounds="(0, 1]", concern="boxes",
        default_text=f"{DEFAULT_BOX_BETA:g}",
        help="With --multi-node: the root's moving rate beta_root = boxes * alpha_root.")
    root_timeout: float = setting(
        60.0, flag="--root-timeout", kind=float, bounds="> 0", unit="seconds", concern="boxes",
        per_box=True,
        help="With --multi-node: seconds a round between boxes waits for the others before the "
             "run ends with an error.")
    # global rank of this box's worker 0 (set for --multi-node)
    rank_offset: int = internal(0, kind=int, concern="boxes", per_box=True)
    # Output
    out: Path | None = setting(
        None, flag="--out", kind=Path, concern="output", per_box=True,
        default_text="runs/<timestamp>-<algo>-p<workers>",
        help="Output directory (refused if it already holds a run, or anything a run does not "
             "write).")
    quiet: bool = setting(
        False, flag="--quiet", aliases=("-q",), kind=bool, concern="output", resumable=True,
        per_box=True, help="No progress bar and no summary table.")
    # Options of one algorithm (algorithms/*.py declare them): name -> value, None = default
    options: dict[str, Any] = field(default_factory=dict)

    # Filled by validate(): the resolved values the run actually uses.
    resolved_alpha: float = field(default=0.0, init=False)
    resolved_momentum: float = field(default=0.0, init=False)
    resolved_options: dict[str, Any] = field(default_factory=dict, init=False)
    worker_devices: list[str] = field(default_factory=list, init=False)

    @property
    def algorithm(self) -> Any:
        """The registry's object for --algo (see algorithms/base.py)."""
        from .algorithms import ALGORITHMS

        return ALGORITHMS[self.algo]

    def validate(self, cuda_count: int | None = None) -> "TrainConfig":
        """Check every value and resolve defaults that depend on others. Returns self."""
        from .algorithms import ALGORITHMS

        if self.algo not in ALGORITHMS:
            raise ConfigError(f"unknown --algo {self.algo!r}; choose one of {', '.join(ALGORITHMS)}")
        algorithm = ALGORITHMS[self.algo]
        self._check_declared()
        self._resolve_box_level()
        momentum_algos = [a.name for a in ALGORITHMS.values() if a.uses_momentum]
        if self.momentum is not None and not algorithm.uses_momentum:
            raise ConfigError(f"--momentum applies to {', '.join(momentum_algos)}, not {self.algo}")
        self.resolved_momentum = (
            (DEFAULT_MOMENTUM if self.momentum is None else self.momentum)
            if algorithm.uses_momentum else 0.0)
        if self.lr is None:
            self.lr = algorithm.default_lr(self.resolved_momentum)
        self._check_options_apply(algorithm)
        if self.multi_node and algorithm.box_center is None:
            boxed = [a.name for a in ALGORITHMS.values() if a.box_center is not None]
            raise ConfigError(f"--multi-node ties the boxes' centers; {self.algo} has none "
                              f"(use one of {', '.join(boxed)})")

        self._resolve_devices(_cuda_count() if cuda_count is None else cuda_count)
        self._check_faults()
        self.resolved_options = {}
        algorithm.resolve_options(self)  # each option's type, range and default (its declaration)
        self._resolve_alpha(algorithm)
        algorithm.validate(self)  # what spans several values
        return self

    def _check_declared(self) -> None:
        """Every declared setting against its declaration: the kind of a number (a float also
        for NaN and inf, which no range catches: a NaN time limit never ends a run), choices and
        range (settings.problem)."""
        for name, declaration in DECLARED.items():
            message = problem(declaration, getattr(self, name), declaration.label or name)
            if message:
                raise ConfigError(message)

    def _check_faults(self) -> None:
        """Every --fault well formed and aimed at a worker of this run (once --workers is
        resolved): a fault that could never fire is refused, not ignored."""
        from .worker import parse_fault

        for item in filter(None, (self.faults or "").split(",")):
            try:
                rank, _, _ = parse_fault(item)
            except ValueError as e:
                raise ConfigError(f"--fault: {e}") from None
            if rank >= self.workers:
                raise ConfigError(f"--fault {item.strip()}: rank {rank} is beyond --workers "
                                  f"{self.workers} (ranks 0..{self.workers - 1})")

    def _check_options_apply(self, algorithm: Any) -> None:
        """Every algorithm option given is one that --algo takes."""
        from .algorithms import all_options

        declared = all_options()
        for name, value in self.options.items():
            if value is None:
                continue
            if name not in declared:
                raise ConfigError(f"unknown algorithm option {name!r}")
            option, users = declared[name]
            if option not in algorithm.options:
                raise ConfigError(f"{option.flag} applies to {', '.join(users)}, not {self.algo}")

    def _resolve_box_level(self) -> None:
        """--box-tau and --box-beta: their defaults set under --multi-node only (their ranges are
        checked with every setting's)."""
        given = [flag for flag, value in (("--box-tau", self.box_tau),
                                          ("--box-beta", self.box_beta)) if value is not None]
        if not self.multi_node:
            if given:
                raise ConfigError(f"{given[0]} applies to the rounds between boxes; give it with "
                                  "--multi-node")
            return
        self.box_tau = DEFAULT_BOX_TAU if self.box_tau is None else self.box_tau
        self.box_beta = DEFAULT_BOX_BETA if self.box_beta is None else self.box_beta

    def _resolve_devices(self, cuda_count: int) -> None:
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


DECLARED = declarations(TrainConfig)  # field name -> Setting, in field order


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
    available = _available_memory()
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
