"""The registry of data sets: name -> a :class:`~.base.DataSource` (see base.py for what one
owns), and the two entry points every caller goes through. Adding a data set is an entry in
the table below (a module with its class where no existing one reads it).

The main process calls :func:`prepare_dataset` once (validation and any download), then
every worker and the evaluator call :func:`load_split` for the split they need. A name with
a colon (``module:factory``) is a user's data set (userdata.py), not an entry of the table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..user import is_spec
from . import userdata
from .base import DataError, DatasetInfo
from .folder import ImageFolder
from .mnist10k import Mnist10k
from .source import DataSource
from .splits import Split
from .torchvision_sets import TorchvisionSet

logger = logging.getLogger(__name__)

_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)  # mnist10k is a subset of MNIST: the same
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# name, classes, channels, native side, mean, std; then where torchvision finds the files.
SOURCES: dict[str, DataSource] = {s.name: s for s in (
    Mnist10k("mnist10k", 10, 1, 28, _MNIST_MEAN, _MNIST_STD),
    TorchvisionSet("mnist", 10, 1, 28, _MNIST_MEAN, _MNIST_STD, "MNIST", "MNIST"),
    TorchvisionSet("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), "FashionMNIST", "FashionMNIST"),
    # Per-channel statistics of the CIFAR training sets (std over all pixels, not the
    # often-quoted per-image average 0.2023/0.1994/0.2010).
    TorchvisionSet("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                   "CIFAR10", "cifar-10-batches-py", augment=True),
    TorchvisionSet("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                   "CIFAR100", "cifar-100-python", augment=True),
    ImageFolder("imagefolder", 0, 3, 224, _IMAGENET_MEAN, _IMAGENET_STD),
)}

DATASETS: tuple[str, ...] = tuple(SOURCES)


def get(name: str) -> DataSource:
    """The entry called ``name``; a one-line :class:`DataError` naming the choices if none is."""
    source = SOURCES.get(name)
    if source is None:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return source


def native_image_size(name: str) -> int:
    """Side of the images a dataset provides before any crop (224 for imagefolder,
    its default training size).  Lets a caller pick a model input size before
    :func:`prepare_dataset` runs."""
    return get(name).native_size


def prepare_dataset(name: str, data_dir: Path, download: bool, image_size: int | None = None) -> DatasetInfo:
    """Validate, download if asked, and check the files; run once in the main process.

    Downloading here, before any worker starts, keeps workers from racing to write
    the same files.  Raises :class:`DataError` (one line) for anything the user can fix.
    """
    if is_spec(name):  # a user's data factory: called here first, so its errors come before workers
        return userdata.load(name, data_dir, image_size)[2]
    source = get(name)
    size = source.resolve_size(image_size)
    info = source.prepare(Path(data_dir), download, size, image_size)
    logger.info("dataset %s ready: %d classes, %d channel(s), %dx%d inputs",
                name, info.num_classes, info.in_channels, info.image_size, info.image_size)
    return info


def load_split(
    name: str,
    data_dir: Path,
    train: bool,
    device: torch.device | str,
    image_size: int | None = None,
    loader_workers: int = 0,
) -> Split:
    """Load one split (train=True for a worker, False for the evaluator).

    ``loader_workers`` only matters for data read through a DataLoader (imagefolder, a user's
    Dataset): its worker processes.
    """
    if is_spec(name):  # a user's data factory, module:attr
        return userdata.split(name, train, torch.device(device), loader_workers, data_dir, image_size)
    source = get(name)
    size = source.resolve_size(image_size)
    dev = torch.device(device)
    split = source.load(Path(data_dir), train, dev, size, loader_workers)
    logger.debug("loaded %s %s split: %d samples on %s", name, "train" if train else "test", len(split), dev)
    return split
