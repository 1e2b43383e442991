"""``python -m attncomp``: the command line (:mod:`attncomp.cli`)."""

import sys

from attncomp.cli import main

sys.exit(main())
