"""Test helper: a child process whose stdout/stderr lines are read by threads, with deadlines.

Used by tests/test_plugins_*.py (imported as ``progs.procio``); no sleeps, every wait has a
deadline, and ``close()`` kills and reaps whatever is left.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROGS = Path(__file__).resolve().parent


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, what: str | None = None,
             step: float = 0.005) -> Any:
    """Poll ``predicate`` until it returns something true or ``timeout`` passes; return its
    last value (so a test can both wait for a value and use it). With ``what``, a timeout
    raises AssertionError naming it instead."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            if not value and what is not None:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            return value
        time.sleep(step)


class Child:
    """``python <args>`` with line-buffered stdout/stderr collected in the background."""

    def __init__(self, *args: str, stdin: int | None = subprocess.DEVNULL,
                 env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *args], stdin=stdin, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read(self, stream, sink: list[str]) -> None:
        for line in stream:
            line = line.rstrip("\n")
            sink.append(line)
            if sink is self.stdout:
                self.lines.put(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, predicate: Callable[[str], bool] | str, timeout: float = 10.0) -> str:
        """Return the next stdout line matching (or starting with) ``predicate``."""
        if isinstance(predicate, str):
            prefix = predicate
            predicate = lambda line: line.startswith(prefix)  # noqa: E731
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching line within {timeout}s; stdout={self.stdout} "
                                     f"stderr={self.stderr[-20:]}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if predicate(line):
                return line

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def wait(self, timeout: float = 10.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pid {self.pid} still running after {timeout}s: "
                                 f"{self.describe()}") from None
        for t in self._readers:
            t.join(5)
        return code

    def describe(self) -> str:
        """What a stuck child is doing: its state, signal masks, each thread's wait channel,
        and its last output (for a failure message)."""
        parts = []
        try:
            with open(f"/proc/{self.pid}/status") as f:
                parts += [ln.strip() for ln in f
                          if ln.startswith(("State", "Threads", "SigPnd", "ShdPnd", "SigBlk",
                                            "SigIgn", "SigCgt"))]
            for tid in sorted(os.listdir(f"/proc/{self.pid}/task")):
                with open(f"/proc/{self.pid}/task/{tid}/wchan") as f:
                    parts.append(f"task {tid} wchan {f.read()}")
        except OSError as e:
            parts.append(f"/proc: {e}")
        return f"{'; '.join(parts)}; stdout={self.stdout[-10:]} stderr={self.stderr[-20:]}"

    def close(self) -> None:
        """Kill (if still running) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for t in self._readers:
            t.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prog(name: str) -> str:
    """Path of a program in tests/progs."""
    return str(PROGS / name)


__all__ = ["Child", "PROGS", "prog", "signal", "wait_for"]
