"""What `multibus run` prints on a plain start and stop, and on an aborted start: no noise
(issue 15). In-process, through run_fleet and its default LogPrinter on stderr."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from multibus.logprinter import LogPrinter, fleet_sources
from multibus.runner import run_fleet
from multibus.specs import WorkerSpec

ROOT = Path(__file__).resolve().parent.parent
WORKER_ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
LINE = re.compile(r"\d\d:\d\d:\d\d\.\d{3}  (\S+) +\| (.*)")


def _name() -> str:
    return f"nz{os.getpid()}x{time.monotonic_ns() % 100000}"


@pytest.mark.timeout(60)
def test_a_plain_run_prints_no_noise_in_stable_columns(capfd):
    """Start two workers, stop: the supervisor says "Bus STARTED" after its workers' own
    "Bus STARTED", the source column keeps one width although the workers' names are longer
    than 'supervisor', and no "Waiting for child threads" on the way out."""
    specs = [WorkerSpec(name="background", target="targets.jobs:job", count=2, env=WORKER_ENV)]
    code = run_fleet(specs, name=_name(),
                     on_started=lambda sup: os.kill(os.getpid(), signal.SIGTERM))
    assert code == 0
    lines = capfd.readouterr().err.splitlines()
    parsed = [LINE.fullmatch(ln) for ln in lines]
    assert all(parsed), lines
    assert len({ln.index(" | ") for ln in lines}) == 1, lines  # one column width throughout
    said = [(m[1], m[2]) for m in parsed]
    assert ("supervisor", "Bus EXITED") in said
    assert not any("Waiting for child threads" in text for _, text in said), lines
    started = said.index(("supervisor", "Bus STARTED"))
    workers = [i for i, (src, text) in enumerate(said)
               if src.startswith("background.") and text == "Bus STARTED"]
    assert len(workers) == 2 and max(workers) < started, lines


@pytest.mark.timeout(60)
def test_an_aborted_start_is_not_an_error():
    """SIGTERM while the fleet starts aborts the start: a request, logged at INFO, and the
    workers still stop cleanly (exit 0)."""
    logs: list[tuple[str, int]] = []
    aborted = threading.Event()

    def log(msg, level=20, *a) -> None:
        logs.append((msg, level))
        if msg == "s.0 | Bus STARTING" and not aborted.is_set():  # the worker is starting
            aborted.set()
            os.kill(os.getpid(), signal.SIGTERM)

    specs = [WorkerSpec(name="s", target="targets.jobs:slow_start", count=1, stop_timeout=20,
                        env={**WORKER_ENV, "MB_START_SECONDS": "2"})]
    assert run_fleet(specs, name=_name(), log=log) == 0
    assert aborted.is_set()
    assert any("start aborted" in m for m, _ in logs), logs
    assert [(m, lvl) for m, lvl in logs if lvl >= 40] == []


def test_log_columns_keep_their_width():
    """`multibus logs` and `run` print the source column at one width from the first line:
    as wide as the fleet's widest name (two-digit indexes included), or wider on demand."""

    class Lines:
        def __init__(self) -> None:
            self.text = ""

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return False

    out = Lines()
    printer = LogPrinter(20, "text", out, sources=fleet_sources({"job": 3, "db": 1}))
    for i, source in enumerate(["job.0", "supervisor", "job.12", "db.0"]):
        printer.write((i, 0.0, 20, source, "x"))
    assert len({ln.index(" | ") for ln in out.text.splitlines()}) == 1, out.text
    printer.write((9, 0.0, 20, "averyveryverylongname.1", "x"))  # never truncated
    assert "averyveryverylongname.1 | x" in out.text
