"""run_fleet in-process (signals, exit codes), the LogRing, and the command table."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from multibus.bus import Bus
from multibus.cli import build_parser
from multibus.commands import ACTIONS, COMMANDS, TRANSITIONS
from multibus.control import decode_request
from multibus.logring import MAX_LOG_TEXT, LogRing
from multibus.runner import FleetRefused, run_fleet
from multibus.specs import WorkerSpec

ROOT = Path(__file__).resolve().parent.parent
WORKER_ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}


# -- run_fleet ----------------------------------------------------------------------------------

def _fleet(target: str, stop_timeout: float = 5.0) -> list[WorkerSpec]:
    return [WorkerSpec(name="w", target=target, count=1, stop_timeout=stop_timeout,
                       env=WORKER_ENV)]


def _name() -> str:
    return f"rf{os.getpid()}x{time.monotonic_ns() % 100000}"


@pytest.mark.timeout(60)
def test_run_fleet_ctrl_c_stops_gracefully_exit_0_and_restores_handlers():
    logs: list[tuple[str, int]] = []
    before = signal.getsignal(signal.SIGINT)
    started: list[int] = []

    def on_started(sup) -> None:
        started.append(len(sup.table()))
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C once the fleet runs

    code = run_fleet(_fleet("targets.jobs:job"), name=_name(),
                     log=lambda msg, level=20, *a: logs.append((msg, level)),
                     on_started=on_started)
    assert code == 0
    assert started == [1]
    texts = [m for m, _ in logs]
    assert "Caught signal SIGINT." in texts and "Bus EXITED" in texts
    assert not any("interrupted again" in t for t in texts)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.timeout(60)
def test_run_fleet_second_ctrl_c_while_exiting_kills_and_says_so_once():
    logs: list[tuple[str, int, str]] = []
    bus = Bus()
    in_handler = threading.Event()

    def second_ctrl_c() -> None:  # a 'stop' listener: the exit is under way
        in_handler.set()
        os.kill(os.getpid(), signal.SIGINT)  # its handler runs here, in this thread
        in_handler.clear()

    bus.subscribe("stop", second_ctrl_c, 10)  # before the Supervisor's stop (40) waits

    def log(msg, level=20, *a) -> None:
        thread = threading.current_thread().name
        logs.append((msg, level, "handler" if in_handler.is_set() and
                     thread == "MainThread" else thread))

    t0 = time.monotonic()
    code = run_fleet(_fleet("targets.jobs:stubborn", stop_timeout=30), name=_name(), bus=bus,
                     log=log, on_started=lambda sup: os.kill(os.getpid(), signal.SIGINT))
    assert code == 1  # a worker had to be killed
    assert time.monotonic() - t0 < 20  # not the 30 s stop timeout
    said = [(m, lvl, where) for m, lvl, where in logs if m.startswith("interrupted again")]
    assert [(m, lvl) for m, lvl, _ in said] == [("interrupted again: killed every worker", 30)]
    assert said[0][2] != "handler"  # never logged inside the signal handler


@pytest.mark.timeout(60)
def test_run_fleet_refuses_a_name_in_use_and_starts_nothing():
    name = _name()
    done = threading.Event()
    codes: list[int] = []

    def second(sup) -> None:
        try:
            run_fleet(_fleet("targets.jobs:job"), name=name, log=lambda *a: None)
        except FleetRefused as e:
            codes.append(e.code)
            assert f"cannot start supervisor {name!r}" in str(e)
            assert f"pid {os.getpid()}" in str(e)
            # the fix is another name, not another PID file path (issue 15)
            assert "with --name OTHER" in str(e) and "PID file path" not in str(e)
        done.set()
        os.kill(os.getpid(), signal.SIGTERM)

    assert run_fleet(_fleet("targets.jobs:job"), name=name, log=lambda *a: None,
                     on_started=second) == 0
    assert done.is_set() and codes == [2]


# -- LogRing ------------------------------------------------------------------------------------

def test_log_ring_numbers_filters_and_pages():
    woken: list[int] = []
    ring = LogRing(size=5, on_record=lambda: woken.append(1))
    for i in range(7):
        ring(f"job.{i % 2} | line {i}" if i % 3 else f"supervisor line {i}", 20)
    assert len(woken) == 7
    recs, nxt = ring.records()
    assert [r[0] for r in recs] == [3, 4, 5, 6, 7] and nxt == 7  # the last 5 are kept
    assert [(r[3], r[4]) for r in recs] == [
        ("job.0", "line 2"), ("supervisor", "supervisor line 3"), ("job.0", "line 4"),
        ("job.1", "line 5"), ("supervisor", "supervisor line 6")]
    recs, nxt = ring.records(since=4, limit=2)
    assert [r[0] for r in recs] == [5, 6] and nxt == 6  # next page starts after 6
    recs, nxt = ring.records(since=6, limit=2)
    assert [r[0] for r in recs] == [7] and nxt == 7
    recs, _ = ring.records(keep=lambda source: source == "job.1")
    assert [r[0] for r in recs] == [6]
    assert ring.records(since=99) == ([], 99)


def test_log_ring_truncates_long_text_and_odd_levels():
    ring = LogRing()
    ring("x" * (MAX_LOG_TEXT + 10), True)  # a bool is not a level
    ((seq, _, level, source, text),), _ = ring.records()
    assert seq == 1 and level == 20 and source == "supervisor"
    assert text == "x" * MAX_LOG_TEXT + " [truncated]"


# -- the command table --------------------------------------------------------------------------

def test_every_transition_has_its_cli_subcommand_with_its_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for action in ACTIONS:
        assert sub.choices[action].description == TRANSITIONS[action].help
        assert sub.choices[action].get_default("control") is COMMANDS["op"]
    assert sub.choices["scale"].get_default("control") is COMMANDS["scale"]


def test_version_and_a_description_for_every_subcommand(capsys):
    """`multibus --version` prints the package's version; `multibus X --help` of every
    subcommand (status included) starts with a line saying what it does (issue 15)."""
    from importlib.metadata import version

    from multibus.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"multibus {version('multibus')}"
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"run", "status", "logs", "scale", *ACTIONS} <= set(sub.choices)
    for name, parser in sub.choices.items():
        assert parser.description and len(parser.description) > 20, name
        assert parser.description in " ".join(parser.format_help().split()), name


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_requests_are_checked_against_the_declared_schema(cmd):
    import msgpack

    schema = COMMANDS[cmd].schema
    for missing in schema:
        args = {k: None for k in schema if k != missing}
        with pytest.raises(ValueError, match="expected keys"):
            decode_request(msgpack.packb({"v": 1, "id": 1, "cmd": cmd, **args}))
    with pytest.raises(ValueError, match="expected keys"):
        decode_request(msgpack.packb({"v": 1, "id": 1, "cmd": cmd, "extra": 1,
                                      **{k: None for k in schema}}))
