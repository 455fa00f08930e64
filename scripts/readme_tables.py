"""Rewrite the option tables of the documentation (README.md, docs/*.md) from the
declarations (easgd_local/readme.py).

    .venv/bin/python scripts/readme_tables.py          # rewrite them in place
    .venv/bin/python scripts/readme_tables.py --check  # exit 1 if they differ
"""

import sys
from pathlib import Path

from easgd_local.readme import documents, placed, rewritten, tables

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    texts = {path: path.read_text() for path in documents(ROOT)}
    misplaced = {name: docs for name, docs in placed({str(p): t for p, t in texts.items()}).items()
                 if len(docs) != 1}
    if misplaced:
        for name, docs in misplaced.items():
            print(f"the <!-- options:{name} --> table is in {len(docs)} documents, not one: "
                  f"{', '.join(docs) or 'none'}", file=sys.stderr)
        return 1
    generated = tables()
    stale = [path for path, text in texts.items() if rewritten(text, generated) != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path.relative_to(ROOT)}: option tables differ from the declarations; run "
                  "scripts/readme_tables.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(rewritten(texts[path], generated))
        print(f"{path.relative_to(ROOT)}: option tables rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
