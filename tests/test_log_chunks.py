"""Worker output a chunk at a time (issue 18, item 4): a flood of lines reaches the terminal,
the log files and `multibus logs` whole and in order per worker, formatted as line by line.

Black-box first (`multibus run` with a log file, `multibus logs`), then the parts: the
ProcessManager's chunks, ``Bus.log_lines``, the printer's hand-off, the ring's numbering."""

from __future__ import annotations

import io
import json
import random
import re
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from test_cli import all_started, mb, running, unique, wait_for
from test_logfiles import chatty, fleet_file, has, numbered, text_records

from multibus.bus import Bus, ChannelFailures
from multibus.logprinter import LogPrinter
from multibus.logring import MAX_LOG_TEXT, LogRing
from multibus.logview import format_json, format_json_lines, format_lines, format_text
from multibus.procs import ProcessManager

LINES = 20000


@pytest.mark.timeout(120)
def test_a_flood_of_output_reaches_the_file_and_logs_whole_and_in_order(tmp_path):
    name = unique("lc")
    path = fleet_file(tmp_path, name, 'log_file = "fleet.log"', chatty("a", 3, LINES))
    fleet_log = tmp_path / "fleet.log"
    workers = ("a.0", "a.1", "a.2")
    with running(str(path)) as (proc, log):
        wait_for(lambda: all_started(name, 3), 30, "3 workers STARTED")
        wait_for(lambda: has(fleet_log, *(f"{w} done" for w in workers)), 60,
                 "every worker's last line in the fleet file")
        r = mb("logs", "--name", name, "-n", "5", "a", "--log-format", "json")
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(30) == 0
    records = text_records(fleet_log)
    expected = [f"line {i}" for i in range(LINES)] + ["done"]
    for worker in workers:
        assert numbered(records, worker) == expected, worker
    assert not any("dropped" in m for s, m in records if s == "supervisor")
    # `logs` still counts lines, not chunks: the group's last five records are five lines
    # (a worker's own "Bus STARTED", sent on another path than its output, may be among them)
    assert r.returncode == 0, r.stderr
    tail = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(tail) == 5 and not any("\n" in t["message"] for t in tail), tail
    assert any(re.fullmatch(rf"{t['source']} (line \d+|done)", t["message"]) for t in tail)


def _child_printing(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.timeout(30)
def test_the_process_manager_hands_over_chunks_in_order_and_a_traceback_whole():
    calls: list[tuple[str, list[str]]] = []
    done = threading.Event()
    pm = ProcessManager(on_lines=lambda c, s, lines: calls.append((s, list(lines))),
                        on_exit=lambda c: done.set()).start()
    code = ("import sys\n"
            "sys.stdout.write(''.join(f'out {i}\\n' for i in range(5000)))\n"
            "sys.stdout.write('tail without newline')\n"
            "sys.stdout.flush()\n"
            "sys.stderr.write('before\\r\\n')\n"
            "sys.stderr.write('Traceback (most recent call last):\\n  File \"x\", line 1\\n"
            "ValueError: boom\\nafter\\n')\n")
    try:
        child = pm.spawn("t.0", _child_printing(code))
        assert done.wait(20) and child.drained.wait(20)
    finally:
        pm.close()
    out = [line for s, lines in calls if s == "stdout" for line in lines]
    assert out == [f"out {i}" for i in range(5000)] + ["tail without newline"]
    assert len([1 for s, _ in calls if s == "stdout"]) < 5000 // 10  # chunks, not lines
    err = [line for s, lines in calls if s == "stderr" for line in lines]
    assert err == ["before", 'Traceback (most recent call last):\n  File "x", line 1\n'
                   "ValueError: boom", "after"]
    assert "after" in child.last_lines and len(child.last_lines) == 20


def test_log_lines_reach_every_listener_in_order_a_chunk_at_a_time_where_it_can():
    bus = Bus()
    plain: list[tuple[str, int]] = []
    chunks: list[tuple[str, list[str], int]] = []

    class Chunked:
        def __call__(self, msg, level=20):
            raise AssertionError("a chunk-aware listener gets no single lines")

        def log_lines(self, source, texts, level=20):
            chunks.append((source, list(texts), level))

    def failing(msg, level=20):
        raise ValueError("listener bug")

    bus.subscribe("log", lambda msg, level=20: plain.append((msg, level)), 10)
    bus.subscribe("log", failing, 20)
    bus.subscribe("log", Chunked(), 30)
    with pytest.raises(ChannelFailures):
        bus.log_lines("job.3", ["one", "two", ""], 30)
    assert plain == [("job.3 | one", 30), ("job.3 | two", 30), ("job.3 | ", 30)]
    assert chunks == [("job.3", ["one", "two", ""], 30)]  # after a failing listener too


def test_a_chunk_is_formatted_as_its_lines_one_by_one():
    random.seed(18)
    alphabet = ["a", " ", "\n", "\r", "\x0c", "\x85", "\u2028", "é", "", "\x1b", '"']
    for _ in range(3000):
        texts = ["".join(random.choices(alphabet, k=random.randint(0, 4)))
                 for _ in range(random.randint(1, 4))]
        level = random.choice((20, 30, 40))
        colour, date = random.random() < 0.5, random.random() < 0.5
        one_by_one = "\n".join(format_text((0, 1.5e9, level, "job.1", t), colour, 8, date)
                               for t in texts)
        assert format_lines(1.5e9, level, "job.1", texts, colour, 8, date) == one_by_one
        assert format_json_lines(1.5e9, level, "job.1", texts, pid=7) == "\n".join(
            format_json((0, 1.5e9, level, "job.1", t), pid=7) for t in texts)


def test_a_flooding_thread_does_not_starve_the_printer_into_dropping():
    """The writer is fast; only the GIL stands between it and the queue: nothing dropped."""
    stream = io.StringIO()
    printer = LogPrinter(20, "text", stream, max_queue=1000).start()
    chunk = [f"line {i}" for i in range(500)]
    try:
        for _ in range(100):  # 50,000 lines, 50 times the queue
            printer.log_lines("job.0", chunk, 20)
    finally:
        printer.close()
    assert printer.dropped == 0
    assert stream.getvalue().count("job.0 | line 499\n") == 100


def test_a_stuck_printer_drops_whole_chunks_counted_in_lines_without_blocking():
    gate = threading.Event()

    class Stuck(io.StringIO):
        def write(self, text):
            gate.wait(10)
            return super().write(text)

    stream = Stuck()
    printer = LogPrinter(20, "text", stream, max_queue=100).start()
    t0 = time.monotonic()
    for _ in range(200):
        printer.log_lines("job.0", ["a", "b", "c"], 20)
    assert time.monotonic() - t0 < 1
    assert printer.dropped >= 300 and printer.dropped % 3 == 0
    gate.set()
    printer.close()
    assert f"{printer.dropped} log lines dropped (output too slow)" in stream.getvalue()


def test_the_ring_numbers_each_line_of_a_chunk():
    woken = []
    ring = LogRing(10, on_record=lambda: woken.append(1))
    ring("Bus STARTED")
    ring.log_lines("job.0", ["x" * (MAX_LOG_TEXT + 1), "b", "c"], 30)
    recs, last = ring.records(0)
    assert [(r[0], r[2], r[3], r[4][-11:]) for r in recs] == [
        (1, 20, "supervisor", "Bus STARTED"), (2, 30, "job.0", " [truncated]"[-11:]),
        (3, 30, "job.0", "b"), (4, 30, "job.0", "c")]
    assert last == 4 and len(woken) == 2
    assert ring.records(3)[0][0][4] == "c"


def test_another_bus_gets_worker_output_a_line_at_a_time():
    """A bus without log_lines (cherrypy.engine) still gets 'name | line' records."""
    from multibus.keeper import Keeper

    class OtherBus:
        def __init__(self) -> None:
            self.got: list[tuple[str, int]] = []

        def log(self, msg: str, level: int = 20) -> None:
            self.got.append((msg, level))

    keeper = SimpleNamespace(bus=OtherBus(), log_output=True)
    child = SimpleNamespace(name="w.0", data={}, last_lines=[])
    Keeper.on_lines(keeper, child, "stderr", ["x", "y"])
    assert keeper.bus.got == [("w.0 | x", 30), ("w.0 | y", 30)]
