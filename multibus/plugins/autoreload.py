"""Autoreloader: restart the process (``bus.restart()``) when a watched file changes.

Polls module file mtimes in a Monitor thread, like CherryPy's, with ``files`` (extra paths) and
``match`` (regex on module names). Differences: the baseline is taken when the monitor starts
(CherryPy takes it at the first poll, missing edits made meanwhile); any mtime change counts,
not only a newer one (a ``git checkout`` can bring an older file); a file that disappears counts.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from .tasks import Monitor

_startup_cwd = os.getcwd()  # relative module paths are resolved against this (CherryPy #917)


class Autoreloader(Monitor):
    """Monitor that calls ``bus.restart()`` when a module file or one of ``files`` changes."""

    def __init__(self, bus: Any, frequency: float = 1, match: str = ".*") -> None:
        self.mtimes: dict[str, float | None] = {}
        self.files: set[str] = set()
        self.match = match
        super().__init__(bus, self.run, frequency)

    def start(self) -> None:
        """Take the mtime baseline, then start polling."""
        if self.thread is None:
            self.mtimes = {f: self._mtime(f) for f in self._watched()}
        super().start()

    start.priority = 70  # type: ignore[attr-defined]

    def sysfiles(self) -> set[str]:
        """Files of loaded modules whose names match ``match``."""
        pattern = re.compile(self.match)
        found = set()
        for name, module in list(sys.modules.items()):
            if module is None or not pattern.match(name):
                continue
            path = getattr(getattr(module, "__loader__", None), "archive", None)
            if path is None:
                path = getattr(module, "__file__", None)
            if path:
                found.add(path if os.path.isabs(path)
                          else os.path.normpath(os.path.join(_startup_cwd, path)))
        return found

    def _watched(self) -> set[str]:
        names = set()
        for f in self.sysfiles() | set(self.files):
            if f:
                names.add(f[:-1] if f.endswith(".pyc") else f)
        return names

    @staticmethod
    def _mtime(filename: str) -> float | None:
        try:
            return os.stat(filename).st_mtime
        except OSError:
            return None

    def run(self) -> None:
        """One poll: restart the bus if a watched file's mtime changed or it vanished."""
        for filename in sorted(self._watched()):
            mtime = self._mtime(filename)
            if filename not in self.mtimes:
                self.mtimes[filename] = mtime  # newly imported/added: baseline now
                continue
            old = self.mtimes[filename]
            if old is None:
                continue  # never had a file (built-in, namespace...): nothing to watch
            if mtime != old:
                self.bus.log(f"Restarting because {filename} changed.")
                thread = self.thread
                if thread is not None:
                    thread.cancel()
                self.bus.restart()
                return
