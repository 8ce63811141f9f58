"""Deploying new code under load: multibus rolling reload vs gunicorn HUP, side by side.

    python benchmarks/bench_reload.py [--clients 8] [--reloads 3] [--gap 2] [--workers 4]
                                      [--no-gunicorn] [--json FILE]

One run, on loopback, the same page (``examples/web.py``: says its code ``VERSION`` and pid)
served by 4 workers, under bounded load: ``--clients`` client threads, each opening a new
connection per request (``Connection: close``), for the whole run of each system.

* multibus: ``multibus run`` of a copy of ``examples/web.toml`` (CherryPy on the shared socket,
  workers forked from the zygote); each reload edits ``VERSION`` and runs ``multibus reload``.
* gunicorn sync / gthread (4 threads): ``gunicorn web:app -w 4`` (the same module's WSGI
  ``app``); each reload edits ``VERSION`` and sends SIGHUP to the master, and is over once
  every worker is a new process answering with the new version.
* then, for each system, a reload onto code that raises at import.

Reported per system: requests served, failed requests by kind (refused, reset, empty answer,
timeout, HTTP status...), p50/p99 latency of requests that started during a reload and of the
others, seconds per reload, and the versions answering in the last second. ``Load`` is also
what ``tests/test_reload.py`` drives. gunicorn is in the ``bench`` extra (``pip install
gunicorn``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
VERSION_RE = re.compile(r"version (\S+)")


# -- the load ---------------------------------------------------------------------------------

@dataclass
class Answer:
    start: float  # time.monotonic() when the connection was opened
    latency: float
    kind: str  # 'ok', or why it failed: 'refused', 'reset', 'empty', 'timeout', 'http 503'...
    version: str | None = None


def get(host: str, port: int, timeout: float = 10.0) -> tuple[str, str | None]:
    """One request on a new connection: ('ok', version) or (failure kind, None)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(REQUEST)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except ConnectionRefusedError:
        return "refused", None
    except ConnectionResetError:
        return "reset", None
    except TimeoutError:
        return "timeout", None
    except OSError as e:
        return f"error {e.errno}", None
    if not data:
        return "empty", None
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    if status != [b"200"]:
        return f"http {status[0].decode() if status else '?'}", None
    m = VERSION_RE.search(body.decode("utf-8", "replace"))
    return "ok", m.group(1) if m else None


@dataclass
class Load:
    """``clients`` threads sending requests to ``host:port`` (a connection each) until
    :meth:`stop`; use as a context manager. Each thread keeps its own answers (no lock)."""

    port: int
    clients: int = 8
    host: str = "127.0.0.1"
    _threads: list[threading.Thread] = field(default_factory=list)
    _lists: list[list[Answer]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Load:
        for i in range(self.clients):
            answers: list[Answer] = []
            self._lists.append(answers)
            t = threading.Thread(target=self._client, args=(answers,), name=f"load-{i}",
                                 daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _client(self, answers: list[Answer]) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            kind, version = get(self.host, self.port)
            answers.append(Answer(t0, time.monotonic() - t0, kind, version))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def answers(self, since: float = 0.0) -> list[Answer]:
        """Every answer so far of a request started at or after ``since``, by start time."""
        out = [a for answers in self._lists for a in list(answers) if a.start >= since]
        return sorted(out, key=lambda a: a.start)

    def wait(self, n: int, since: float = 0.0, timeout: float = 30.0) -> list[Answer]:
        """Until ``n`` answers of requests started after ``since`` are in (AssertionError on
        timeout); returns them."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.answers(since)
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(got)} of {n} answers in {timeout}s")
            time.sleep(0.02)

    def failures(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.answers():
            if a.kind != "ok":
                out[a.kind] = out.get(a.kind, 0) + 1
        return out
