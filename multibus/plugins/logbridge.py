"""LogBridge: forward the bus 'log' channel to a stdlib ``logging.Logger``, keeping the level.

The bus already appends traceback text to ``msg`` when asked (``bus.log(..., traceback=True)``),
so records are logged as-is. A per-thread guard drops re-entrant calls, so a logging handler
that itself logs on the bus cannot recurse forever.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .base import SimplePlugin


class LogBridge(SimplePlugin):
    """Subscribe to 'log' and call ``logger.log(level, msg)``; default logger ``'multibus'``."""

    channels = ("log",)

    def __init__(self, bus: Any, logger: logging.Logger | str | None = None) -> None:
        super().__init__(bus)
        if logger is None or isinstance(logger, str):
            logger = logging.getLogger(logger or "multibus")
        self.logger = logger
        self._local = threading.local()

    def log(self, msg: str, level: int = logging.INFO) -> None:
        """The 'log' listener."""
        if getattr(self._local, "busy", False):
            return
        self._local.busy = True
        try:
            if not isinstance(level, int):
                level = logging.getLevelName(str(level)) if str(level).isupper() else logging.INFO
                level = level if isinstance(level, int) else logging.INFO
            if self.logger.isEnabledFor(level):
                self.logger.log(level, "%s", msg)
        finally:
            self._local.busy = False
