"""Datasets for the EASGD trainer.

The main process calls :func:`prepare_dataset` once (validation and any download),
then every worker and the evaluator call :func:`load_split` for the split they need.

Small datasets (the bundled ``mnist10k``, MNIST, Fashion-MNIST, CIFAR-10/100) are held
whole as uint8 tensors on the target device and turned into normalised float batches
there, so a training step never waits on a host-side loader.  ``imagefolder`` is too big
for that and streams through a ``torch.utils.data.DataLoader``.

torchvision is imported lazily, inside the functions that need it: importing it costs
more than a second, and worker processes (which mostly use ``mnist10k``) must start fast.

The modules, from the ground up: base.py (DataError, DatasetInfo), splits.py (on-device
tensors with their augmentation; the DataLoader split), source.py (DataSource, what an entry
of the registry is), one module per kind of data set (mnist10k.py, torchvision_sets.py,
folder.py, userdata.py), and registry.py (the name table, prepare_dataset, load_split).
"""

from .base import DataError, DatasetInfo
from .folder import IMAGE_SIZE_PROBES, FolderSplit
from .mnist10k import MNIST10K_SHA256, MNIST10K_TEST, MNIST10K_TRAIN
from .registry import DATASETS, SOURCES, get, load_split, native_image_size, prepare_dataset
from .source import DataSource
from .splits import LoaderSplit, Split, TensorSplit

__all__ = [
    "DATASETS", "IMAGE_SIZE_PROBES", "MNIST10K_SHA256", "MNIST10K_TEST", "MNIST10K_TRAIN",
    "SOURCES", "DataError", "DataSource", "DatasetInfo", "FolderSplit", "LoaderSplit", "Split",
    "TensorSplit", "get", "load_split", "native_image_size", "prepare_dataset",
]
