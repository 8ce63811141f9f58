"""Supervisor end to end: a real supervisor process (tests/targets/fleet_harness.py) with real
workers, driven through a pseudo-terminal so Ctrl-C is the terminal's own SIGINT."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import termios
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def still_alive(pids: set[int], deadline: float) -> list[int]:
    """Wait (until the monotonic ``deadline``) for ``pids`` to be gone; return those left."""
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.005)
    return [p for p in pids if alive(p)]


class Fleet:
    """The harness running as session leader of a fresh pty (like a shell's foreground job)."""

    def __init__(self, *args: str, n: int = 3, name: str | None = None,
                 extra_env: dict[str, str] | None = None, program: str | None = None) -> None:
        self.name = name or f"t{uuid.uuid4().hex[:8]}"
        self.master, slave = os.openpty()
        # ISIG stays (Ctrl-C is the terminal's SIGINT), but no echo ("^C" would land in front
        # of whichever line comes next) and no ONLCR: Linux's n_tty ignores a short pty write
        # of the "\r\n" it makes of "\n" (do_output_char), so under load two lines came out
        # as one, about once in 15 runs of the 10,000-line test.
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.ONLCR
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        env = dict(ENV, **(extra_env or {}))
        # setsid -c: new session whose controlling terminal is the pty on stdin
        prog = ["-m", "targets.fleet_harness"] if program is None else [program]
        cmd = ["setsid", "-c", PY, *prog, "--name", self.name, "-n", str(n), *args]
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=HERE,
                                     env=env, close_fds=True)
        os.close(slave)
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.pids: set[int] = set()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            with self.cond:
                for raw in lines:
                    line = raw.decode(errors="replace").rstrip("\r")
                    self.lines.append(line)
                    if line.startswith("WORKERS "):
                        try:
                            rows = json.loads(line[8:])
                        except ValueError:  # a stray traceback split the line: shown on failure
                            continue
                        for row in rows:
                            if row["pid"]:
                                self.pids.add(row["pid"])
                self.cond.notify_all()
        with self.cond:
            self.lines.append("<EOF>")
            self.cond.notify_all()

    def wait_line(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[start:]:
                    if rx.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == "<EOF>"):
                    odd = [x for x in self.lines if not x.startswith(("WORKERS ", "LOG "))]
                    raise AssertionError(
                        f"no line matching {pattern!r}; last lines:\n" + "\n".join(
                            x[:300] for x in self.lines[-25:]) + "\nother lines:\n"
                        + "\n".join(x[:300] for x in odd[-40:]))
                self.cond.wait(left)

    def table(self) -> list[dict]:
        with self.cond:
            for line in reversed(self.lines):
                if line.startswith("WORKERS "):
                    try:
                        return json.loads(line[8:])
                    except ValueError:
                        continue
        return []

    def wait_table(self, pred, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                t = self.table()
                if t and pred(t):
                    return t
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"table never matched; last: {t}")
                self.cond.wait(left)

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")

    def wait(self, timeout: float = 20.0) -> int:
        rc = self.proc.wait(timeout)
        self.reader.join(5)
        return rc

    def close(self) -> None:
        """Kill whatever is left (supervisor, workers, grandchildren) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.reader.join(5)
        try:
            os.close(self.master)
        except OSError:
            pass

    def sigkill_supervisor(self, pids: set[int], within: float = 1.0) -> None:
        """SIGKILL the supervisor; ``pids`` must all be gone ``within`` s of it."""
        os.kill(self.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + within
        self.proc.wait(5)
        left = still_alive(pids, deadline)
        assert not left, f"processes outlived the supervisor by {within} s"

    def assert_all_gone(self, timeout: float = 2.0) -> None:
        left = still_alive(self.pids, time.monotonic() + timeout)
        assert not left, f"worker processes left behind: {left}"


@pytest.fixture
def fleets():
    made: list[Fleet] = []

    def make(*args: str, **kw) -> Fleet:
        f = Fleet(*args, **kw)
        made.append(f)
        return f

    try:
        yield make
    finally:
        for f in made:
            f.close()


def started(t: list[dict]) -> bool:
    return all(r["state"] == "STARTED" for r in t)


# once in the default run; 100 times with -m soak
ONCE_OR_SOAK = pytest.mark.parametrize("times", [
    pytest.param(1, marks=pytest.mark.timeout(60), id="once"),
    pytest.param(100, marks=[pytest.mark.soak, pytest.mark.timeout(3600)], id="soak"),
])


# -- Ctrl-C -----------------------------------------------------------------------------------

def _ctrl_c_while_running(fleets) -> None:
    f = fleets(n=10)
    f.wait_line("^FLEET STARTED", 30)
    assert len(f.pids) >= 10
    f.ctrl_c()
    assert f.wait() == 0
    f.wait_line("^CHILDREN 0$", 1)
    f.assert_all_gone()


@ONCE_OR_SOAK
def test_ctrl_c_while_running_stops_everything_exit_0(fleets, times):
    for _ in range(times):
        _ctrl_c_while_running(fleets)


def _ctrl_c_while_starting(fleets) -> None:
    f = fleets(n=10)
    f.wait_line(r"^WORKERS .*SPAWNING", 20)  # some spawned, not all started
    f.ctrl_c()
    assert f.wait() == 0, "\n".join(f.lines[-20:])
    f.wait_line("^CHILDREN 0$", 1)
    f.assert_all_gone()


@ONCE_OR_SOAK
def test_ctrl_c_while_starting_stops_everything_exit_0(fleets, times):
    for _ in range(times):
        _ctrl_c_while_starting(fleets)


@pytest.mark.timeout(60)
def test_second_ctrl_c_during_stop_kills_at_once_exit_nonzero(fleets):
    f = fleets("--target", "targets.jobs:stubborn", "--stop-timeout", "30", n=2)
    f.wait_line("^FLEET STARTED", 30)
    f.ctrl_c()
    f.wait_line("Bus STOPPING", 10)
    t0 = time.monotonic()
    before = len(f.lines)
    f.ctrl_c()
    assert f.wait() == 1
    assert time.monotonic() - t0 < 5  # not the 30 s stop timeout
    f.wait_line("interrupted again", 1)
    # killed is killed: no escalation messages about those workers afterwards
    assert not [ln for ln in f.lines[before:] if "sending SIG" in ln], f.lines[before:]
    f.assert_all_gone()


@pytest.mark.timeout(90)
def test_fleet_example_ctrl_c_exits_0_and_leaves_nothing(fleets):
    """The README's first command: examples/fleet.py in a terminal, stopped by Ctrl-C."""
    f = fleets(n=3, program=str(ROOT / "examples" / "fleet.py"))
    f.wait_line(r"Fleet STARTED: 3 workers", 60)
    f.pids.update(c.pid for c in psutil.Process(f.proc.pid).children(recursive=True))
    assert len(f.pids) >= 3
    f.ctrl_c()
    assert f.wait() == 0, "\n".join(f.lines[-20:])
    f.wait_line(r"Fleet STOPPED", 1)
    f.wait_line(r"Fleet EXITED", 1)
    f.assert_all_gone()


# -- parent death -----------------------------------------------------------------------------

@ONCE_OR_SOAK
def test_sigkill_of_supervisor_takes_every_worker_within_1s(fleets, times):
    for _ in range(times):
        f = fleets(n=10)
        f.wait_line("^FLEET STARTED", 30)
        pids = set(f.pids)
        assert len(pids) == 10
        f.sigkill_supervisor(pids, within=1.0)


# -- restarts ---------------------------------------------------------------------------------

@ONCE_OR_SOAK
def test_sigkill_of_worker_is_replaced_and_table_shows_restart(fleets, times):
    # intensity high enough for the loop; the first restart is immediate, later ones back off
    # (capped at 0.2 s here, not the default 5 s, so 100 kills take seconds, not minutes)
    f = fleets("--intensity", "1000,1", "--backoff", "0.05,0.2", n=3)
    f.wait_line("^FLEET STARTED", 30)
    for i in range(1, times + 1):
        victim = f.table()[1]
        os.kill(victim["pid"], signal.SIGKILL)
        t = f.wait_table(lambda t, i=i: t[1]["restarts"] == i and t[1]["state"] == "STARTED",
                         10)
        assert t[1]["pid"] != victim["pid"]
        assert t[1]["exit_code"] == -signal.SIGKILL
        assert [r["restarts"] for r in t] == [0, i, 0]
    f.ctrl_c()
    assert f.wait() == 0
    f.assert_all_gone()


@pytest.mark.timeout(60)
def test_quick_repeated_deaths_back_off_exponentially_up_to_the_cap(fleets):
    # each death comes well within the intensity period (30 s) of its start: a quick failure
    f = fleets("--intensity", "1000,30", "--backoff", "0.05,0.2", n=1)
    f.wait_line("^FLEET STARTED", 30)
    for i in range(1, 6):
        os.kill(f.table()[0]["pid"], signal.SIGKILL)
        f.wait_table(lambda t, i=i: t[0]["restarts"] == i and t[0]["state"] == "STARTED", 10)
    delays = re.findall(r"restarting w\.0 in ([0-9.]+)s", "\n".join(f.lines))
    assert delays == ["0.05", "0.10", "0.20", "0.20"]  # the first restart is immediate
    f.ctrl_c()
    assert f.wait() == 0
    f.assert_all_gone()


@pytest.mark.timeout(60)
def test_worker_failing_at_start_reaches_intensity_and_stops_everything(fleets):
    f = fleets("--target", "targets.jobs:failing", "--intensity", "3,30", n=2)
    err = f.wait_line("^FLEET ERROR", 30)
    assert "restart intensity reached" in err
    assert "database unreachable" in err  # the worker's own error text
    assert f.wait() == 1
    f.wait_line("^CHILDREN 0$", 1)
    f.assert_all_gone()


@pytest.mark.timeout(60)
def test_temporary_worker_is_not_restarted(fleets):
    f = fleets("--restart", "temporary", n=2)
    f.wait_line("^FLEET STARTED", 30)
    victim = f.table()[0]
    os.kill(victim["pid"], signal.SIGKILL)
    t = f.wait_table(lambda t: t[0]["state"] == "EXITED", 10)
    assert t[0]["restarts"] == 0 and t[0]["exit_code"] == -signal.SIGKILL
    f.ctrl_c()
    assert f.wait() == 0
    f.assert_all_gone()


# -- escalation, reaping, output --------------------------------------------------------------

@pytest.mark.timeout(60)
def test_worker_ignoring_sigterm_is_killed_after_its_stop_timeout(fleets):
    f = fleets("--target", "targets.jobs:stubborn", "--stop-timeout", "0.5",
               "--term-timeout", "0.5", n=1)
    f.wait_line("^FLEET STARTED", 30)
    f.ctrl_c()
    assert f.wait() == 1  # something had to be killed
    f.wait_line(r"w\.0 .*SIGKILL", 1)
    f.wait_line("^CHILDREN 0$", 1)
    f.assert_all_gone()


@pytest.mark.timeout(60)
def test_grandchild_of_a_worker_is_reaped(fleets, tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    f = fleets("--target", "targets.jobs:grandchild", n=1,
               extra_env={"MB_PIDFILE": str(pidfile)})
    f.wait_line("^FLEET STARTED", 30)
    deadline = time.monotonic() + 5
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    grandchild = int(pidfile.read_text())
    f.pids.add(grandchild)  # for cleanup
    assert alive(grandchild)
    os.kill(f.table()[0]["pid"], signal.SIGKILL)  # orphan it
    f.wait_line(rf"reaped orphaned process {grandchild}\b", 10)
    assert not alive(grandchild)
    f.ctrl_c()
    assert f.wait() == 0
    f.wait_line("^CHILDREN 0$", 1)


@pytest.mark.timeout(60)
def test_10000_lines_printed_just_before_exit_all_arrive(fleets):
    f = fleets("--target", "targets.jobs:chatty_on_exit", n=1)
    f.wait_line("^FLEET STARTED", 30)
    f.ctrl_c()
    assert f.wait() == 0
    got = [ln for ln in f.lines if re.match(r"^LOG 20 w\.0 \| line \d+$", ln)]
    odd = [ln for ln in set(f.lines) - set(got) if "line " in ln]  # shown on failure
    assert [int(ln.rsplit(" ", 1)[1]) for ln in got] == list(range(10000)), odd


# -- PID file ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_second_supervisor_with_same_name_is_refused_with_first_pid(fleets):
    f = fleets(n=1)
    f.wait_line("^FLEET STARTED", 30)
    r = subprocess.run([PY, "-m", "targets.fleet_harness", "--name", f.name, "-n", "1"],
                       cwd=HERE, env=ENV, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "REFUSED" in r.stdout and f"pid {f.proc.pid}" in r.stdout
    f.ctrl_c()
    assert f.wait() == 0


# -- issue 15: what a new user tripped over ---------------------------------------------------

def runtime_files(name: str) -> list[str]:
    """The files supervisor ``name`` keeps in the (test's private) runtime dir."""
    from multibus.rundir import runtime_dir

    return sorted(p.name for p in runtime_dir(create=False).glob(f"{name}.*"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("way", ["ctrl_c", "failed_start", "restart_limit"])
def test_every_way_out_removes_the_runtime_files_and_logs_bus_exited(fleets, way):
    args = {"ctrl_c": (), "failed_start": ("--target", "targets.jobs:failing_start"),
            "restart_limit": ("--target", "targets.jobs:dies_soon", "--intensity", "2,30")}[way]
    f = fleets(*args, n=1)
    if way == "ctrl_c":
        f.wait_line("^FLEET STARTED", 30)
        assert f"{f.name}.pid" in runtime_files(f.name)
        f.ctrl_c()
    elif way == "restart_limit":
        f.wait_line("^FLEET STARTED", 30)
        f.wait_line("restart intensity reached", 30)
    assert f.wait() == (0 if way == "ctrl_c" else 1), "\n".join(f.lines[-30:])
    f.wait_line(r"^LOG 20 Bus EXITED", 1)
    assert runtime_files(f.name) == []
    f.assert_all_gone()


@pytest.mark.timeout(60)
def test_failed_start_listener_fails_the_start_at_once_and_says_it_once(fleets):
    f = fleets("--target", "targets.jobs:failing_start", "--start-timeout", "60", n=2)
    t0 = time.monotonic()
    err = f.wait_line("^FLEET ERROR", 20)  # not the 60 s start_timeout
    assert time.monotonic() - t0 < 20
    assert re.search(r"worker w\.[01] failed to start: RuntimeError: cannot open port 99999",
                     err), err
    assert f.wait() == 1
    out = "\n".join(f.lines)
    assert out.count("FLEET ERROR") == 1
    # each worker's own traceback once; none from the supervisor
    assert out.count("Traceback (most recent call last)") <= 2
    assert "FleetError" not in out
    assert not re.search(r"\(\w*: ?\)|killed: \)", out), "an empty list was printed"
    f.assert_all_gone()


@pytest.mark.timeout(60)
def test_bus_log_in_the_target_body_arrives_in_order(fleets):
    f = fleets("--target", "targets.jobs:logs_in_body", n=1)
    f.wait_line("^FLEET STARTED", 30)
    f.wait_line(r"^LOG 20 w\.0 \| start record", 10)
    got = [ln for ln in f.lines if re.match(r"^LOG \d+ w\.0 \| \w+ record", ln)]
    assert got[:3] == ["LOG 20 w.0 | body record 1", "LOG 30 w.0 | body record 2",
                       "LOG 20 w.0 | start record"]
    f.ctrl_c()
    assert f.wait() == 0


@pytest.mark.timeout(60)
def test_target_that_never_returns_is_named_at_start_timeout(fleets):
    f = fleets("--target", "targets.jobs:never_returns", "--start-timeout", "1",
               "--stop-timeout", "0.5", "--term-timeout", "0.5", n=1)
    err = f.wait_line("^FLEET ERROR", 30)
    assert "w.0: its target targets.jobs:never_returns has not returned after" in err
    assert "a target subscribes its plugins and returns" in err
    assert f.wait() == 1
    f.assert_all_gone()
