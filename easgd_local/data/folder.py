"""``imagefolder``: ``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>``, too
big to hold, so streamed through a DataLoader (:class:`~.splits.LoaderSplit`) with the
Inception-style random resized crop at train time.

torchvision and PIL are imported lazily, inside the functions that need them: importing
them costs more than a second, and worker processes that use ``mnist10k`` must start fast.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.utils.data

from .base import DataError, DatasetInfo, brief
from .source import DataSource
from .splits import LoaderSplit, norm_affine

logger = logging.getLogger(__name__)

IMAGE_SIZE_PROBES = 32  # images per class folder whose size is read to find a common one


class _FolderDataset(torch.utils.data.Dataset):
    """ImageFolder samples with seeded per-sample transforms, yielding uint8 tensors.

    Each sample's random crop comes from ``(epoch_seed, index)`` rather than from the
    global torch RNG, so augmentation is reproducible from the caller's generator
    whatever the number of loader workers, and it does not disturb the training RNG
    (dropout) when the loader runs in the main process.  Images leave as uint8:
    a quarter of the bytes to pin and copy; normalisation happens on the device.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        loader: Callable[[str], Any],
        image_size: int,
        train: bool,
        epoch_seed: int = 0,
    ) -> None:
        self.samples = samples
        self.loader = loader
        self.image_size = image_size
        self.train = train
        self.epoch_seed = epoch_seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.transforms import functional as TF  # lazy: see module docstring

        path, target = self.samples[index]
        img = self.loader(path)
        s = self.image_size
        if self.train:
            rng = np.random.default_rng([self.epoch_seed, index])
            top, left, h, w = _random_resized_crop_box(img.height, img.width, rng)
            img = TF.resized_crop(img, top, left, h, w, [s, s])
            if rng.random() < 0.5:
                img = TF.hflip(img)
        else:
            img = TF.resize(img, int(s * 8 / 7))
            img = TF.center_crop(img, [s, s])
        return TF.pil_to_tensor(img), target


def _random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of an Inception-style crop: random area fraction and aspect
    ratio, a few tries, then a centred crop of clamped aspect as the fallback."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class FolderSplit(LoaderSplit):
    """An image-folder split: its samples read and transformed by the DataLoader's workers,
    normalised on the device."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        loader: Callable[[str], Any],
        info: DatasetInfo,
        device: torch.device,
        train: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        loader_workers: int = 0,
    ) -> None:
        super().__init__(info, device, loader_workers)
        self.samples = samples
        self.loader = loader
        self.train = train
        self._scale, self._shift = norm_affine(mean, std, device)

    def __len__(self) -> int:
        return len(self.samples)

    def _take(self, indices: torch.Tensor) -> "FolderSplit":
        part = FolderSplit.__new__(FolderSplit)
        part.__dict__.update(self.__dict__)
        part.samples = [self.samples[i] for i in indices.tolist()]
        return part

    def _epoch_dataset(self, generator: torch.Generator | None) -> _FolderDataset:
        augment = generator is not None and self.train
        epoch_seed = 0
        if generator is not None:
            # Drawn before the DataLoader touches the generator, so the order of draws
            # (and hence the run) depends only on the caller's seed.
            epoch_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        return _FolderDataset(self.samples, self.loader, self.info.image_size, augment, epoch_seed)

    def _on_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        return x.to(torch.float32).mul_(self._scale).add_(self._shift), y


# ---------------------------------------------------------------------------------------
# Checking the folder
# ---------------------------------------------------------------------------------------


def _has_image(directory: Path, extensions: tuple[str, ...]) -> bool:
    # Stops at the first image found: on ImageNet a full walk takes minutes.
    for _, _, files in os.walk(directory, followlinks=True):
        if any(f.lower().endswith(extensions) for f in files):
            return True
    return False


def _first_image(directory: Path, extensions: tuple[str, ...]) -> Path | None:
    for dirpath, _, files in os.walk(directory, followlinks=True):
        for f in sorted(files):
            if f.lower().endswith(extensions):
                return Path(dirpath) / f
    return None


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"data directory {root} not found; pass --data-dir pointing at a folder with train/ and val/")


def _folder_classes(root: Path, split: str) -> list[str]:
    from torchvision.datasets.folder import find_classes  # lazy: see module docstring

    directory = root / split
    if not directory.is_dir():
        raise DataError(f"image folder {directory} not found; expected {root}/{split}/<class>/<image> (pass --data-dir)")
    try:
        classes, _ = find_classes(directory)
    except FileNotFoundError as exc:
        raise DataError(f"image folder {directory} has no class folders; expected {directory}/<class>/<image>") from exc
    return classes


def _check_folder(root: Path) -> int:
    """The number of training classes, once the layout and a first image of each split read."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    _check_root(root)
    train_classes = _folder_classes(root, "train")
    val_classes = _folder_classes(root, "val")
    # Check every training class has images (cheap: stops at the first one) so a
    # worker does not fail later, after the others have started.
    empty = [c for c in train_classes if not _has_image(root / "train" / c, IMG_EXTENSIONS)]
    if empty:
        raise DataError(f"image folder {root / 'train'} has class folders with no images: {', '.join(empty[:5])}")
    _refuse_unknown_classes(root, val_classes, train_classes)
    for split, first_class in (("train", train_classes[0]), ("val", None)):
        probe = _first_image(root / split / first_class if first_class else root / split, IMG_EXTENSIONS)
        if probe is None:
            raise DataError(f"image folder {root / split} has no images")
        try:
            with Image.open(probe) as im:
                im.verify()
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"cannot read image {probe} ({brief(exc)})") from exc
    return len(train_classes)


def _refuse_unknown_classes(root: Path, val_classes: list[str], train_classes: list[str]) -> None:
    unknown = sorted(set(val_classes) - set(train_classes))
    if unknown:
        raise DataError(f"image folder {root / 'val'} has classes not in train/: {', '.join(unknown[:5])}")


def _common_image_size(root: Path) -> int | None:
    """The side the folder's images share when they are square and all of one size, as read
    from the headers of up to IMAGE_SIZE_PROBES images of each class folder; None otherwise."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    sizes = set()
    for split in ("train", "val"):
        for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            seen = 0
            with os.scandir(class_dir) as entries:
                for entry in entries:
                    if not entry.name.lower().endswith(IMG_EXTENSIONS) or not entry.is_file():
                        continue
                    try:
                        with Image.open(entry.path) as im:
                            sizes.add(im.size)
                    except (OSError, ValueError, SyntaxError):
                        continue  # an unreadable image: the evaluation will say so
                    seen += 1
                    if seen >= IMAGE_SIZE_PROBES or len(sizes) > 1:
                        break
            if len(sizes) > 1:
                return None
    if len(sizes) == 1:
        w, h = sizes.pop()
        if w == h:
            return w
    return None


# ---------------------------------------------------------------------------------------
# The entry
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFolder(DataSource):
    """A folder of images per class; ``num_classes`` is what train/ holds, and the images may
    be resized to any side (``native_size`` is the default training size)."""

    resizable: ClassVar[bool] = True

    def prepare(self, root: Path, download: bool, size: int,
                image_size: int | None) -> DatasetInfo:
        if download:
            logger.warning("--download has no effect for imagefolder: there is nothing to download")
        classes = _check_folder(root)
        if image_size is None:
            # The images' own size when they all share one (28x28 digits stay 28x28).
            size = _common_image_size(root) or size
        return self.info(size, classes)

    def load(self, root: Path, train: bool, device: torch.device, size: int,
             loader_workers: int) -> FolderSplit:
        import torchvision.datasets  # lazy: see module docstring

        _check_root(root)
        train_classes = _folder_classes(root, "train")
        split = "train" if train else "val"
        if not train:
            _folder_classes(root, "val")  # one-line DataError when val/ is absent or empty
        try:
            # val/ may lack some classes; its own indices are then remapped to train/'s below.
            ds = torchvision.datasets.ImageFolder(str(root / split), allow_empty=not train)
        except FileNotFoundError as exc:
            raise DataError(f"image folder {root / split}: {brief(exc)}") from exc
        if not ds.samples:
            raise DataError(f"image folder {root / split} has no images")
        # Labels must mean the same class in both splits: ImageFolder numbers the folders
        # it sees, so a val/ with a missing class would otherwise shift every later label.
        _refuse_unknown_classes(root, ds.classes, train_classes)
        train_index = {c: i for i, c in enumerate(train_classes)}
        samples = [(path, train_index[ds.classes[t]]) for path, t in ds.samples]
        info = self.info(size, len(train_classes))
        return FolderSplit(samples, ds.loader, info, device, train, self.mean, self.std, loader_workers)
