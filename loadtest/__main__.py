"""``python -m loadtest`` = ``camex-loadtest``."""

import sys

from loadtest.cli import main

sys.exit(main())
