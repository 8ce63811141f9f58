"""``python -m multibus``: the ``multibus`` command (see :mod:`multibus.cli`)."""

import sys

from multibus.cli import main

sys.exit(main())
