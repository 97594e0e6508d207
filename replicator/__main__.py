"""``python -m replicator``."""

import sys

from .cli import main

sys.exit(main())
