"""``mnist10k``: 10,000 MNIST digits shipped with the package (mnist10k.npz beside this file,
see ATTRIBUTION.md), split 8,000 / 2,000 the same way on every run. No network, no
torchvision: the data set workers start fastest with."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import READ_ERRORS, DataError, DatasetInfo, brief
from .source import DataSource
from .splits import TensorSplit

# The package file's checksum (from the data README) and the fixed split.
MNIST10K_SHA256 = "0217e13bd0668deb198aa7d305edbf0331eb89f8a6e7dd226e03d1aa3a9bd4ef"
MNIST10K_TRAIN = 8000
MNIST10K_TEST = 2000
# The split permutation must not depend on the training seed, or two runs with
# different seeds would be evaluated on different test sets.
_MNIST10K_SPLIT_SEED = 0


def _mnist10k_path() -> Path:
    return Path(__file__).resolve().parent / "mnist10k.npz"


def _read_mnist10k() -> tuple[np.ndarray, np.ndarray]:
    path = _mnist10k_path()
    try:
        with np.load(path) as npz:
            images, labels = npz["images"], npz["labels"]
    except READ_ERRORS + (zipfile.BadZipFile,) as exc:
        raise DataError(f"bundled data file {path} is missing or unreadable ({brief(exc)}); reinstall the package") from exc
    if images.shape != (MNIST10K_TRAIN + MNIST10K_TEST, 28, 28) or labels.shape != (images.shape[0],):
        raise DataError(f"bundled data file {path} has unexpected shapes {images.shape} / {labels.shape}")
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise DataError(f"bundled data file {path} has unexpected dtypes {images.dtype} / {labels.dtype}")
    return images, labels


def _mnist10k_indices(train: bool) -> np.ndarray:
    perm = np.random.default_rng(_MNIST10K_SPLIT_SEED).permutation(MNIST10K_TRAIN + MNIST10K_TEST)
    return perm[:MNIST10K_TRAIN] if train else perm[MNIST10K_TRAIN:]


@dataclass(frozen=True)
class Mnist10k(DataSource):
    """The bundled file: checked against its checksum, split by a fixed permutation."""

    def prepare(self, root: Path, download: bool, size: int,
                image_size: int | None) -> DatasetInfo:
        path = _mnist10k_path()
        if not path.is_file():
            raise DataError(f"bundled data file {path} not found; reinstall the package")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != MNIST10K_SHA256:
            raise DataError(f"bundled data file {path} is corrupt (sha256 {digest[:12]}... != {MNIST10K_SHA256[:12]}...)")
        _read_mnist10k()
        return self.info(size, train_size=MNIST10K_TRAIN)

    def load(self, root: Path, train: bool, device: torch.device, size: int,
             loader_workers: int) -> TensorSplit:
        images, labels = _read_mnist10k()
        idx = _mnist10k_indices(train)
        x = torch.from_numpy(np.ascontiguousarray(images[idx])).unsqueeze(1).to(device)
        y = torch.from_numpy(labels[idx].astype(np.int64)).to(device)
        return TensorSplit(x, y, self.info(size), self.mean, self.std, augment=False)

