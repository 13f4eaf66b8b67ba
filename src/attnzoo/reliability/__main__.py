"""``python -m attnzoo.reliability [NAME ...] [--slow] [--import MODULE] [--json PATH]``."""

from .runner import main

raise SystemExit(main())
