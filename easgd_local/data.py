"""Datasets for the EASGD trainer.

The main process calls :func:`prepare_dataset` once (validation and any download),
then every worker and the evaluator call :func:`load_split` for the split they need.

Small datasets (the bundled ``mnist10k``, MNIST, Fashion-MNIST, CIFAR-10/100) are held
whole as uint8 tensors on the target device and turned into normalised float batches
there, so a training step never waits on a host-side loader.  ``imagefolder`` is too big
for that and streams through a ``torch.utils.data.DataLoader``.

torchvision is imported lazily, inside the functions that need it: importing it costs
more than a second, and worker processes (which mostly use ``mnist10k``) must start fast.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("mnist10k", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")


class DataError(ValueError):
    """A data problem the user can fix (missing files, bad name); ``str()`` is one line."""

    def __init__(self, message: str) -> None:
        # The CLI prints this message as is; multi-line text from torchvision would
        # spill over the terminal, so fold it onto one line here once for all callers.
        super().__init__(_one_line(message))


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int  # side of the (square) images the model receives, after any crop
    # Training samples, where prepare_dataset knows it cheaply (not part of the identity).
    train_size: int | None = field(default=None, compare=False)
    # A user's data: how many distinct labels occur (num_classes is the largest + 1).
    distinct_labels: int | None = field(default=None, compare=False)


# ---------------------------------------------------------------------------------------
# Per-dataset constants
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    num_classes: int
    in_channels: int
    native_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tv_class: str | None = None  # torchvision.datasets class name
    folder: str | None = None  # what torchvision creates under the root
    augment: bool = False  # random crop + flip at train time (natural images only)


_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_SPECS: dict[str, _Spec] = {
    "mnist10k": _Spec(10, 1, 28, _MNIST_MEAN, _MNIST_STD),
    "mnist": _Spec(10, 1, 28, _MNIST_MEAN, _MNIST_STD, "MNIST", "MNIST"),
    "fashion-mnist": _Spec(10, 1, 28, (0.2860,), (0.3530,), "FashionMNIST", "FashionMNIST"),
    # Per-channel statistics of the CIFAR training sets (std over all pixels, not the
    # often-quoted per-image average 0.2023/0.1994/0.2010).
    "cifar10": _Spec(
        10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        "CIFAR10", "cifar-10-batches-py", augment=True,
    ),
    "cifar100": _Spec(
        100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        "CIFAR100", "cifar-100-python", augment=True,
    ),
    "imagefolder": _Spec(0, 3, 224, _IMAGENET_MEAN, _IMAGENET_STD),
}

# mnist10k: the package file, its checksum (from the data README) and the fixed split.
MNIST10K_SHA256 = "0217e13bd0668deb198aa7d305edbf0331eb89f8a6e7dd226e03d1aa3a9bd4ef"
MNIST10K_TRAIN = 8000
MNIST10K_TEST = 2000
# The split permutation must not depend on the training seed, or two runs with
# different seeds would be evaluated on different test sets.
_MNIST10K_SPLIT_SEED = 0

# Padding of the standard CIFAR random crop when the model takes full 32x32 images.
_CIFAR_PAD = 4

# The exceptions torchvision and its readers raise for absent, truncated or corrupt
# files; anything else is a bug and should surface as a traceback.
_READ_ERRORS = (
    RuntimeError, OSError, EOFError, ValueError, TypeError, KeyError, IndexError,
    AssertionError, pickle.UnpicklingError,
)


def _one_line(text: str) -> str:
    parts = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " | ".join(parts)


def _brief(exc: BaseException, limit: int = 300) -> str:
    # The whole message folded onto one line, not just its first line: torchvision's
    # download errors put the actual cause (the URL error) on later lines.
    text = _one_line(str(exc)) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_name(name: str) -> _Spec:
    spec = _SPECS.get(name)
    if spec is None:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return spec


def native_image_size(name: str) -> int:
    """Side of the images a dataset provides before any crop (224 for imagefolder,
    its default training size).  Lets a caller pick a model input size before
    :func:`prepare_dataset` runs."""
    return _check_name(name).native_size


def _resolve_size(name: str, spec: _Spec, image_size: int | None) -> int:
    if image_size is None:
        return spec.native_size
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    # In-memory datasets are only ever cropped: upscaling 28x28 digits would just
    # waste compute, so refuse it instead of silently doing it.
    if name != "imagefolder" and image_size > spec.native_size:
        raise DataError(
            f"image_size {image_size} is larger than the {spec.native_size}x{spec.native_size} "
            f"images of {name}; use a model that takes {spec.native_size} or less"
        )
    return image_size


# ---------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------


class Split(abc.ABC):
    """One split of a dataset, ready to yield batches on its device."""

    info: DatasetInfo

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        drop_last: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the split.

        With a generator: shuffled order drawn from it, plus train-time augmentation
        where the dataset has it.  Without: sequential order, no augmentation.
        Yields ``(x float32 [B,C,H,W] normalised, y int64 [B])`` on the split's device.
        """

    def num_batches(self, batch_size: int, drop_last: bool = True) -> int:
        """How many batches :meth:`batches` yields for these arguments."""
        _check_batch_size(batch_size)
        n = len(self)
        return n // batch_size if drop_last else math.ceil(n / batch_size)

    def subset(self, n: int, seed: int) -> "Split":
        """A fixed random subset of ``n`` samples (drawn from ``seed``, in index order);
        the split itself when it has no more than ``n``."""
        if n >= len(self):
            return self
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self._take(perm[:n].sort().values)

    @abc.abstractmethod
    def _take(self, indices: torch.Tensor) -> "Split": ...


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _norm_affine(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # (u8 / 255 - mean) / std folded into one multiply-add per element.
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * s)).to(torch.float32).view(1, -1, 1, 1).to(device)
    shift = (-m / s).to(torch.float32).view(1, -1, 1, 1).to(device)
    return scale, shift


class TensorSplit(Split):
    """A whole split held as uint8 ``[N,C,H,W]`` on the device.

    Keeping uint8 (not float32) on the device costs a quarter of the memory; the
    conversion to float and normalisation happen per batch, where they are cheap.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        info: DatasetInfo,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError("labels must be 1-D with one label per image")
        if images.shape[2] != images.shape[3]:
            raise ValueError("images must be square")
        if info.image_size > images.shape[2]:
            raise ValueError("info.image_size cannot exceed the stored image size")
        self.images = images.contiguous()
        self.labels = labels.to(device=images.device, dtype=torch.int64)
        self.info = info
        self.device = images.device
        self.augment = augment
        self._scale, self._shift = _norm_affine(mean, std, self.device)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).mul_(self._scale).add_(self._shift)

    def _take(self, indices: torch.Tensor) -> "TensorSplit":
        part = TensorSplit.__new__(TensorSplit)
        part.__dict__.update(self.__dict__)
        idx = indices.to(self.device)
        part.images = self.images.index_select(0, idx).contiguous()
        part.labels = self.labels.index_select(0, idx)
        return part

    def _center_crop(self, x: torch.Tensor) -> torch.Tensor:
        size, s = x.shape[-1], self.info.image_size
        if s == size:
            return x
        # Same rounding as torchvision's CenterCrop, so eval matches common practice.
        off = int(round((size - s) / 2.0))
        return x[:, :, off:off + s, off:off + s]

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        drop_last: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _check_batch_size(batch_size)
        n = len(self)
        stop = (n // batch_size) * batch_size if drop_last else n
        if generator is None:
            # Sequential slices are views: no gather, no copy until the float conversion.
            for start in range(0, stop, batch_size):
                end = min(start + batch_size, n)
                x = self._center_crop(self.images[start:end])
                yield self._normalize(x), self.labels[start:end]
            return

        # Draw everything random for the epoch at once on the generator's device and
        # move it in one transfer: per-batch draws would mean several tiny host->device
        # copies per step, and drawing up front keeps the stream independent of batch size.
        perm = torch.randperm(n, generator=generator, device=generator.device).to(self.device)
        crop = None
        if self.augment:
            crop = self._draw_crops(n, generator)
        for start in range(0, stop, batch_size):
            idx = perm[start:start + batch_size]
            x = self.images.index_select(0, idx)
            y = self.labels.index_select(0, idx)
            if crop is not None:
                oy, ox, flip = (t[start:start + batch_size] for t in crop)
                x = self._random_crop_flip(x, oy, ox, flip)
            else:
                x = self._center_crop(x)
            yield self._normalize(x), y

    def _pad(self) -> int:
        # Full-size inputs get the usual pad-4 crop; smaller inputs (the EASGD paper's
        # 28x28 on CIFAR) are random crops inside the unpadded image.
        return _CIFAR_PAD if self.info.image_size == self.images.shape[-1] else 0

    def _draw_crops(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        max_off = self.images.shape[-1] + 2 * self._pad() - self.info.image_size
        dev = generator.device
        oy = torch.randint(0, max_off + 1, (n,), generator=generator, device=dev)
        ox = torch.randint(0, max_off + 1, (n,), generator=generator, device=dev)
        flip = torch.randint(0, 2, (n,), generator=generator, device=dev).bool()
        return oy.to(self.device), ox.to(self.device), flip.to(self.device)

    def _random_crop_flip(
        self, x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample crop at (oy, ox) plus optional horizontal flip, as one gather."""
        pad = self._pad()
        if pad:
            x = F.pad(x, (pad, pad, pad, pad))  # zero (black) border, as torchvision's RandomCrop
        s = self.info.image_size
        b = x.shape[0]
        ar = torch.arange(s, device=x.device)
        rows = oy[:, None] + ar[None, :]  # [B, s]
        # A flipped crop reads its columns right to left: folding the flip into the
        # column index saves a second pass over the batch.
        cols = ox[:, None] + torch.where(flip[:, None], (s - 1) - ar[None, :], ar[None, :])
        bidx = torch.arange(b, device=x.device)[:, None, None]
        # Advanced indices split by the channel slice put their broadcast dims first:
        # the result is [B, s, s, C].
        out = x[bidx, :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()


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

    def _take(self, indices: torch.Tensor) -> "LoaderSplit":
        part = LoaderSplit.__new__(LoaderSplit)
        part.__dict__.update(self.__dict__)
        part.samples = [self.samples[i] for i in indices.tolist()]
        return part

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


class LoaderSplit(Split):
    """An image-folder split streamed through a DataLoader."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        loader: Callable[[str], Any],
        info: DatasetInfo,
        device: torch.device,
        train: bool,
        loader_workers: int = 0,
    ) -> None:
        self.samples = samples
        self.loader = loader
        self.info = info
        self.device = device
        self.train = train
        self.loader_workers = loader_workers
        self._scale, self._shift = _norm_affine(_IMAGENET_MEAN, _IMAGENET_STD, device)

    def __len__(self) -> int:
        return len(self.samples)

    def _take(self, indices: torch.Tensor) -> "LoaderSplit":
        part = LoaderSplit.__new__(LoaderSplit)
        part.__dict__.update(self.__dict__)
        part.samples = [self.samples[i] for i in indices.tolist()]
        return part

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        drop_last: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _check_batch_size(batch_size)
        augment = generator is not None and self.train
        epoch_seed = 0
        if generator is not None:
            # Drawn before the DataLoader touches the generator, so the order of draws
            # (and hence the run) depends only on the caller's seed.
            epoch_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        dataset = _FolderDataset(self.samples, self.loader, self.info.image_size, augment, epoch_seed)
        dl = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=generator is not None,
            generator=generator,
            drop_last=drop_last,
            num_workers=self.loader_workers,
            pin_memory=self.device.type == "cuda",
        )
        for x, y in dl:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            yield x.to(torch.float32).mul_(self._scale).add_(self._shift), y


# ---------------------------------------------------------------------------------------
# mnist10k (bundled)
# ---------------------------------------------------------------------------------------


def _mnist10k_path() -> Path:
    return Path(__file__).resolve().parent / "data" / "mnist10k.npz"


def _read_mnist10k() -> tuple[np.ndarray, np.ndarray]:
    path = _mnist10k_path()
    try:
        with np.load(path) as npz:
            images, labels = npz["images"], npz["labels"]
    except _READ_ERRORS + (zipfile.BadZipFile,) as exc:
        raise DataError(f"bundled data file {path} is missing or unreadable ({_brief(exc)}); reinstall the package") from exc
    if images.shape != (MNIST10K_TRAIN + MNIST10K_TEST, 28, 28) or labels.shape != (images.shape[0],):
        raise DataError(f"bundled data file {path} has unexpected shapes {images.shape} / {labels.shape}")
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise DataError(f"bundled data file {path} has unexpected dtypes {images.dtype} / {labels.dtype}")
    return images, labels


def _mnist10k_indices(train: bool) -> np.ndarray:
    perm = np.random.default_rng(_MNIST10K_SPLIT_SEED).permutation(MNIST10K_TRAIN + MNIST10K_TEST)
    return perm[:MNIST10K_TRAIN] if train else perm[MNIST10K_TRAIN:]


def _prepare_mnist10k() -> None:
    path = _mnist10k_path()
    if not path.is_file():
        raise DataError(f"bundled data file {path} not found; reinstall the package")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != MNIST10K_SHA256:
        raise DataError(f"bundled data file {path} is corrupt (sha256 {digest[:12]}... != {MNIST10K_SHA256[:12]}...)")
    _read_mnist10k()


def _load_mnist10k(info: DatasetInfo, spec: _Spec, train: bool, device: torch.device) -> TensorSplit:
    images, labels = _read_mnist10k()
    idx = _mnist10k_indices(train)
    x = torch.from_numpy(np.ascontiguousarray(images[idx])).unsqueeze(1).to(device)
    y = torch.from_numpy(labels[idx].astype(np.int64)).to(device)
    return TensorSplit(x, y, info, spec.mean, spec.std, augment=False)


# ---------------------------------------------------------------------------------------
# torchvision datasets (MNIST, Fashion-MNIST, CIFAR-10/100)
# ---------------------------------------------------------------------------------------


def _check_present(name: str, spec: _Spec, root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"data directory {root} not found; pass --download or --data-dir")
    assert spec.folder is not None
    folder = root / spec.folder
    if not folder.is_dir():
        raise DataError(f"{name} not found in data directory {root} (expected {folder}); pass --download or --data-dir")


def _open_torchvision(name: str, spec: _Spec, root: Path, train: bool, download: bool) -> Any:
    """Construct the torchvision dataset, turning its errors into one-line DataErrors."""
    if not download:
        _check_present(name, spec, root)
    import torchvision.datasets  # lazy: see module docstring

    cls = getattr(torchvision.datasets, spec.tv_class or "")
    folder = root / (spec.folder or "")
    try:
        return cls(str(root), train=train, download=download)
    except _READ_ERRORS as exc:
        logger.debug("torchvision failed to open %s under %s", name, root, exc_info=True)
        if download:
            raise DataError(
                f"could not download or read {name} into {folder} ({_brief(exc)}); "
                "check the network or put the files there by hand"
            ) from exc
        raise DataError(
            f"{name} files in {folder} are incomplete or corrupt ({_brief(exc)}); "
            "delete that folder and pass --download"
        ) from exc


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


def _load_torchvision(
    name: str, spec: _Spec, root: Path, train: bool, device: torch.device, info: DatasetInfo
) -> TensorSplit:
    ds = _open_torchvision(name, spec, root, train=train, download=False)
    images = _to_uint8_nchw(ds.data)
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    if images.shape[1] != spec.in_channels or images.shape[2] != spec.native_size:
        raise DataError(f"{name} images in {root} have shape {tuple(images.shape[1:])}, expected "
                        f"({spec.in_channels}, {spec.native_size}, {spec.native_size})")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
        raise DataError(f"{name} labels in {root} fall outside 0..{spec.num_classes - 1}")
    return TensorSplit(
        images.to(device), labels.to(device), info, spec.mean, spec.std, augment=spec.augment and train
    )


# ---------------------------------------------------------------------------------------
# imagefolder
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


def _prepare_imagefolder(root: Path) -> int:
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not root.is_dir():
        raise DataError(f"data directory {root} not found; pass --data-dir pointing at a folder with train/ and val/")
    train_classes = _folder_classes(root, "train")
    val_classes = _folder_classes(root, "val")
    # Check every training class has images (cheap: stops at the first one) so a
    # worker does not fail later, after the others have started.
    empty = [c for c in train_classes if not _has_image(root / "train" / c, IMG_EXTENSIONS)]
    if empty:
        raise DataError(f"image folder {root / 'train'} has class folders with no images: {', '.join(empty[:5])}")
    unknown = sorted(set(val_classes) - set(train_classes))
    if unknown:
        raise DataError(f"image folder {root / 'val'} has classes not in train/: {', '.join(unknown[:5])}")
    for split, first_class in (("train", train_classes[0]), ("val", None)):
        probe = _first_image(root / split / first_class if first_class else root / split, IMG_EXTENSIONS)
        if probe is None:
            raise DataError(f"image folder {root / split} has no images")
        try:
            with Image.open(probe) as im:
                im.verify()
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"cannot read image {probe} ({_brief(exc)})") from exc
    return len(train_classes)


IMAGE_SIZE_PROBES = 32  # images per class folder whose size is read to find a common one


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


def _load_imagefolder(
    root: Path, train: bool, device: torch.device, size: int, loader_workers: int
) -> LoaderSplit:
    import torchvision.datasets  # lazy: see module docstring

    if not root.is_dir():
        raise DataError(f"data directory {root} not found; pass --data-dir pointing at a folder with train/ and val/")
    train_classes = _folder_classes(root, "train")
    split = "train" if train else "val"
    if not train:
        _folder_classes(root, "val")  # one-line DataError when val/ is absent or empty
    try:
        # val/ may lack some classes; its own indices are then remapped to train/'s below.
        ds = torchvision.datasets.ImageFolder(str(root / split), allow_empty=not train)
    except FileNotFoundError as exc:
        raise DataError(f"image folder {root / split}: {_brief(exc)}") from exc
    if not ds.samples:
        raise DataError(f"image folder {root / split} has no images")
    # Labels must mean the same class in both splits: ImageFolder numbers the folders
    # it sees, so a val/ with a missing class would otherwise shift every later label.
    train_index = {c: i for i, c in enumerate(train_classes)}
    unknown = sorted(set(ds.classes) - set(train_index))
    if unknown:
        raise DataError(f"image folder {root / 'val'} has classes not in train/: {', '.join(unknown[:5])}")
    samples = [(path, train_index[ds.classes[t]]) for path, t in ds.samples]
    info = _info("imagefolder", _SPECS["imagefolder"], size, len(train_classes))
    return LoaderSplit(samples, ds.loader, info, device, train, loader_workers)


# ---------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------


def _info(name: str, spec: _Spec, size: int, num_classes: int | None = None,
          train_size: int | None = None) -> DatasetInfo:
    return DatasetInfo(name, num_classes or spec.num_classes, spec.in_channels, size, train_size)


def _check_labels(name: str, ds: Any, folder: Path) -> int:
    """One label per image (torchvision does not check it for MNIST's files); the size."""
    data, targets = getattr(ds, "data", None), getattr(ds, "targets", None)
    if data is not None and targets is not None and len(data) != len(targets):
        raise DataError(f"{name} files in {folder} do not match: {len(data)} images but "
                        f"{len(targets)} labels; delete that folder and pass --download")
    return len(ds)


def prepare_dataset(name: str, data_dir: Path, download: bool, image_size: int | None = None) -> DatasetInfo:
    """Validate, download if asked, and check the files; run once in the main process.

    Downloading here, before any worker starts, keeps workers from racing to write
    the same files.  Raises :class:`DataError` (one line) for anything the user can fix.
    """
    if ":" in name:  # a user's data factory: called here first, so its errors come before workers
        from . import userdata

        return userdata.load(name, data_dir, image_size)[2]
    spec = _check_name(name)
    size = _resolve_size(name, spec, image_size)
    root = Path(data_dir)
    if name == "mnist10k":
        _prepare_mnist10k()
        info = _info(name, spec, size, train_size=MNIST10K_TRAIN)
    elif name == "imagefolder":
        if download:
            logger.warning("--download has no effect for imagefolder: there is nothing to download")
        classes = _prepare_imagefolder(root)
        if image_size is None:
            # The images' own size when they all share one (28x28 digits stay 28x28).
            size = _common_image_size(root) or size
        info = _info(name, spec, size, classes)
    else:
        # Opening the test split checks (and with download=True fetches) everything
        # without holding the big training array: torchvision's CIFAR integrity check
        # covers the files of both splits.  The MNIST family only checks that files
        # exist, so its training file is read too (47 MB, a fraction of a second).
        folder = root / (spec.folder or "")
        _check_labels(name, _open_torchvision(name, spec, root, train=False, download=download), folder)
        train_size = None
        if spec.tv_class in ("MNIST", "FashionMNIST"):
            train_size = _check_labels(name, _open_torchvision(name, spec, root, train=True, download=False), folder)
        info = _info(name, spec, size, train_size=train_size)
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
    if ":" in name:  # a user's data factory, module:attr
        from . import userdata

        return userdata.split(name, train, torch.device(device), loader_workers, data_dir, image_size)
    spec = _check_name(name)
    size = _resolve_size(name, spec, image_size)
    dev = torch.device(device)
    root = Path(data_dir)
    if name == "mnist10k":
        split: Split = _load_mnist10k(_info(name, spec, size), spec, train, dev)
    elif name == "imagefolder":
        split = _load_imagefolder(root, train, dev, size, loader_workers)
    else:
        split = _load_torchvision(name, spec, root, train, dev, _info(name, spec, size))
    logger.debug("loaded %s %s split: %d samples on %s", name, "train" if train else "test", len(split), dev)
    return split
