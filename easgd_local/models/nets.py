"""The networks written here: ``cnn`` (:class:`SimpleCNN`), the default, and ``cifar-paper``
(:class:`PaperCifarNet`), the 7-layer CIFAR network of the EASGD paper (Zhang, Choromanska &
LeCun, 2015), which trains on random 28x28 crops."""

from __future__ import annotations

import torch
from torch import nn

# Widths of the default `cnn`; module-level so they can be tuned for speed vs accuracy.
CNN_CONV1_CHANNELS = 16
CNN_CONV2_CHANNELS = 32
CNN_HIDDEN = 64

# The EASGD paper's CIFAR net: three convolutions, one hidden fully connected layer.
PAPER_CONV_CHANNELS = (64, 128, 64)
PAPER_HIDDEN = 256
PAPER_DROPOUT = 0.5
PAPER_INPUT_SIZE = 28  # the paper trains on random 28x28 crops of the 32x32 images


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
