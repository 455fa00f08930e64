"""The ground floor of the configuration: its error and the defaults other settings name."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid setting; ``str(error)`` is one line meant for the user."""


DEFAULT_EPOCHS = 8.0  # the stop rule when none is given
DEFAULT_BETA = 0.9  # the moving rate beta = workers * alpha when neither is given
DEFAULT_MOMENTUM = 0.9  # used by the momentum algorithms when --momentum is not given
DEFAULT_BOX_TAU = 4  # --multi-node: exchanges of a box's center between two rounds between boxes
DEFAULT_BOX_BETA = 0.9  # --multi-node: the root's moving rate, beta_root = boxes * alpha_root
PRECISIONS = ("fp32", "bf16", "fp16")  # --precision (precision.py)
SCHEDULES = ("constant", "cosine", "step")  # --schedule (schedule.py)
DEFAULT_DECAY_FACTOR = 0.1  # --schedule step: the lr's factor at each of DEFAULT_DECAY_AT
DEFAULT_DECAY_AT = (0.5, 0.75)  # --schedule step: fractions of the budget of local steps
