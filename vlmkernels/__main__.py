"""``python -m vlmkernels``: the command line (:mod:`vlmkernels.cli`)."""

import sys

from .cli import main

sys.exit(main())
