"""``python -m rgnn``: the command line."""

import sys

from rgnn.cli import main

sys.exit(main())
