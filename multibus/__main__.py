"""``python -m multibus``: the ``multibus`` command (see :mod:`multibus.cli`)."""

from multibus.cli import console

console()
