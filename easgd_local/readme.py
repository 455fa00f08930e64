"""The documentation's option tables, generated from the declarations (settings.py, and each
algorithm's Options) by :func:`tables`. In the documents (README.md and docs/*.md) each table
sits between marker comments, ``<!-- options:NAME -->`` and ``<!-- /options:NAME -->``, once
in all of them; scripts/readme_tables.py rewrites them, and a test fails while a document's
differ from what :func:`tables` generates."""

from __future__ import annotations

import re
from pathlib import Path

from . import settings
from .algorithms import all_options
from .cli import BENCH_SETTINGS, TRAIN_SETTINGS, help_facts

HEADER = ("option", "default", "meaning")
BENCH_ORDER = ("bench", *(c for c in settings.CONCERNS if c != "bench"))


def algorithm_option_rows() -> list[tuple[str, ...]]:
    """(option, algorithms, default, meaning) of every algorithm option of the registry."""
    rows = []
    for option, users in all_options().values():
        declared = option.setting
        rows.append((settings.spellings(declared), ", ".join(f"`{u}`" for u in users),
                     settings.default_cell(declared), settings.meaning_cell(declared)))
    return rows


def tables() -> dict[str, str]:
    """Each README table by its marker name."""
    facts = help_facts(readme=True)
    bench_rows = settings.option_rows(BENCH_SETTINGS, facts, BENCH_ORDER)
    bench_rows.append(("algorithm options", "-", "Every option of the algorithm options' table "
                       "above, given to the algorithms of the bench that take it."))
    return {
        "train": settings.markdown_table(HEADER, settings.option_rows(TRAIN_SETTINGS, facts)),
        "algorithm-options": settings.markdown_table(
            ("option", "algorithms", "default", "meaning"), algorithm_option_rows()),
        "bench": settings.markdown_table(HEADER, bench_rows),
    }


def _block(name: str) -> re.Pattern[str]:
    name = re.escape(name)
    return re.compile(rf"(<!-- options:{name} -->\n)(.*?)(<!-- /options:{name} -->)", re.DOTALL)


def blocks(text: str) -> dict[str, str]:
    """The tables of a README's text by marker name (those that have their markers)."""
    found = {}
    for name in tables():
        match = _block(name).search(text)
        if match:
            found[name] = match.group(2).strip("\n") + "\n"
    return found


def documents(root: Path) -> list[Path]:
    """The documents that may hold option tables: README.md and docs/*.md of a checkout."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def rewritten(text: str, generated: dict[str, str] | None = None) -> str:
    """A document's text with every marked table it holds as generated."""
    for name, table in (tables() if generated is None else generated).items():
        # Blank lines around the table, so that no renderer takes a marker for one of its rows.
        text = _block(name).sub(lambda m: m.group(1) + "\n" + table + "\n" + m.group(3), text,
                                count=1)
    return text


def placed(texts: dict[str, str]) -> dict[str, list[str]]:
    """Which documents (by name) hold each table's markers: every table belongs in exactly one."""
    return {name: [doc for doc, text in texts.items() if _block(name).search(text)]
            for name in tables()}
