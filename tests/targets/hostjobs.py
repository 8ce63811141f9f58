"""Worker targets for the several-hosts tests: ``targets.hostjobs:<name>``."""

from __future__ import annotations

import os
import signal


def job(bus) -> None:
    """Says each graceful, and each SIGUSR1, in its log (the parent's `multibus logs` shows
    it)."""
    host = os.environ.get("MB_HOST", "?")
    bus.subscribe("graceful", lambda: bus.log(f"graceful on {host}"))
    # the handler only defers: the main thread logs it once it is back in block()
    signal.signal(signal.SIGUSR1, lambda signum, frame: bus.defer(
        lambda: bus.log(f"SIGUSR1 on {host}")))
