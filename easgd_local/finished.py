"""A finished run read back: its saved configuration (config.json), and its model (center.pt)
evaluated again on its test data by the run's own evaluator (evaluate.Evaluator on the whole
test set, as the run's final evaluation), so the figures are those of its summary.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from .evaluate import Evaluation

log = logging.getLogger(__name__)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def saved_config(run_dir: Path, label: str, config_dir: Path | None = None) -> TrainConfig:
    """The configuration a run saved in ``config_dir`` (default: the run's directory);
    ConfigError in one line, starting with ``label``, when there is none to read."""
    where = (config_dir or run_dir) / "config.json"
    try:
        text = where.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{label}: no config.json in {where.parent}; is it a run "
                          "directory?") from None
    except OSError as e:
        raise ConfigError(f"{label}: cannot read {where} ({e.strerror or e}); is it a run "
                          "directory?") from None
    try:
        return TrainConfig.from_dict(json.loads(text))
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"{label}: {where} is unreadable ({_one_line(str(e))})") from None


def evaluate_run(run_dir: Path, dataset: str | None = None,
                 data_dir: Path | None = None) -> "Evaluation":
    """Test loss and accuracy of the model in ``run_dir``/center.pt on the run's test data (or
    ``dataset`` in ``data_dir``), on the CPU; ConfigError in one line for a directory that
    holds no finished run or a center.pt that is unreadable or not of the run's model."""
    import torch

    from .data import prepare_dataset
    from .evaluate import Evaluator
    from .models import model_input_size

    label = f"evaluate {run_dir}"
    config = saved_config(run_dir, label)
    config.dataset = dataset or config.dataset
    config.data_dir = data_dir or config.data_dir
    center = run_dir / "center.pt"
    if not center.is_file():
        raise ConfigError(f"{label}: no center.pt; the run has not finished")
    info = prepare_dataset(config.dataset, config.data_dir, False, config.image_size)
    evaluator = Evaluator(config, model_input_size(config.model, info.image_size))
    try:
        state = torch.load(center, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated zip, unpickling error: whatever torch.load raises
        raise ConfigError(f"{label}: {center} is unreadable ({type(e).__name__}: "
                          f"{_one_line(str(e))[:200]})") from None
    try:
        # The module's parameters and buffers are views of the evaluator's flat state.
        evaluator.state.module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ConfigError(f"{label}: {center} is not a state of --model {config.model} "
                          f"({_one_line(str(e))[:200]})") from None
    return evaluator.evaluate(evaluator.state.flat.clone())
