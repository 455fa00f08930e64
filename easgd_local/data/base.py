"""What every part of the data package shares: the one-line :class:`DataError`,
:class:`DatasetInfo` and the folding of torchvision's errors onto one line."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field


class DataError(ValueError):
    """A data problem the user can fix (missing files, bad name); ``str()`` is one line."""

    def __init__(self, message: str) -> None:
        # The CLI prints this message as is; multi-line text from torchvision would
        # spill over the terminal, so fold it onto one line here once for all callers.
        super().__init__(one_line(message))


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


# The exceptions torchvision and its readers raise for absent, truncated or corrupt
# files; anything else is a bug and should surface as a traceback.
READ_ERRORS = (
    RuntimeError, OSError, EOFError, ValueError, TypeError, KeyError, IndexError,
    AssertionError, pickle.UnpicklingError,
)


def one_line(text: str) -> str:
    parts = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " | ".join(parts)


def brief(exc: BaseException, limit: int = 300) -> str:
    # The whole message folded onto one line, not just its first line: torchvision's
    # download errors put the actual cause (the URL error) on later lines.
    text = one_line(str(exc)) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
