"""The registry of models: name -> a :class:`ModelEntry`, plus the two kinds named by a
pattern: ``torchvision:NAME`` and a user's ``module:factory``. Adding a model is its class
(or function) in a module and one entry in the table below."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError
from ..data import DatasetInfo
from ..flat import check_flattenable
from ..user import FactoryExit, call_with_known, import_spec, is_spec
from .nets import PAPER_INPUT_SIZE, PaperCifarNet, SimpleCNN
from .torchvision_models import TORCHVISION, resnet18, torchvision_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[[DatasetInfo], nn.Module]  # a freshly initialised model for the data
    input_size: int | None = None  # the side it always takes; None: the data's own


def _sized(cls: Callable[[int, int, int], nn.Module]) -> Callable[[DatasetInfo], nn.Module]:
    """A network taking (in_channels, num_classes, image_size), built from the data's info."""
    return lambda info: cls(info.in_channels, info.num_classes, info.image_size)


ENTRIES: dict[str, ModelEntry] = {m.name: m for m in (
    ModelEntry("cnn", _sized(SimpleCNN)),
    ModelEntry("cifar-paper", _sized(PaperCifarNet), input_size=PAPER_INPUT_SIZE),
    ModelEntry("resnet18", resnet18),
)}

MODELS: tuple[str, ...] = tuple(ENTRIES)


def check_model_name(name: str) -> None:
    """A one-line ConfigError (a ValueError) unless ``name`` is an entry or a pattern."""
    if name not in ENTRIES and not is_spec(name):
        raise ConfigError(f"unknown --model {name!r}; choose one of {', '.join(MODELS)}, "
                          "torchvision:NAME or module:factory")


def model_input_size(name: str, native_size: int) -> int:
    """Input side the model wants, given the dataset's native image side."""
    check_model_name(name)
    entry = ENTRIES.get(name)
    return entry.input_size if entry is not None and entry.input_size is not None else native_size


def _user_model(spec: str, info: DatasetInfo) -> nn.Module:
    factory = import_spec(spec, "--model")
    model = call_with_known(factory, "--model", num_classes=info.num_classes,
                            in_channels=info.in_channels, image_size=info.image_size)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(name: str, info: DatasetInfo) -> nn.Module:
    """Build a freshly initialised float32 model for the dataset described by ``info``."""
    check_model_name(name)
    if name.startswith(TORCHVISION):
        model = torchvision_model(name[len(TORCHVISION):], info)
    elif name in ENTRIES:
        model = ENTRIES[name].build(info)
    else:
        model = _user_model(name, info)
    check_flattenable(model)  # before the cast, which would drop a complex part silently
    model = model.to(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    logger.debug("built %s for %s: %d parameters", name, info.name, n_params)
    return model


def count_parameters(name: str, info: DatasetInfo) -> tuple[int, int] | None:
    """(values of the model's flat state, trainable parameters) for ``info``, from a build on
    the meta device, which allocates nothing: a model too large for this machine is measured
    before any copy of it exists. None where the model cannot be built there (a factory that
    reads its weights from a file); the real build in the main process then checks it."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = build_model(name, info)
    except FactoryExit:  # sys.exit() in the factory: wherever it is built
        raise
    except Exception:  # perhaps only on the meta device: the real build reports it, in one line
        return None
    named = list(model.parameters())  # each parameter once, however often it is used
    trained = sum(p.numel() for p in named if p.requires_grad)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return sum(p.numel() for p in named) + buffers, trained


def nothing_to_train(name: str) -> str:
    """The one line for a model without a parameter that requires grad."""
    return (f"--model {name} has no trainable parameter (none requires grad): there is "
            "nothing to train")
