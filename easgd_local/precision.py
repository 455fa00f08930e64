"""--precision: the worker's forward and loss under autocast, and for fp16 a gradient scaler.

Only the compute is lowered. Parameters, their gradients (views into the flat buffer, see
flat.py), the momentum, the center, every exchange and every checkpoint stay float32: autocast
casts copies of the weights for the ops that run in bf16 or fp16 and the gradients flow back
into the float32 parameters. bf16 has float32's range; fp16 has not, so its loss is scaled
(torch.amp.GradScaler, one per worker) so that small gradients do not flush to zero, and a step
whose scaled gradients overflowed is skipped while the scale is lowered, as PyTorch's own
``scaler.step(optimizer)`` does.

This module imports nothing of the package.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# --precision -> the autocast dtype; None: no autocast (config.PRECISIONS lists the names).
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                         "fp16": torch.float16}


def unsupported(precision: str, device: str) -> str | None:
    """Why ``precision`` cannot run on ``device`` with this torch, in one line; None if it can
    (or if there is nothing here to ask: a CUDA device on a machine without CUDA is refused by
    the device check)."""
    dtype = DTYPES[precision]
    if dtype is None:
        return None
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            return None
        index = torch.device(device).index or 0
        if dtype is torch.bfloat16 and torch.cuda.get_device_capability(index) < (8, 0):
            return f"{device} has no bfloat16 (compute capability 8.0 or newer); use fp16"
        return None
    if not _autocasts(kind, dtype):
        return f"this torch ({torch.__version__}) cannot autocast to {precision} on {kind}"
    return None


def _autocasts(kind: str, dtype: torch.dtype) -> bool:
    """Whether a matmul under autocast on this kind of device comes out in ``dtype`` (and, for
    fp16, a gradient scaler exists for it)."""
    if not torch.amp.is_autocast_available(kind):
        return False
    try:
        with warnings.catch_warnings():
            # An unsupported dtype is a warning, and autocast then turns itself off: the
            # output's dtype tells.
            warnings.simplefilter("ignore")
            with torch.autocast(kind, dtype=dtype):
                out = torch.ones(2, 2, device=kind) @ torch.ones(2, 2, device=kind)
            if dtype is torch.float16:
                torch.amp.GradScaler(kind)
    except (RuntimeError, ValueError, AttributeError):
        return False
    return out.dtype == dtype


class _Gradients(torch.optim.Optimizer):
    """The model's parameters as GradScaler wants them: it unscales and checks the gradients
    through an optimizer's param groups, and calls its step() only when all are finite. The
    worker makes the local step itself (rules.local_step_ on the flat buffer), so step() only
    records that it may."""

    def __init__(self, parameters: Iterable[Tensor]):
        super().__init__(list(parameters), {})
        self.finite = False

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self.finite = True


class Precision:
    """One worker's precision: :meth:`autocast` around its forward and loss, :meth:`backward`
    for the loss (scaled for fp16)."""

    def __init__(self, precision: str, device: torch.device, parameters: Iterable[Tensor]):
        self.name = precision
        self.dtype = DTYPES[precision]
        self.device_type = device.type
        fp16 = self.dtype is torch.float16
        self.scaler = torch.amp.GradScaler(device.type) if fp16 else None
        self._gradients = _Gradients(parameters) if fp16 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to this precision's dtype on the worker's kind of device; nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: Tensor) -> bool:
        """The gradients of ``loss`` in the parameters' .grad, unscaled. False: they are not
        finite and the local step is to be skipped (fp16 only, whose scale is then lowered;
        the check waits for the device, as PyTorch's scaler.step does)."""
        if self.scaler is None or self._gradients is None:
            loss.backward()
            return True
        self.scaler.scale(loss).backward()
        self._gradients.finite = False
        self.scaler.step(self._gradients)  # unscale_, then step() only if every one is finite
        self.scaler.update()
        if not self._gradients.finite:
            log.debug("fp16 gradients overflowed: step skipped, loss scale now %g",
                      self.scaler.get_scale())
        return self._gradients.finite
