"""Splits: one split of a data set, ready to yield normalised batches on its device.

:class:`TensorSplit` holds a whole split on the device (with the CIFAR random crop and flip
done there as one gather); :class:`LoaderSplit` streams one through a DataLoader, for data
too big to hold.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import torch.utils.data

from .base import DatasetInfo

# Padding of the standard CIFAR random crop when the model takes full 32x32 images.
CIFAR_PAD = 4


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
        check_batch_size(batch_size)
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


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def norm_affine(
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
        self._scale, self._shift = norm_affine(mean, std, self.device)

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
        check_batch_size(batch_size)
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
        return CIFAR_PAD if self.info.image_size == self.images.shape[-1] else 0

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


class LoaderSplit(Split):
    """A split streamed through a ``torch.utils.data.DataLoader``: data too big to hold on
    the device (an image folder, a user's Dataset). A subclass says what one epoch reads
    (:meth:`_epoch_dataset`) and how a batch it yields reaches the model (:meth:`_on_device`);
    shuffling, workers and pinning are the same for all and live here."""

    def __init__(self, info: DatasetInfo, device: torch.device, loader_workers: int = 0) -> None:
        self.info = info
        self.device = device
        self.loader_workers = loader_workers

    @abc.abstractmethod
    def _epoch_dataset(self, generator: torch.Generator | None) -> torch.utils.data.Dataset:
        """What one pass reads; it may draw from ``generator`` (before the DataLoader does)."""

    @abc.abstractmethod
    def _on_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch of the DataLoader as the model takes it, on the split's device."""

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        drop_last: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        check_batch_size(batch_size)
        dl = torch.utils.data.DataLoader(
            self._epoch_dataset(generator),
            batch_size=batch_size,
            shuffle=generator is not None,
            generator=generator,
            drop_last=drop_last,
            num_workers=self.loader_workers,
            pin_memory=self.device.type == "cuda",
        )
        for x, y in dl:
            yield self._on_device(x, y)
