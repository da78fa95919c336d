"""``python -m nograd``: the same as the ``nograd`` command."""

import sys

from nograd.cli import main

sys.exit(main())
