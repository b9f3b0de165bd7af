"""`python -m ditmoe ...` is the same as the `ditmoe` command."""

import sys

from ditmoe.cli import main

sys.exit(main())
