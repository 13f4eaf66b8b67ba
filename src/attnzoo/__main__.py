"""``python -m attnzoo``: the ``attnzoo`` command (see :mod:`attnzoo.cli`)."""

import sys

from .cli import main

sys.exit(main())
