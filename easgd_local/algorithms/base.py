"""What an algorithm is: one object that owns everything that differs between algorithms.

- **Its shared state** (:meth:`Algorithm.shared_state`): named flat tensors in shared memory,
  each with its lock (shared.py): a center, group centers, a slot per worker, master momentum.
- **Its worker side** (:meth:`Algorithm.communicator`): what a worker does around each local
  step. The worker's loop is the same for every algorithm (worker.py)::

      gradient at y  ->  comm.before_step(step)  ->  local step  ->  comm.after_step(step)

  and the communicator's period (its tau) decides at which steps these call its hooks
  (:class:`Communicator`), so that no algorithm tests the step itself.

- **The model it reports** (:meth:`Algorithm.reported`), which the main process evaluates
  and saves.
- **Its part of a checkpoint** (:meth:`Algorithm.state_dict`, :meth:`load_state_dict`).
- **Its options and their validation** (:attr:`Algorithm.options`, :meth:`validate`).

The worker loop, the launcher and the bench only ever talk to these; adding an algorithm is a
module with its class and a line in the registry (algorithms/__init__.py).

An algorithm's declarations (its name, summary, options and what they resolve to) are read by
``--help`` and by the checks of a configuration, which need no PyTorch; so no algorithm module
imports PyTorch, or a module that does, when it is imported: it names them with
:func:`deferred`, and they load when a run first uses them.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import ConfigError
from ..settings import Setting, problem

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from ..config import TrainConfig
    from ..control import WorkerChannels
    from ..shared import SharedState


class _Deferred:
    """A module imported when one of its attributes is first read."""

    def __init__(self, name: str, package: str | None) -> None:
        self._name, self._package = name, package
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # copy, pickle and inspect probe these: not a use
            raise AttributeError(attr)
        if self._module is None:
            self._module = importlib.import_module(self._name, self._package)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<deferred module {self._name!r}>"


def deferred(*names: str, package: str | None = None) -> tuple[Any, ...]:
    """Stand-ins for the modules ``names`` (relative ones to ``package``), each imported when
    an attribute of it is first read: ``torch, center = deferred("torch", "..center",
    package=__package__)``, then ``torch.zeros(...)``, ``center.SharedCenter(...)``."""
    return tuple(_Deferred(name, package) for name in names)


@dataclass(frozen=True)
class Option:
    """An option of one or more algorithms: ``--name-with-dashes`` on the command line, and
    ``TrainConfig.options[name]``. Its declaration is whole here: the flag, its help and range
    and the default (``Algorithm.resolve_options`` checks and fills it in); an algorithm's own
    ``validate`` keeps only what spans several values."""

    name: str
    type: type  # int, float or str
    help: str  # one sentence
    choices: tuple[str, ...] = ()
    # The value when not given, or a function of the (validated) TrainConfig giving it, for a
    # default that depends on other settings; default_text then says it in words.
    default: Any = None
    default_text: str = ""
    bounds: str = ""  # the range, as settings.Setting.bounds: "> 0", ">= 1", "(0, 1]"

    def __post_init__(self) -> None:
        if callable(self.default) and not self.default_text:
            raise TypeError(f"option {self.name}: a computed default needs its default_text")
        _ = self.setting  # a malformed range fails at import

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def setting(self) -> Setting:
        """The option as a declared setting (for its checks, its --help and the README)."""
        return Setting(self.flag, help=self.help, kind=self.type, bounds=self.bounds,
                       choices=self.choices, concern="algorithm", default_text=self.default_text,
                       default=None if callable(self.default) else self.default)

    def value(self, config: "TrainConfig") -> Any:
        """The value given, else the default."""
        given = config.options.get(self.name)
        if given is not None:
            return given
        return self.default(config) if callable(self.default) else self.default


@dataclass
class WorkerContext:
    """What a communicator is built from, in the worker process."""

    rank: int
    config: "TrainConfig"
    channels: "WorkerChannels"
    device: "torch.device"
    n_params: int  # the first n_params entries of a flat state are parameters, then buffers
    parent_pid: int

    @property
    def shared(self) -> "SharedState":
        return self.channels.shared

    def barrier(self) -> Any:
        """This worker's side of the synchronous algorithms' barrier (barrier.Party); its waits
        end when the main process is gone."""
        import functools

        from ..control import check_parent

        return self.channels.barrier.party(self.rank, functools.partial(check_parent, self.parent_pid))


class Communicator:
    """A worker's side of an algorithm. The base does no communication.

    The communication period is the template's: the worker calls ``before_step`` and
    ``after_step`` at every step, and they call the algorithm's hooks only on its schedule,
    every ``period`` steps (1: every step; 0 or None: never):

    - :meth:`exchange` before the local step of every step t with t % period == 0 (steps 0,
      tau, 2 tau, ...: the exchange of EASGD's Algorithm 1);
    - :meth:`exchange_after` after the local step of every step t with (t + 1) % period == 0,
      once each period of local steps is complete (DOWNPOUR's push).

    An algorithm whose schedule is not a fixed period overrides ``before_step`` or
    ``after_step`` itself, and says so. Asynchronous algorithms leave stopping to each worker
    (it reads the STOP flag); synchronous ones decide together at a barrier (``exchange``
    returns False).
    """

    seconds = 0.0  # time spent communicating
    period: int | None = None  # steps between two of the hooks' calls (tau)

    def due(self, step: int) -> bool:
        """Whether the period comes round at ``step`` (step % period == 0; never without one)."""
        return bool(self.period) and step % self.period == 0

    def start(self, y: "Tensor") -> None:
        """Set y to the point the worker starts from (a fresh start, or a restart)."""

    def wrap(self, model: "nn.Module") -> "nn.Module":
        """The module the worker calls forward on (DDP wraps it)."""
        return model

    def before_step(self, step: int, y: "Tensor", v: "Tensor | None") -> bool:
        """After the gradient, before the local step: :meth:`exchange` when the period comes
        round. False: the workers agreed to stop."""
        if self.due(step):
            return self.exchange(step, y, v)
        return True

    def after_step(self, step: int, y: "Tensor", v: "Tensor | None", loss: "Tensor") -> None:
        """After the local step; ``loss`` is this step's mini-batch loss (a 0-d tensor):
        :meth:`exchange_after` when a period of local steps is complete."""
        if self.due(step + 1):
            self.exchange_after(step, y, v)

    def exchange(self, step: int, y: "Tensor", v: "Tensor | None") -> bool:
        """The hook before the local step, every ``period`` steps. False: the workers agreed
        to stop (synchronous algorithms); True: go on."""
        return True

    def exchange_after(self, step: int, y: "Tensor", v: "Tensor | None") -> None:
        """The hook after the local step, once every ``period`` local steps."""

    def finish(self, y: "Tensor", v: "Tensor | None") -> None:
        """Training is over for this worker: hand over what is pending."""

    def reset(self, y: "Tensor") -> None:
        """The worker diverged: nothing of it reached shared state; start again (``start``)."""
        self.start(y)

    def close(self) -> None:
        """Release device resources (page-locked memory, process groups)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], y: "Tensor") -> None:
        pass

    @property
    def exchanges(self) -> int:
        return 0

    @property
    def bytes(self) -> int:
        return 0

    def timed(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one communication, adding its duration to ``seconds``."""
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


class LinkCommunicator(Communicator):
    """A communicator over one link to shared state (``self.link``, a ``center.CenterLink``):
    its release and its counts are the link's."""

    link: Any

    def close(self) -> None:
        self.link.close()

    @property
    def exchanges(self) -> int:
        return self.link.exchanges

    @property
    def bytes(self) -> int:
        return self.link.bytes


class Algorithm:
    """One algorithm of the registry. Subclasses set the class attributes and override what
    differs; an instance holds nothing of a run (the shared state is passed in)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    family: ClassVar[str] = ""  # for the help: which paper or family it comes from
    single_worker: ClassVar[bool] = False  # one worker, no shared state besides its model
    synchronous: ClassVar[bool] = False  # workers in lock-step: a dead one ends the run
    local_momentum: ClassVar[bool] = False  # Nesterov momentum in the workers' local steps
    master_momentum: ClassVar[bool] = False  # Nesterov momentum applied on shared state
    elastic: ClassVar[bool] = False  # uses the moving rate --alpha / --beta
    has_tau: ClassVar[bool] = True  # has a communication period (bench sweeps --taus)
    default_beta: ClassVar[float] = 0.9
    # The default step: the learning rate, or for the momentum algorithms the effective step
    # lr / (1 - momentum) (their lr is this times 1 - momentum). From the tuning sweep in the
    # README (mnist10k, cnn, batch 32).
    default_step: ClassVar[float] = 0.1
    # The default communication period --tau: the paper's 10 unless a sweep found better
    # (docs/bench.md); for the algorithms without one, how often the model is published.
    default_tau: ClassVar[int] = 10
    options: ClassVar[tuple[Option, ...]] = ()
    reports: ClassVar[str] = "the center"  # the model it reports, in words
    # The shared entry that --multi-node ties between boxes (its reported model's home); None:
    # the algorithm has no single center to tie.
    box_center: ClassVar[str | None] = None

    def default_lr(self, momentum: float) -> float:
        return self.default_step * (1.0 - momentum) if self.uses_momentum else self.default_step

    @property
    def uses_momentum(self) -> bool:
        """Whether --momentum applies (the bench scales such runs' lr by 1 - momentum)."""
        return self.local_momentum or self.master_momentum

    # -- configuration (main process) ------------------------------------------------------

    def resolve_alpha(self, config: "TrainConfig", alpha: float | None, beta: float | None) -> float:
        """The moving rate: --alpha, else --beta / workers (beta = p * alpha)."""
        if alpha is not None:
            return alpha
        return (self.default_beta if beta is None else beta) / config.workers

    def resolve_options(self, config: "TrainConfig") -> None:
        """Every option of this algorithm, as given or its default, checked against its
        declaration (type, choices, range) into ``config.resolved_options``; ConfigError with
        one line. Runs once the workers and devices are resolved, before ``resolve_alpha``."""
        for option in self.options:
            value = option.value(config)
            message = problem(option.setting, value)
            if message:
                raise ConfigError(message)
            config.resolved_options[option.name] = value

    def validate(self, config: "TrainConfig") -> None:
        """What spans several values of ``config.resolved_options`` (filled by
        ``resolve_options``) and of the rest of ``config``, and what is derived from them (into
        ``config.resolved_options``); raise ConfigError with one line."""

    def notes(self, config: "TrainConfig") -> list[str]:
        """Warnings for the user about a valid but questionable setting."""
        return []

    # -- shared state (main process) -------------------------------------------------------

    def shared_state(self, config: "TrainConfig", init: "Tensor", n_params: int) -> "SharedState":
        raise NotImplementedError

    def reported(self, shared: "SharedState", config: "TrainConfig") -> "Tensor":
        """A copy of the model this algorithm reports, from its shared state."""
        raise NotImplementedError

    def also_reported(self, shared: "SharedState", config: "TrainConfig") -> dict[str, "Tensor"]:
        """Other models evaluated beside the reported one (name -> flat state): each record
        gets ``<name>_test_accuracy``. None by default."""
        return {}

    def state_dict(self, shared: "SharedState") -> dict[str, "Tensor"]:
        return shared.state_dict()

    def load_state_dict(self, shared: "SharedState", state: dict[str, "Tensor"]) -> None:
        shared.load_state_dict(state)

    # -- worker side -----------------------------------------------------------------------

    def communicator(self, ctx: WorkerContext) -> Communicator:
        raise NotImplementedError
