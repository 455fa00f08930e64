"""The data sets torchvision reads and downloads (MNIST, Fashion-MNIST, CIFAR-10/100), held
whole on the device as uint8 once read.

torchvision is imported lazily, inside the functions that need it: importing it costs more
than a second, and worker processes that use ``mnist10k`` must start fast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import READ_ERRORS, DataError, DatasetInfo, brief
from .source import DataSource
from .splits import TensorSplit

logger = logging.getLogger(__name__)


def _to_uint8_nchw(data: Any) -> torch.Tensor:
    # MNIST-style datasets hold a uint8 tensor [N,H,W]; CIFAR holds numpy [N,H,W,C].
    t = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.asarray(data))
    if t.dim() == 3:
        t = t.unsqueeze(1)
    elif t.dim() == 4:
        t = t.permute(0, 3, 1, 2)
    else:
        raise DataError(f"unexpected image array shape {tuple(t.shape)}")
    return t.to(torch.uint8).contiguous()


def _check_labels(name: str, ds: Any, folder: Path) -> int:
    """One label per image (torchvision does not check it for MNIST's files); the size."""
    data, targets = getattr(ds, "data", None), getattr(ds, "targets", None)
    if data is not None and targets is not None and len(data) != len(targets):
        raise DataError(f"{name} files in {folder} do not match: {len(data)} images but "
                        f"{len(targets)} labels; delete that folder and pass --download")
    return len(ds)


@dataclass(frozen=True)
class TorchvisionSet(DataSource):
    """A ``torchvision.datasets`` class reading its standard files under the data directory."""

    tv_class: str = ""  # the torchvision.datasets class
    folder: str = ""  # what torchvision creates under the root
    augment: bool = False  # random crop + flip at train time (natural images only)

    def prepare(self, root: Path, download: bool, size: int,
                image_size: int | None) -> DatasetInfo:
        # Opening the test split checks (and with download=True fetches) everything
        # without holding the big training array: torchvision's CIFAR integrity check
        # covers the files of both splits.  The MNIST family only checks that files
        # exist, so its training file is read too (47 MB, a fraction of a second).
        folder = root / self.folder
        _check_labels(self.name, self._open(root, train=False, download=download), folder)
        train_size = None
        if self.tv_class in ("MNIST", "FashionMNIST"):
            train_size = _check_labels(self.name, self._open(root, train=True, download=False), folder)
        return self.info(size, train_size=train_size)

    def load(self, root: Path, train: bool, device: torch.device, size: int,
             loader_workers: int) -> TensorSplit:
        ds = self._open(root, train=train, download=False)
        images = _to_uint8_nchw(ds.data)
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        if images.shape[1] != self.in_channels or images.shape[2] != self.native_size:
            raise DataError(f"{self.name} images in {root} have shape {tuple(images.shape[1:])}, expected "
                            f"({self.in_channels}, {self.native_size}, {self.native_size})")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise DataError(f"{self.name} labels in {root} fall outside 0..{self.num_classes - 1}")
        return TensorSplit(images.to(device), labels.to(device), self.info(size), self.mean,
                           self.std, augment=self.augment and train)

    def _check_present(self, root: Path) -> None:
        if not root.is_dir():
            raise DataError(f"data directory {root} not found; pass --download or --data-dir")
        folder = root / self.folder
        if not folder.is_dir():
            raise DataError(f"{self.name} not found in data directory {root} (expected {folder}); "
                            "pass --download or --data-dir")

    def _open(self, root: Path, train: bool, download: bool) -> Any:
        """Construct the torchvision dataset, turning its errors into one-line DataErrors."""
        if not download:
            self._check_present(root)
        import torchvision.datasets  # lazy: see module docstring

        cls = getattr(torchvision.datasets, self.tv_class)
        folder = root / self.folder
        try:
            return cls(str(root), train=train, download=download)
        except READ_ERRORS as exc:
            logger.debug("torchvision failed to open %s under %s", self.name, root, exc_info=True)
            if download:
                raise DataError(
                    f"could not download or read {self.name} into {folder} ({brief(exc)}); "
                    "check the network or put the files there by hand"
                ) from exc
            raise DataError(
                f"{self.name} files in {folder} are incomplete or corrupt ({brief(exc)}); "
                "delete that folder and pass --download"
            ) from exc
