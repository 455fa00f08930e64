"""Test loss and accuracy of a flat state vector (a snapshot of the center)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import TrainConfig
from .flat import flatten_


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
    def evaluate(self, flat: Tensor) -> tuple[float, float]:
        """(mean test loss, test accuracy) of the model whose flat state is ``flat``."""
        model = self.state.module
        self.state.flat.copy_(flat)
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        count = 0
        for x, y in self.data.batches(self.batch_size, drop_last=False):
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            count += y.numel()
        return loss_sum.item() / max(count, 1), correct.item() / max(count, 1)

    def state_dict(self, flat: Tensor) -> dict[str, Tensor]:
        """A plain state_dict of the model holding ``flat``, on the CPU, for ``torch.save``."""
        self.state.flat.copy_(flat)
        return {k: v.detach().cpu().clone() for k, v in self.state.module.state_dict().items()}
