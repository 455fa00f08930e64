"""The registry entry a built-in data set is (see registry.py for the table)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .base import DataError, DatasetInfo
from .splits import Split


@dataclass(frozen=True)
class DataSource(abc.ABC):
    """A built-in data set: its constants, how to check it once (:meth:`prepare`, in the main
    process, before any worker starts) and how to load one split (:meth:`load`, in each
    worker and the evaluator). Adding a data set is an instance of a subclass of this and one
    line in registry.py."""

    name: str
    num_classes: int  # 0 where the files say (imagefolder)
    in_channels: int
    native_size: int  # side of the images before any crop
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # In-memory data sets are only ever cropped: upscaling 28x28 digits would just waste
    # compute, so a larger size is refused instead of silently done.
    resizable: ClassVar[bool] = False

    def resolve_size(self, image_size: int | None) -> int:
        """The side the model receives: the native one unless ``image_size`` asks otherwise."""
        if image_size is None:
            return self.native_size
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise DataError(f"image_size must be a positive integer, got {image_size!r}")
        if not self.resizable and image_size > self.native_size:
            side = self.native_size
            raise DataError(
                f"image_size {image_size} is larger than the {side}x{side} images of "
                f"{self.name}; use a model that takes {side} or less"
            )
        return image_size

    def info(self, size: int, num_classes: int | None = None,
             train_size: int | None = None) -> DatasetInfo:
        return DatasetInfo(self.name, num_classes or self.num_classes, self.in_channels, size,
                           train_size)

    @abc.abstractmethod
    def prepare(self, root: Path, download: bool, size: int,
                image_size: int | None) -> DatasetInfo:
        """Check (and with ``download`` fetch) the files; ``size`` is the resolved side,
        ``image_size`` the one asked for (None: the data set's own)."""

    @abc.abstractmethod
    def load(self, root: Path, train: bool, device: torch.device, size: int,
             loader_workers: int) -> Split:
        """One split on ``device``, its images ``size`` on a side."""
