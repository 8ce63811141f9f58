"""Ready checks (multibus.readiness): parsed once, run on a loop without blocking it."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from multibus.procs import ProcessManager
from multibus.readiness import ReadyCheck, parse, wait_ready


@pytest.mark.parametrize("text, check", [
    ("tcp:127.0.0.1:6379", ReadyCheck("tcp", host="127.0.0.1", port=6379)),
    ("tcp:[::1]:80", ReadyCheck("tcp", host="::1", port=80)),
    ("tcp:localhost:1", ReadyCheck("tcp", host="localhost", port=1)),
    ("file:/run/app.ready", ReadyCheck("file", path="/run/app.ready")),
    ("delay:1.5", ReadyCheck("delay", seconds=1.5)),
    ("delay:0", ReadyCheck("delay", seconds=0.0)),
])
def test_parse_and_back(text, check):
    assert parse(text) == check and str(check) == text


@pytest.mark.parametrize("text, words", [
    ("tcp:127.0.0.1", "with a port 1-65535"),
    ("tcp:127.0.0.1:0", "with a port 1-65535"),
    ("tcp::80", "with a port"),
    ("delay:-1", "a number >= 0"),
    ("delay:soon", "a number >= 0"),
    ("http://x", "unknown kind 'http'"),
    ("file:", "expected 'tcp:HOST:PORT'"),
    ("", "expected 'tcp:HOST:PORT'"),
])
def test_bad_checks_say_what_is_expected(text, words):
    with pytest.raises(ValueError, match=words) as e:
        parse(text)
    assert "\n" not in str(e.value)


@pytest.fixture
def loop():
    pm = ProcessManager().start()
    yield pm
    pm.close()


def run(loop, check: str, timeout: float) -> tuple[bool, str, float]:
    got: list = []
    done = threading.Event()
    t0 = time.monotonic()

    def finished(ok: bool, why: str) -> None:
        assert loop.in_thread()  # on the loop's own thread
        got.append((ok, why, time.monotonic() - t0))
        done.set()

    wait_ready(parse(check), loop.call_later, finished, timeout)
    assert done.wait(timeout + 5)
    return got[0]


def test_tcp_passes_once_something_listens(loop):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    timer = threading.Timer(0.3, srv.listen)
    timer.start()
    try:
        ok, why, took = run(loop, f"tcp:127.0.0.1:{port}", 10)
    finally:
        timer.cancel()
        srv.close()
    assert ok and took >= 0.25 and why == f"ready check tcp:127.0.0.1:{port} passed"


def test_tcp_that_never_listens_times_out_naming_the_check(loop):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ok, why, took = run(loop, f"tcp:127.0.0.1:{port}", 0.5)
    assert not ok and 0.45 <= took < 3
    assert f"ready check tcp:127.0.0.1:{port} did not pass within 0.5s" in why
    assert "refused" in why.lower()


def test_file_and_delay(loop, tmp_path):
    path = tmp_path / "ready"
    timer = threading.Timer(0.2, path.touch)
    timer.start()
    try:
        ok, _, took = run(loop, f"file:{path}", 10)
    finally:
        timer.cancel()
    assert ok and took >= 0.15
    ok, _, took = run(loop, "delay:0.4", 10)
    assert ok and 0.4 <= took < 2
    ok, why, _ = run(loop, f"file:{tmp_path / 'never'}", 0.2)
    assert not ok and "did not pass within 0.2s" in why


def test_cancel_stops_it_without_a_call(loop):
    called = []
    wait = wait_ready(parse("delay:0.2"), loop.call_later, lambda *a: called.append(a), 5)
    wait.cancel()
    later = threading.Event()
    loop.call_later(0.4, later.set)  # past the delay, on the same loop
    assert later.wait(5)
    assert called == [] and wait.over
