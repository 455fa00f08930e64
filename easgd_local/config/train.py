"""TrainConfig: every concern's settings together, the checks that span several of them
(:meth:`TrainConfig.validate`, run once) and the values they resolve."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..settings import declarations, problem
from . import base
from .base import DEFAULT_BOX_BETA, DEFAULT_BOX_TAU, DEFAULT_MOMENTUM, ConfigError
from .concerns import (AlgorithmSettings, BoxSettings, CheckpointSettings, DataSettings,
                       EvaluationSettings, OutputSettings, StopSettings, SystemSettings)
from . import resources
from .faults import parse_fault

# Algorithms whose exchange happens inside the gradient's computation: --emulate-step refused.
NOT_EMULATED = ("ddp",)


# Bases in reverse: a dataclass lays out its fields from the last base to the first, so the
# flags read algorithm, stop, data, system, evaluation, checkpoint, boxes, output.
@dataclass
class TrainConfig(OutputSettings, BoxSettings, CheckpointSettings, EvaluationSettings,
                  SystemSettings, DataSettings, StopSettings, AlgorithmSettings):
    """Every setting of a run, each declared once in its concern's dataclass (concerns.py)."""

    DEFAULT_EPOCHS = base.DEFAULT_EPOCHS
    DEFAULT_BETA = base.DEFAULT_BETA

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
        from ..algorithms import ALGORITHMS

        return ALGORITHMS[self.algo]

    def validate(self, cuda_count: int | None = None) -> "TrainConfig":
        """Check every value and resolve defaults that depend on others. Returns self."""
        from ..algorithms import ALGORITHMS

        if self.algo not in ALGORITHMS:
            raise ConfigError(f"unknown --algo {self.algo!r}; choose one of {', '.join(ALGORITHMS)}")
        algorithm = ALGORITHMS[self.algo]
        self.check_declared()
        self._resolve_box_level()
        momentum_algos = [a.name for a in ALGORITHMS.values() if a.uses_momentum]
        if self.momentum is not None and not algorithm.uses_momentum:
            raise ConfigError(f"--momentum applies to {', '.join(momentum_algos)}, not {self.algo}")
        self.resolved_momentum = (
            (DEFAULT_MOMENTUM if self.momentum is None else self.momentum)
            if algorithm.uses_momentum else 0.0)
        if self.lr is None:
            self.lr = algorithm.default_lr(self.resolved_momentum)
        if self.tau is None:
            self.tau = algorithm.default_tau
        self._check_options_apply(algorithm)
        if self.multi_node and algorithm.box_center is None:
            boxed = [a.name for a in ALGORITHMS.values() if a.box_center is not None]
            raise ConfigError(f"--multi-node ties the boxes' centers; {self.algo} has none "
                              f"(use one of {', '.join(boxed)})")

        self._resolve_devices(resources.cuda_count() if cuda_count is None else cuda_count)
        self._check_faults()
        self._check_schedule()
        self._check_precision()
        self._check_emulation()
        self.resolved_options = {}
        algorithm.resolve_options(self)  # each option's type, range and default (its declaration)
        self._resolve_alpha(algorithm)
        algorithm.validate(self)  # what spans several values
        return self

    def check_declared(self) -> None:
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
        for item in filter(None, (self.faults or "").split(",")):
            try:
                rank, _, _ = parse_fault(item)
            except ValueError as e:
                raise ConfigError(f"--fault: {e}") from None
            if rank >= self.workers:
                raise ConfigError(f"--fault {item.strip()}: rank {rank} is beyond --workers "
                                  f"{self.workers} (ranks 0..{self.workers - 1})")

    def _check_schedule(self) -> None:
        """The schedule's budget, and --decay-* only with --schedule step (ranges are checked
        with every setting's). A budget of local steps exists unless --time-limit alone is
        given (control.steps_budget)."""
        given = [flag for flag, value in (("--decay-factor", self.decay_factor),
                                          ("--decay-at", self.decay_at)) if value is not None]
        if given and self.schedule != "step":
            raise ConfigError(f"{given[0]} applies to --schedule step, not {self.schedule}")
        if self.schedule != "constant" and self.steps is None and self.epochs is None \
                and self.time_limit is not None:
            raise ConfigError(f"--schedule {self.schedule} decays over the run's budget of local "
                              "steps; give --steps or --epochs (--time-limit alone sets none)")
        if self.decay_at is not None:
            try:
                at = [float(a) for a in self.decay_at]
            except (TypeError, ValueError):
                at = []
            if not at or not all(0 < a < 1 for a in at):  # NaN is refused too
                shown = (",".join(map(str, self.decay_at)) if isinstance(self.decay_at, list)
                         else repr(self.decay_at))
                raise ConfigError(f"--decay-at must be comma-separated fractions in (0, 1) (got "
                                  f"{shown})")
            self.decay_at = at

    def _check_precision(self) -> None:
        """--precision on each worker's device, once --devices is resolved: refused in one line
        where this torch cannot autocast to it there."""
        from ..precision import unsupported

        for device in dict.fromkeys(self.worker_devices):
            why = unsupported(self.precision, device)
            if why:
                raise ConfigError(f"--precision {self.precision}: {why}")

    def _check_emulation(self) -> None:
        """--emulate-step: refused with an algorithm whose exchange is inside the gradient's
        computation (ddp all-reduces in backward), which a sleep would leave out."""
        if self.emulate_step is not None and self.algo in NOT_EMULATED:
            raise ConfigError(f"--emulate-step cannot emulate {self.algo}: its exchange is the "
                              "all-reduce inside backward, which an emulated step leaves out")

    def _check_options_apply(self, algorithm: Any) -> None:
        """Every algorithm option given is one that --algo takes."""
        from ..algorithms import all_options

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
            resources.check_device(d, cuda_count)
        if self.workers is None:
            self.workers = len(devices) if devices != ["cpu"] else 2
        resources.check_memory(self.workers)
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
