"""Worker targets for the log file and recycling tests: ``targets.chatty:<name>``."""

from __future__ import annotations

import os
import sys

_HELD: list[bytes] = []  # what hog() allocated, kept alive


def lines(bus) -> None:
    """Once started, print $MB_LINES numbered lines (default 20) on stdout, then 'done'."""
    name = os.environ.get("MULTIBUS_WORKER", "?")

    def start() -> None:
        for i in range(int(os.environ.get("MB_LINES", "20"))):
            sys.stdout.write(f"{name} line {i}\n")
        sys.stdout.write(f"{name} done\n")
        sys.stdout.flush()

    bus.subscribe("start", start)


def hog(bus) -> None:
    """The first worker to start (no file $MB_HOG_MARK yet) allocates $MB_HOG_MB MiB and
    keeps it; the ones after it (its replacement) do not."""

    def start() -> None:
        mark = os.environ["MB_HOG_MARK"]
        try:
            fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        _HELD.append(b"\x01" * (int(os.environ.get("MB_HOG_MB", "100")) << 20))
        print(f"allocated {len(_HELD[0]) >> 20} MiB", flush=True)

    bus.subscribe("start", start)
