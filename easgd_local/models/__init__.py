"""Models the EASGD trainer can train.

``cnn`` is the default: small enough that a CPU core trains it to >97% on MNIST digits
in under a minute.  ``cifar-paper`` is the 7-layer CIFAR network of the EASGD paper
(Zhang, Choromanska & LeCun, 2015), which trains on random 28x28 crops.  ``resnet18``
comes from torchvision, imported only when asked for (the import costs over a second).

The modules: nets.py (the networks written here), torchvision_models.py (resnet18 and
``torchvision:NAME``), registry.py (the name table, build_model and the checks on a model).
"""

from .nets import (
    CNN_CONV1_CHANNELS, CNN_CONV2_CHANNELS, CNN_HIDDEN, PAPER_CONV_CHANNELS, PAPER_DROPOUT,
    PAPER_HIDDEN, PAPER_INPUT_SIZE, PaperCifarNet, SimpleCNN,
)
from .registry import (
    ENTRIES, MODELS, ModelEntry, build_model, check_model_name, count_parameters,
    model_input_size, nothing_to_train,
)
from .torchvision_models import TORCHVISION, RepeatChannels, torchvision_classifiers

__all__ = [
    "CNN_CONV1_CHANNELS", "CNN_CONV2_CHANNELS", "CNN_HIDDEN", "ENTRIES", "MODELS",
    "PAPER_CONV_CHANNELS", "PAPER_DROPOUT", "PAPER_HIDDEN", "PAPER_INPUT_SIZE", "TORCHVISION",
    "ModelEntry", "PaperCifarNet", "RepeatChannels", "SimpleCNN", "build_model",
    "check_model_name", "count_parameters", "model_input_size", "nothing_to_train",
    "torchvision_classifiers",
]
