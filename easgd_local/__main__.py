import sys

from easgd_local.cli import main

sys.exit(main())
