"""--fault: the faults a run can inject, and their spelling (checked by the configuration,
fired by the worker)."""

from __future__ import annotations

import math

FAULT_KINDS = ("exit", "kill", "kill-in-lock", "stop-in-lock", "nan", "hang", "raise", "drift",
               "slow", "pause")
FAULT_VALUED = ("drift", "slow", "pause")  # the kinds that take a value (kind:X); others none


def parse_fault(item: str) -> tuple[int, int, str]:
    """"rank:step:kind[:value]" -> (rank, step, kind); ValueError with one line if malformed."""
    parts = item.strip().split(":", 2)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ValueError(f"a fault is rank:step:kind (got {item!r})")
    kind = parts[2]
    name, _, value = kind.partition(":")
    if name not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {name!r} in {item!r}; one of {', '.join(FAULT_KINDS)}")
    if name not in FAULT_VALUED and kind != name:
        raise ValueError(f"fault {name} takes no value (got {item!r}); write rank:step:{name}")
    if name in FAULT_VALUED:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"fault {name} needs a number ({name}:X) (got {item!r})") from None
        if not math.isfinite(number) or (name != "drift" and number <= 0):
            raise ValueError(f"fault {name} needs a finite positive number (got {item!r})")
    return int(parts[0]), int(parts[1]), kind
