"""Test loss and accuracy of flat state vectors (snapshots of the center), in the foreground or
in a low-priority thread while training goes on."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import TrainConfig
from .flat import flatten_

log = logging.getLogger(__name__)


class Evaluator:
    """Holds the test split and one model whose flat state is overwritten by each snapshot."""

    def __init__(self, config: TrainConfig, image_size: int, device: torch.device | str = "cpu"):
        from .data import load_split
        from .models import build_model

        self.device = torch.device(device)
        self.data = load_split(config.dataset, config.data_dir, train=False, device=self.device,
                               image_size=image_size)
        self.state = flatten_(build_model(config.model, self.data.info), self.device)
        self.batch_size = config.eval_batch_size

    @torch.no_grad()
    def evaluate(self, flat: Tensor, cancel: threading.Event | None = None) -> tuple[float, float]:
        """(mean test loss, test accuracy) of the model whose flat state is ``flat``.

        ``cancel`` is checked between batches: once set, Cancelled is raised."""
        model = self.state.module
        self.state.flat.copy_(flat)
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        count = 0
        for x, y in self.data.batches(self.batch_size, drop_last=False):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            count += y.numel()
        return loss_sum.item() / max(count, 1), correct.item() / max(count, 1)

    def state_dict(self, flat: Tensor) -> dict[str, Tensor]:
        """A plain state_dict of the model holding ``flat``, on the CPU, for ``torch.save``."""
        self.state.flat.copy_(flat)
        return {k: v.detach().cpu().clone() for k, v in self.state.module.state_dict().items()}


class Cancelled(Exception):
    pass


class BackgroundEvaluator:
    """Evaluates snapshots of the center in a low-priority thread while the workers train.

    The main loop only takes snapshots (a copy of the center) on its cadence, so the time axis
    of the metrics is exact; the evaluation itself runs at a raised nice value, so on a machine
    whose cores all train (CPU workers) it takes what the workers leave over instead of slowing
    them down. Snapshots wait in a bounded backlog; what is left when training ends is
    evaluated then, outside the measured training time.
    """

    NICE = 5  # CPU weight ~1/3 of a worker's while they compete for a core
    BACKLOG_BYTES = 256 * 2**20

    def __init__(self, evaluator: Evaluator, on_record: Callable[[dict[str, Any]], None],
                 deferred: bool = False):
        self.evaluator, self.on_record = evaluator, on_record
        numel = evaluator.state.flat.numel()
        self.queue: queue.Queue = queue.Queue(maxsize=max(2, self.BACKLOG_BYTES // (4 * numel)))
        self.error: BaseException | None = None
        self.cancel = threading.Event()
        # Deferred: nothing is evaluated until drain(), so the workers have every core to
        # themselves while they train (the snapshots still carry their exact times).
        self.go = threading.Event()
        if not deferred:
            self.go.set()
        self.thread = threading.Thread(target=self._loop, name="easgd-evaluator", daemon=True)
        self.thread.start()

    def submit(self, snapshot: Tensor, meta: dict[str, Any]) -> bool:
        """Queue a snapshot with its record fields; False (and dropped) when the backlog is full."""
        if self.error is not None:
            raise self.error
        try:
            self.queue.put_nowait((snapshot, meta))
            return True
        except queue.Full:
            log.debug("evaluation backlog full; snapshot at %.1f s skipped", meta.get("seconds", 0))
            return False

    def drain(self) -> None:
        """Evaluate everything queued, then stop the thread. Re-raises an evaluation error."""
        self.go.set()
        self.queue.put((None, None))
        self.thread.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop the thread, discarding what is queued (the run failed or was interrupted)."""
        self.cancel.set()  # an evaluation under way stops at its next batch
        self.go.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.queue.put((None, None))
        self.thread.join()

    def _loop(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.NICE)
        except (AttributeError, OSError):  # not Linux: a thread's priority is not its own
            pass
        self.go.wait()
        while True:
            snapshot, meta = self.queue.get()
            if snapshot is None or self.cancel.is_set():
                return
            try:
                loss, acc = self.evaluator.evaluate(snapshot, self.cancel)
                self.on_record({**meta, "test_loss": loss, "test_accuracy": acc})
            except Cancelled:
                return
            except BaseException as e:  # handed to the main thread by submit()/drain()
                self.error = e
                return
