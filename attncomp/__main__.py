"""``python -m attncomp``: the command line (:mod:`attncomp.cli`)."""

import sys

from .cli import main

sys.exit(main())
