"""Models the EASGD trainer can train.

``cnn`` is the default: small enough that a CPU core trains it to >97% on MNIST digits
in under a minute.  ``cifar-paper`` is the 7-layer CIFAR network of the EASGD paper
(Zhang, Choromanska & LeCun, 2015), which trains on random 28x28 crops.  ``resnet18``
comes from torchvision, imported only when asked for (the import costs over a second).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .data import DatasetInfo

logger = logging.getLogger(__name__)

MODELS: tuple[str, ...] = ("cnn", "cifar-paper", "resnet18")

# Widths of the default `cnn`; module-level so they can be tuned for speed vs accuracy.
CNN_CONV1_CHANNELS = 16
CNN_CONV2_CHANNELS = 32
CNN_HIDDEN = 64

# The EASGD paper's CIFAR net: three convolutions, one hidden fully connected layer.
PAPER_CONV_CHANNELS = (64, 128, 64)
PAPER_HIDDEN = 256
PAPER_DROPOUT = 0.5
PAPER_INPUT_SIZE = 28  # the paper trains on random 28x28 crops of the 32x32 images


def _check_name(name: str) -> None:
    if name not in MODELS and ":" not in name:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}, "
                         "torchvision:NAME or module:factory")


def model_input_size(name: str, native_size: int) -> int:
    """Input side the model wants, given the dataset's native image side."""
    _check_name(name)
    if name == "cifar-paper":
        return PAPER_INPUT_SIZE
    return native_size


TORCHVISION = "torchvision:"


def torchvision_classifiers() -> list[str]:
    """The classification models of torchvision.models (not detection, segmentation, video)."""
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


class RepeatChannels(nn.Module):
    """Feeds a model made for ``channels`` input channels with fewer (grayscale digits to a
    3-channel torchvision model): the input's channels are repeated."""

    def __init__(self, model: nn.Module, channels: int):
        super().__init__()
        self.model, self.channels = model, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            x = x.repeat(1, self.channels // x.shape[1] + 1, 1, 1)[:, : self.channels]
        return self.model(x)


def _torchvision_model(name: str, info: DatasetInfo) -> nn.Module:
    from .config import ConfigError

    import torchvision.models

    known = torchvision_classifiers()
    if name not in known:
        raise ConfigError(f"--model torchvision:{name}: not a classification model of "
                          f"torchvision (e.g. {', '.join(known[:6])}, ...)")
    # No weights: there is no network here, and EASGD starts every worker from the same
    # random initialisation anyway.
    model = torchvision.models.get_model(name, weights=None, num_classes=info.num_classes)
    return RepeatChannels(model, 3) if info.in_channels != 3 else model


def _user_model(spec: str, info: DatasetInfo) -> nn.Module:
    from .config import ConfigError
    from .user import call_with_known, import_spec

    factory = import_spec(spec, "--model")
    model = call_with_known(factory, "--model", num_classes=info.num_classes,
                            in_channels=info.in_channels, image_size=info.image_size)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


class SimpleCNN(nn.Module):
    """conv5x5 -> ReLU -> pool2 -> conv5x5 -> ReLU -> pool2 -> fc -> ReLU -> fc.

    No batch norm or dropout: EASGD averages parameters across workers, and running
    statistics (which are buffers, not parameters) would be left out of that average.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"cnn needs images of at least 4x4, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, CNN_CONV1_CHANNELS, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(CNN_CONV1_CHANNELS, CNN_CONV2_CHANNELS, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = image_size // 2 // 2  # each pool floors, as MaxPool2d does
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(CNN_CONV2_CHANNELS * side * side, CNN_HIDDEN),
            nn.ReLU(inplace=True),
            nn.Linear(CNN_HIDDEN, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class PaperCifarNet(nn.Module):
    """conv5x5(64) -> pool3/2 -> conv5x5(128) -> pool3/2 -> conv3x3(64) -> fc256+dropout -> fc.

    "Same" paddings keep each convolution from shrinking the map, so on 28x28 inputs
    the pools give 28 -> 13 -> 6 and the classifier sees 64*6*6 = 2304 features.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        c1, c2, c3 = PAPER_CONV_CHANNELS
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )
        # A dry run on zeros gives the flatten size for any input side; it draws no
        # random numbers, so construction stays deterministic under manual_seed.
        with torch.no_grad():
            try:
                out = self.features(torch.zeros(1, in_channels, image_size, image_size))
            except RuntimeError as exc:
                raise ValueError(f"cifar-paper cannot take {image_size}x{image_size} inputs") from exc
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(out[0].numel(), PAPER_HIDDEN),
            nn.ReLU(inplace=True),
            nn.Dropout(PAPER_DROPOUT),
            nn.Linear(PAPER_HIDDEN, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _resnet18(info: DatasetInfo) -> nn.Module:
    import torchvision.models  # lazy: see module docstring

    model = torchvision.models.resnet18(weights=None, num_classes=info.num_classes)
    if info.in_channels != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(
            info.in_channels, old.out_channels, kernel_size=old.kernel_size,
            stride=old.stride, padding=old.padding, bias=False,
        )
        # Same initialisation torchvision gives its own convolutions, so the swapped
        # layer does not start at a different scale from the rest of the network.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def build_model(name: str, info: DatasetInfo) -> nn.Module:
    """Build a freshly initialised float32 model for the dataset described by ``info``."""
    _check_name(name)
    if name.startswith(TORCHVISION):
        model: nn.Module = _torchvision_model(name[len(TORCHVISION):], info)
    elif ":" in name:
        model = _user_model(name, info)
    elif name == "cnn":
        model = SimpleCNN(info.in_channels, info.num_classes, info.image_size)
    elif name == "cifar-paper":
        model = PaperCifarNet(info.in_channels, info.num_classes, info.image_size)
    else:
        model = _resnet18(info)
    from .flat import check_flattenable

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
    import warnings

    from .user import FactoryExit

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
