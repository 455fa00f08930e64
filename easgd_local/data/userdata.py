"""A user's data set: ``--dataset module:factory``.

The factory returns the training and test sets, either as two map-style
``torch.utils.data.Dataset`` of ``(input, label)``, or as four tensors
``(X_train, y_train, X_test, y_test)``. It may take ``data_dir`` and ``image_size`` keyword
arguments, and is given them when it does.

Tensors are used as given (as float32 inputs, int64 labels). Those that fit (a quarter of the
device's free memory, shared by the workers on it) are held on each worker's device like the
built-in sets; others, and Datasets, go through a DataLoader (``--loader-workers``).

NaN or infinite inputs are refused in one line before anything starts (every sample of tensors,
the first CHECKED_SAMPLES of each Dataset).

The number of classes is the largest label + 1 (from ``classes`` or ``targets`` of a Dataset
where it has them; otherwise every label is read once, in the main process).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.data

from ..config import ConfigError
from .base import DatasetInfo
from .splits import LoaderSplit, Split

_CACHE: dict[str, tuple[Any, Any, DatasetInfo]] = {}  # one factory call per process and spec


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not torch.is_tensor(obj)


def _labels(ds: Any) -> torch.Tensor:
    if torch.is_tensor(ds):
        return ds
    for attr in ("targets", "labels"):
        value = getattr(ds, attr, None)
        if value is not None:
            return torch.as_tensor(value)
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))])


def _sample_shape(x: Any) -> tuple[int, ...]:
    return tuple(torch.as_tensor(x).shape)


def _info(spec: str, shape: tuple[int, ...], labels: list[torch.Tensor], train_size: int) -> DatasetInfo:
    for y in labels:
        if y.numel() and (y.dtype.is_floating_point or int(y.min()) < 0):
            raise ConfigError(f"--dataset {spec}: labels must be integers >= 0 (class indices)")
    classes = max(int(y.max()) + 1 for y in labels if y.numel())
    distinct = int(torch.unique(torch.cat([y.reshape(-1).long() for y in labels])).numel())
    channels, size = (shape[0], shape[-1]) if len(shape) == 3 else (0, 0)
    return DatasetInfo(spec, classes, channels, size, train_size, distinct)


def load(spec: str, data_dir: Any = None, image_size: int | None = None) -> tuple[Any, Any, DatasetInfo]:
    """(train, test, info) from the factory named ``spec``, called once per process."""
    if spec not in _CACHE:
        from ..user import call_with_known, import_spec

        factory = import_spec(spec, "--dataset")
        result = call_with_known(factory, "--dataset", data_dir=data_dir, image_size=image_size)
        _CACHE[spec] = _check(spec, result)
    return _CACHE[spec]


def _check(spec: str, result: Any) -> tuple[Any, Any, DatasetInfo]:
    what = ("a data factory returns (train, test) Datasets of (input, label), or tensors "
            "(X_train, y_train, X_test, y_test)")
    if isinstance(result, (tuple, list)) and len(result) == 4 and all(torch.is_tensor(t) for t in result):
        x_train, y_train, x_test, y_test = result
        for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
            if x.dim() < 2 or y.dim() != 1 or len(x) != len(y) or len(x) == 0:
                raise ConfigError(f"--dataset {spec}: X_{split} {tuple(x.shape)} and y_{split} "
                                  f"{tuple(y.shape)} are not one label per sample; {what}")
        if x_train.shape[1:] != x_test.shape[1:]:
            raise ConfigError(f"--dataset {spec}: train and test samples differ in shape "
                              f"({tuple(x_train.shape[1:])} and {tuple(x_test.shape[1:])})")
        x_train, x_test = x_train.float(), x_test.float()  # as trained (1e300 is inf here)
        for x, split in ((x_train, "train"), (x_test, "test")):
            _refuse_non_finite(spec, f"X_{split}", _first_non_finite(x))
        info = _info(spec, tuple(x_train.shape[1:]), [y_train, y_test], len(x_train))
        return (x_train, y_train.long()), (x_test, y_test.long()), info
    if isinstance(result, (tuple, list)) and len(result) == 2 and all(_is_dataset(d) for d in result):
        train, test = result
        if len(train) == 0 or len(test) == 0:
            raise ConfigError(f"--dataset {spec}: an empty data set ({len(train)} training and "
                              f"{len(test)} test samples)")
        try:
            shape = _sample_shape(train[0][0])
            labels = [_labels(train), _labels(test)]
        except Exception as e:
            raise ConfigError(f"--dataset {spec}: reading a sample failed: {type(e).__name__}: "
                              f"{' '.join(str(e).split())}"[:300]) from None
        for ds, split in ((train, "training"), (test, "test")):
            _refuse_non_finite(spec, f"the {split} set", _first_non_finite_sample(spec, ds))
        return train, test, _info(spec, shape, labels, len(train))
    raise ConfigError(f"--dataset {spec} returned {type(result).__name__}; {what}")


# Samples of a Dataset read in the main process for NaN or infinite inputs (tensors are read
# whole); NaN further on shows in training as divergences, and a run that keeps diverging fails.
CHECKED_SAMPLES = 64
CHECK_ROWS = 4096  # samples per slice of a tensor checked at once (bounds the check's memory)


def _first_non_finite(x: torch.Tensor) -> int | None:
    """The index of the first sample of ``x`` holding NaN or an infinity; None if none does."""
    if not x.is_floating_point():
        return None
    for start in range(0, len(x), CHECK_ROWS):
        chunk = x[start:start + CHECK_ROWS]
        finite = torch.isfinite(chunk).reshape(len(chunk), -1).all(1)
        if not bool(finite.all()):
            return start + int((~finite).nonzero()[0])
    return None


def _first_non_finite_sample(spec: str, ds: Any) -> int | None:
    """The first of the first CHECKED_SAMPLES inputs of a Dataset that is not finite."""
    for i in range(min(len(ds), CHECKED_SAMPLES)):
        try:
            x = torch.as_tensor(ds[i][0])
        except Exception as e:
            raise ConfigError(f"--dataset {spec}: reading sample {i} failed: {type(e).__name__}: "
                              f"{' '.join(str(e).split())}"[:300]) from None
        if _first_non_finite(x.reshape(1, -1).float()) is not None:
            return i
    return None


def _refuse_non_finite(spec: str, what: str, index: int | None) -> None:
    if index is not None:
        raise ConfigError(f"--dataset {spec}: {what} holds NaN or infinite inputs (sample {index} "
                          "is the first); a model cannot learn from them: fix or drop those "
                          "samples")


def _fits(x: torch.Tensor, device: torch.device) -> bool:
    """Whether holding ``x`` on ``device`` leaves room (a quarter of what is free)."""
    size = x.numel() * 4
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return size <= free / 4
    from ..config import resources

    available = resources.available_memory()
    return available is None or size <= available / 4


class TensorDataSplit(Split):
    """A user's tensors, held whole on the device; batches are index gathers."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo, device: torch.device):
        self.x, self.y = x.to(device), y.to(device)
        self.info, self.device = info, device

    def __len__(self) -> int:
        return len(self.y)

    def _take(self, indices: torch.Tensor) -> "TensorDataSplit":
        idx = indices.to(self.device)
        return TensorDataSplit(self.x.index_select(0, idx), self.y.index_select(0, idx), self.info, self.device)

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                drop_last: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        stop = (n // batch_size) * batch_size if drop_last else n
        order = (torch.randperm(n, generator=generator).to(self.device) if generator is not None
                 else torch.arange(n, device=self.device))
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)


class DatasetSplit(LoaderSplit):
    """A user's Dataset (or tensors too large to hold), through a DataLoader."""

    def __init__(self, dataset: Any, info: DatasetInfo, device: torch.device, loader_workers: int):
        super().__init__(info, device, loader_workers)
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def _take(self, indices: torch.Tensor) -> "DatasetSplit":
        return DatasetSplit(torch.utils.data.Subset(self.dataset, indices.tolist()), self.info,
                            self.device, self.loader_workers)

    def _epoch_dataset(self, generator: torch.Generator | None) -> Any:
        return self.dataset

    def _on_device(self, x: torch.Tensor, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return (x.to(self.device, non_blocking=True).float(),
                torch.as_tensor(y).to(self.device, non_blocking=True).long())


def split(spec: str, train: bool, device: torch.device, loader_workers: int,
          data_dir: Any = None, image_size: int | None = None) -> Split:
    train_part, test_part, info = load(spec, data_dir, image_size)
    part = train_part if train else test_part
    if isinstance(part, tuple):
        x, y = part
        if _fits(x, device):
            return TensorDataSplit(x, y, info, device)
        part = torch.utils.data.TensorDataset(x, y)
    return DatasetSplit(part, info, device, loader_workers)


__all__ = ["DatasetSplit", "TensorDataSplit", "load", "split"]
