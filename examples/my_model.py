"""A model of your own: a factory that returns a torch.nn.Module.

    easgd-local train --model examples.my_model:make_net ...

It may take ``num_classes``, ``in_channels`` and ``image_size`` (all three, some, or none) and is
given those it takes, from the data. Run from the checkout's root, so that ``examples`` can be
imported (the current directory and PYTHONPATH are searched).
"""

from torch import nn


def make_net(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * side * side, num_classes),
    )
