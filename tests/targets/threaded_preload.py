"""Imported by a zygote in the tests: starts a thread at import, which makes forking unsafe."""

from __future__ import annotations

import threading

_stop = threading.Event()
threading.Thread(target=_stop.wait, name="preload-thread", daemon=True).start()
