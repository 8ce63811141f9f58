"""cmd groups: programs that are not Python buses, run, checked, stopped and reloaded by signals,
end to end through the ``multibus`` command (issue 16, item 4)."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_cli import mb, output, running, status, unique, wait_for

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_fleet(tmp_path: Path, name: str, groups: str) -> str:
    path = tmp_path / "fleet.toml"
    path.write_text(f'[supervisor]\nname = "{name}"\n\n{groups}')
    return str(path)


def toml_cmd(*argv: str) -> str:
    return json.dumps(list(argv))  # a JSON array of strings is a TOML array


def group_rows(name: str, group: str) -> list[dict]:
    st = status(name)
    return [w for w in st["workers"] if w["group"] == group] if st else []


def started(name: str, group: str, n: int = 1) -> list[dict] | None:
    rows = group_rows(name, group)
    ok = len(rows) == n and all(w["state"] == "STARTED" and w["pid"] for w in rows)
    return rows if ok else None


# a program that says it is up, reports the signals it gets, and exits 0 on its stop signal
TRAPS = """
import signal, sys, time
def on(sig, frame):
    print("got", signal.Signals(sig).name, flush=True)
    if sig == signal.SIGINT:
        sys.exit(0)
for s in (signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
    signal.signal(s, on)
print("program up", flush=True)
print("to stderr", file=sys.stderr, flush=True)
while True:
    time.sleep(1)
"""


def redis_ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64)


@pytest.mark.timeout(90)
@pytest.mark.skipif(shutil.which("redis-server") is None,
                    reason="redis-server is not installed (apt-get install redis-server; "
                           ".ci/run installs it)")
def test_redis_under_multibus_with_a_tcp_ready_check(tmp_path):
    name, port = unique("rd"), free_port()
    fleet = write_fleet(tmp_path, name, f"""
[groups.redis]
cmd = {toml_cmd("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no")}
ready = "tcp:127.0.0.1:{port}"
stop_timeout = 5
""")
    with running(fleet) as (proc, log):
        rows = wait_for(lambda: started(name, "redis"), 30, "redis STARTED")
        assert rows[0]["launch"] == "cmd"
        assert redis_ping(port) == b"+PONG\r\n"  # STARTED means it answers
        assert "ready check tcp:127.0.0.1:" in output(log)
        first = rows[0]["pid"]
        assert psutil.Process(first).name() == "redis-server"  # the launcher exec'd it
        g = status(name)["groups"][0]
        assert g["cmd"][0] == "redis-server" and g["target"] is None
        assert g["ready"] == f"tcp:127.0.0.1:{port}"

        r = mb("stop", "--name", name)  # stop = the program ends (SIGTERM: redis saves, exits)
        assert r.returncode == 0, r.stdout + r.stderr
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie"
        assert [w["state"] for w in group_rows(name, "redis")] == ["EXITED"]
        r = mb("start", "--name", name)  # start = spawned again, STARTED once it answers
        assert r.returncode == 0, r.stdout + r.stderr
        rows = started(name, "redis")
        assert rows and rows[0]["pid"] != first and redis_ping(port) == b"+PONG\r\n"
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(30) == 0
        assert "Ready to accept connections" in output(log)  # its output, logged


@pytest.mark.timeout(60)
def test_stop_signal_graceful_signal_and_output(tmp_path):
    name = unique("sg")
    fleet = write_fleet(tmp_path, name, f"""
[groups.prog]
cmd = {toml_cmd(PY, "-c", TRAPS)}
stop_signal = "INT"
graceful_signal = "SIGUSR1"
""")
    with running(fleet) as (proc, log):
        pid = wait_for(lambda: started(name, "prog"), 30, "STARTED")[0]["pid"]
        wait_for(lambda: "program up" in output(log), 10, "its stdout logged")
        text = output(log)
        assert "prog.0     | program up" in text and "to stderr" in text
        logs = mb("logs", "prog", "--name", name)
        assert "program up" in logs.stdout and "to stderr" in logs.stdout

        assert mb("graceful", "--name", name).returncode == 0
        wait_for(lambda: "got SIGUSR1" in output(log), 10, "SIGUSR1 on graceful")
        assert started(name, "prog")[0]["pid"] == pid  # same process, still STARTED

        r = mb("exit", "--name", name)
        assert r.returncode == 0, r.stdout + r.stderr
        assert proc.wait(30) == 0  # it exited on its own: nothing killed
        text = output(log)
    assert "got SIGINT" in text and "exit code 0" in text and "SIGKILL" not in text


@pytest.mark.timeout(60)
def test_a_program_that_ignores_its_stop_signal_is_killed_after_stop_timeout(tmp_path):
    name = unique("ig")
    ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
             "print('up', flush=True); time.sleep(60)"
    fleet = write_fleet(tmp_path, name, f"""
[groups.stubborn]
cmd = {toml_cmd(PY, "-c", ignore)}
stop_timeout = 0.5
""")
    with running(fleet) as (proc, log):
        wait_for(lambda: started(name, "stubborn"), 30, "STARTED")
        t0 = time.monotonic()
        r = mb("stop", "--name", name)
        took = time.monotonic() - t0
        assert r.returncode == 1 and "stubborn.0" in r.stderr + r.stdout
        assert "SIGKILL" in r.stderr + r.stdout and "SIGTERM, then" not in r.stderr + r.stdout
        assert took < 5  # SIGKILL at its stop_timeout, no SIGTERM round after it
        assert mb("exit", "--name", name).returncode in (0, 1)
        proc.wait(30)


GO_THEN_READY = """
import os, sys, time
go, ready = sys.argv[1], sys.argv[2]
print("waiting for", go, flush=True)
while not os.path.exists(go):
    time.sleep(0.02)
open(ready, "w").close()
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_file_ready_check_holds_started_until_the_file_exists(tmp_path):
    name = unique("fr")
    go, ready = tmp_path / "go", tmp_path / "ready"
    fleet = write_fleet(tmp_path, name, f"""
[groups.slow]
cmd = {toml_cmd(PY, "-c", GO_THEN_READY, str(go), str(ready))}
ready = "file:ready"
start_timeout = 30
[groups.later]
cmd = {toml_cmd(PY, "-c", "import time; time.sleep(60)")}
ready = "delay:0.3"
""")
    with running(fleet) as (proc, log):
        wait_for(lambda: "waiting for" in output(log), 20, "the program running")
        rows = group_rows(name, "slow")
        assert rows and rows[0]["state"] == "SPAWNING" and rows[0]["pid"]
        assert status(name)["state"] == "STARTING"
        go.touch()
        wait_for(lambda: started(name, "slow") and started(name, "later"), 20, "STARTED")
        assert wait_for(lambda: status(name)["state"] == "STARTED", 10)
        text = output(log)
        assert f"ready check file:{ready} passed" in text
        assert "ready check delay:0.3 passed" in text
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(30) == 0


@pytest.mark.timeout(60)
def test_a_ready_check_that_never_passes_fails_the_start_naming_it(tmp_path):
    name, port = unique("nr"), free_port()
    fleet = write_fleet(tmp_path, name, f"""
[groups.deaf]
cmd = {toml_cmd(PY, "-c", "import time; time.sleep(60)")}
ready = "tcp:127.0.0.1:{port}"
start_timeout = 1
""")
    with running(fleet) as (proc, log):
        assert proc.wait(30) == 1
        text = output(log)
    assert f"ready check tcp:127.0.0.1:{port}" in text and "deaf.0" in text


CRASH_ONCE = """
import os, sys, time
mark = sys.argv[1]
if not os.path.exists(mark):
    open(mark, "w").close()
    print("crashing", flush=True)
    sys.exit(3)
print("second life", flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_a_crashed_program_is_restarted(tmp_path):
    name = unique("cr")
    fleet = write_fleet(tmp_path, name, f"""
[groups.flaky]
cmd = {toml_cmd(PY, "-c", CRASH_ONCE, str(tmp_path / "mark"))}
""")
    with running(fleet) as (proc, log):
        rows = wait_for(lambda: (r := started(name, "flaky")) and r[0]["restarts"] == 1 and r,
                        30, "restarted once and STARTED")
        assert rows[0]["exit_code"] == 3
        wait_for(lambda: "second life" in output(log), 10, "the second process's output")
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(30) == 0


@pytest.mark.timeout(60)
def test_run_dash_dash_runs_a_program(tmp_path):
    name = unique("dd")
    code = "import os, time; print('hello', os.environ.get('MULTIBUS_WORKER'), flush=True); " \
           "time.sleep(60)"
    with running("--name", name, "-n", "2", "--group", "hello", "--", PY, "-c", code) as (
            proc, log):
        rows = wait_for(lambda: started(name, "hello", 2), 30, "2 programs STARTED")
        assert {w["name"] for w in rows} == {"hello.0", "hello.1"}
        assert all(w["launch"] == "cmd" for w in rows)
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(30) == 0
        # MULTIBUS_WORKER says which one it is, as for a bus worker
        assert "hello hello.0" in output(log) and "hello hello.1" in output(log)

    name = unique("db")
    with running("--name", name, "--", "sleep", "60") as (proc, log):
        wait_for(lambda: started(name, "sleep"), 30, "group named after the program")
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(30) == 0


@pytest.mark.parametrize("body, expected", [
    ('[groups.x]\ntarget = "a:b"\ncmd = ["sleep", "1"]\n', "groups.x.target: and cmd both"),
    ('[groups.x]\ncount = 1\n', "groups.x.target: missing"),
    ('[groups.x]\ntarget = "a:b"\nready = "delay:1"\n', "groups.x.ready: applies to cmd"),
    ('[groups.x]\ncmd = ["sleep", "1"]\nready = "tcp:localhost"\n', "ready check 'tcp:localhost'"),
    ('[groups.x]\ncmd = ["sleep", "1"]\nready = "http://x"\n', "unknown kind 'http'"),
    ('[groups.x]\ncmd = ["sleep", "1"]\nstop_signal = "SIGNOPE"\n', "stop_signal: 'SIGNOPE'"),
    ('[groups.x]\ncmd = ["no-such-program-xyz"]\n', "'no-such-program-xyz' is not found on PATH"),
    ('[groups.x]\ncmd = "sleep 1"\n', "groups.x.cmd: expected an array of strings"),
    ('[groups.x]\ncmd = ["sleep", "1"]\nchannels = ["a"]\n', "a cmd program has no bus"),
])
def test_bad_cmd_groups_exit_2_with_one_line(tmp_path, body, expected):
    assert_refused(tmp_path, body, expected)


def assert_refused(tmp_path: Path, body: str, expected: str) -> None:
    """``multibus run`` of a fleet file ``body`` exits 2 with one line saying ``expected``."""
    path = tmp_path / "bad.toml"
    path.write_text(body)
    r = mb("run", str(path), "--name", unique("bad"))
    assert r.returncode == 2
    assert expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_run_dash_dash_usage_errors():
    r = mb("run", "--")
    assert r.returncode == 2 and "expected a program after '--'" in r.stderr
    r = mb("run", "x.toml", "--", "sleep", "1")
    assert r.returncode == 2 and "either a TARGET|FILE or a program" in r.stderr


@pytest.mark.timeout(90)
def test_one_cmd_group_at_a_time_and_after_a_program(tmp_path):
    """Issue 16 items 1, 3 and 4 together: a bus group runs after a program (its ready check
    passed first); `signal`/`stop`/`start` of the program alone leave the bus group running."""
    name, port = unique("co"), free_port()
    server = f"import socket\nsrv = socket.create_server(('127.0.0.1', {port}))\n" + TRAPS
    fleet = write_fleet(tmp_path, name, f"""pythonpath = ["{Path(__file__).parent}"]

[groups.prog]
cmd = {toml_cmd(PY, "-c", server)}
ready = "tcp:127.0.0.1:{port}"
stop_signal = "SIGINT"

[groups.job]
target = "targets.jobs:job"
after = ["prog"]
""")
    with running(fleet) as (proc, log):
        wait_for(lambda: started(name, "job") and started(name, "prog"), 30, "both STARTED")
        text = output(log)
        assert text.index("ready check tcp:") < text.index("job.0")  # the program first
        first = started(name, "prog")[0]["pid"]
        r = mb("signal", "prog", "USR1", "--name", name)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: "got SIGUSR1" in output(log), 10, "the program got SIGUSR1")
        r = mb("stop", "prog", "--name", name)
        assert r.returncode == 0, r.stderr
        assert "got SIGINT" in output(log)  # its stop_signal
        assert [w["state"] for w in group_rows(name, "prog")] == ["EXITED"]
        assert started(name, "job")  # the bus group runs on
        r = mb("start", "prog", "--name", name)
        assert r.returncode == 0, r.stderr
        again = started(name, "prog")
        assert again and again[0]["pid"] != first
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(30) == 0
