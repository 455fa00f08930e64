"""One declaration per setting: its flag, help, default, kind, range and what it concerns.

A dataclass field carries its :class:`Setting` in its metadata (``setting(...)`` below); from
those declarations come the checks of type and range (:func:`problem`), the command line's
flags (cli.py), which settings a resume may change and which may differ between boxes, and the
README's option tables (:func:`markdown_table`). This module imports nothing of the package.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METADATA_KEY = "setting"

# What a setting is about: the README groups its tables by concern, and each command maps a
# concern to a panel of its --help (cli.py).
CONCERNS = ("algorithm", "stop", "data", "system", "evaluation", "checkpoint", "boxes", "output",
            "bench")


@dataclass(frozen=True)
class Setting:
    """One setting. ``flag`` is its command-line spelling ("--eval-budget"; a switch pair is
    "--lock/--no-lock"; a bool with one flag is a switch that turns it on); "" for an internal
    setting that has no flag (its checks still apply, named by its field)."""

    flag: str
    help: str = ""  # one sentence; {name} fields are filled from the registry (cli.help_facts)
    default: Any = None
    default_text: str = ""  # the default in words, where it is resolved later ("one per device")
    kind: type = str  # int, float, str, bool, Path or list (a list is comma-separated on the CLI)
    bounds: str = ""  # the range: "> 0", ">= 1", "(0, 1]", "[0, 2^32)"; "" for none
    choices: tuple[str, ...] = ()
    concern: str = "system"
    resumable: bool = False  # may change on --resume
    per_box: bool = False  # may differ between the boxes of --multi-node
    aliases: tuple[str, ...] = ()  # further spellings, e.g. "-q"
    unit: str = ""  # the unit of a one-sided range in messages, e.g. "seconds"
    note: str = ""  # a further remark, in the README's table only

    def __post_init__(self) -> None:
        if self.concern not in CONCERNS:
            raise ValueError(f"unknown concern {self.concern!r} of {self.flag or 'a setting'}")
        if self.bounds:
            _bounds(self.bounds)  # a malformed range fails at import, not at the first check

    @property
    def internal(self) -> bool:
        return not self.flag

    @property
    def label(self) -> str:
        """How messages name it: its (first) flag."""
        return self.flag.split("/")[0]


def setting(default: Any = None, **declaration: Any) -> Any:
    """A dataclass field declared by a :class:`Setting`."""
    return _field(Setting(default=default, **declaration))


def _field(declared: Setting) -> Any:
    """A dataclass field carrying ``declared`` (a list default is copied per instance)."""
    default = declared.default
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={METADATA_KEY: declared})
    return dataclasses.field(default=default, metadata={METADATA_KEY: declared})


def internal(default: Any = None, **declaration: Any) -> Any:
    """A field that is not a flag, with the checks and properties of a declaration."""
    return setting(default, flag="", **declaration)


def reuse(declared: Setting, **changes: Any) -> Any:
    """A field declared by ``declared`` itself, or with ``changes`` (another command's own
    default or help) a declaration of its own that keeps the rest (flag, kind, range)."""
    return _field(dataclasses.replace(declared, **changes) if changes else declared)


def declarations(cls: Any) -> dict[str, Setting]:
    """The fields of a dataclass that carry a Setting: field name -> Setting, in field order."""
    return {f.name: f.metadata[METADATA_KEY] for f in dataclasses.fields(cls)
            if METADATA_KEY in f.metadata}


def flags(settings: dict[str, Setting]) -> dict[str, Setting]:
    """Only those with a flag."""
    return {name: s for name, s in settings.items() if not s.internal}


# -- ranges and checks -------------------------------------------------------------------------

_ONE_SIDED = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")


def _number(text: str) -> float:
    if "^" in text:
        base, _, power = text.partition("^")
        return int(base) ** int(power)
    return int(text) if re.fullmatch(r"-?\d+", text) else float(text)


@functools.lru_cache(maxsize=None)
def _bounds(text: str) -> tuple[float, bool, float, bool]:
    """(low, low_open, high, high_open) of a range as written in a declaration."""
    one = _ONE_SIDED.match(text)
    if one:
        op, value = one.group(1), _number(one.group(2))
        if op.startswith(">"):
            return value, op == ">", math.inf, False
        return -math.inf, False, value, op == "<"
    both = _INTERVAL.match(text)
    if not both:
        raise ValueError(f"malformed range {text!r}; write e.g. '> 0', '>= 1' or '(0, 1]'")
    opening, low, high, closing = both.groups()
    return _number(low), opening == "(", _number(high), closing == ")"


def within(value: float, bounds: str) -> bool:
    """Whether ``value`` lies in the range (NaN never does)."""
    low, low_open, high, high_open = _bounds(bounds)
    return bool((value > low if low_open else value >= low)
                and (value < high if high_open else value <= high))


def range_text(bounds: str, unit: str = "") -> str:
    """The range as messages and help say it: "in (0, 1]", ">= 1", "> 0 seconds"."""
    if _ONE_SIDED.match(bounds):
        return f"{bounds} {unit}".strip()
    return f"in {bounds}"


def problem(declared: Setting, value: Any, label: str | None = None) -> str | None:
    """What is wrong with ``value`` for this setting, in one line; None if nothing (or not
    given). Numbers are checked for their kind (a float also for NaN and inf, which no range
    catches), then any value for its choices and range."""
    if value is None:
        return None
    label = label or declared.label
    if declared.kind in (int, float):
        accepted = (int, float) if declared.kind is float else int
        if isinstance(value, bool) or not isinstance(value, accepted):
            kind = "a number" if declared.kind is float else "an integer"
            return f"{label} must be {kind} (got {value!r})"
        if declared.kind is float and not math.isfinite(value):
            return f"{label} must be a finite number (got {value})"
    if declared.choices and value not in declared.choices:
        return f"{label} must be one of {', '.join(declared.choices)} (got {value!r})"
    if declared.bounds and not within(value, declared.bounds):
        return f"{label} must be {range_text(declared.bounds, declared.unit)} (got {value})"
    return None


# -- text for --help and the README ------------------------------------------------------------

def help_text(declared: Setting, facts: dict[str, str] | None = None) -> str:
    """The help sentence with its registry facts filled in, and its range."""
    text = declared.help.format_map(facts) if facts else declared.help
    if declared.bounds:
        text += f" Must be {range_text(declared.bounds, declared.unit)}."
    return text


def default_text(declared: Setting) -> str:
    """The default in words: the declaration's text, else the value itself."""
    if declared.default_text:
        return declared.default_text
    value = declared.default
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def spellings(declared: Setting) -> str:
    return ", ".join(f"`{s}`" for s in (declared.flag, *declared.aliases))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def default_cell(declared: Setting) -> str:
    """The default for a markdown cell: a literal value (or a pattern such as a path with
    <placeholders>, which markdown would take for tags) as code."""
    text = default_text(declared)
    literal = (not declared.default_text and declared.default is not None
               and isinstance(declared.default, (str, Path, list, tuple)))
    return f"`{text}`" if literal or "<" in text else text


def meaning_cell(declared: Setting, facts: dict[str, str] | None = None) -> str:
    text = help_text(declared, facts)
    text = f"{text} {declared.note}" if declared.note else text
    return text.replace("<", "&lt;")


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A markdown table; cells are escaped for it."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def option_rows(settings: dict[str, Setting], facts: dict[str, str] | None = None,
                order: tuple[str, ...] = CONCERNS) -> list[tuple[str, ...]]:
    """(option, default, meaning) of every flag, grouped by concern in ``order``."""
    ordered = sorted(flags(settings).values(), key=lambda s: order.index(s.concern))
    return [(spellings(s), default_cell(s), meaning_cell(s, facts)) for s in ordered]
