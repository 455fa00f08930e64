"""Models from ``torchvision.models``: ``resnet18`` (by name) and any classifier as
``torchvision:NAME``, untrained. torchvision is imported only when one is asked for (the
import costs over a second)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError
from ..data import DatasetInfo

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


def torchvision_model(name: str, info: DatasetInfo) -> nn.Module:
    """``torchvision:NAME`` (``name`` without the prefix), for ``info``'s classes and channels."""
    import torchvision.models

    known = torchvision_classifiers()
    if name not in known:
        raise ConfigError(f"--model torchvision:{name}: not a classification model of "
                          f"torchvision (e.g. {', '.join(known[:6])}, ...)")
    # No weights: there is no network here, and EASGD starts every worker from the same
    # random initialisation anyway.
    model = torchvision.models.get_model(name, weights=None, num_classes=info.num_classes)
    return RepeatChannels(model, 3) if info.in_channels != 3 else model


def resnet18(info: DatasetInfo) -> nn.Module:
    """torchvision's ResNet-18, its first convolution made for ``info``'s channels."""
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
