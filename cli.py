"""Run the command line from a checkout: `python cli.py train ...` is `easgd-local train ...`.

A thin shim onto easgd_local.__main__; it is not installed (the package's console script is).
"""

import sys

if __name__ == "__main__":
    from easgd_local.__main__ import main

    sys.exit(main())
