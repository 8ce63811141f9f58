"""Worker targets for the several-hosts tests: ``targets.hostjobs:<name>``."""

from __future__ import annotations

import os


def job(bus) -> None:
    """Says each graceful in its log (the parent's `multibus logs` shows it)."""
    host = os.environ.get("MB_HOST", "?")
    bus.subscribe("graceful", lambda: bus.log(f"graceful on {host}"))
