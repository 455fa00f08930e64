"""Rewrite the option tables of README.md from the declarations (easgd_local/readme.py).

    .venv/bin/python scripts/readme_tables.py          # rewrite them in place
    .venv/bin/python scripts/readme_tables.py --check  # exit 1 if they differ
"""

import sys
from pathlib import Path

from easgd_local.readme import rewritten

README = Path(__file__).resolve().parent.parent / "README.md"


def main(argv: list[str]) -> int:
    text = README.read_text()
    new = rewritten(text)
    if "--check" in argv:
        if new != text:
            print("README.md's option tables differ from the declarations; run "
                  "scripts/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        README.write_text(new)
        print("README.md: option tables rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
