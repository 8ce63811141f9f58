"""ProcessManager / stop_children: spawning, waiting, output capture, escalation (no Bridge)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from progs.procio import wait_for

from multibus.child import signal_group, stop_children
from multibus.procs import ProcessManager

HERE = Path(__file__).resolve().parent
PY = sys.executable


class Collect:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, str]] = []
        self.exits: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def on_line(self, child, stream, line):
        with self.lock:
            self.lines.append((child.name, stream, line))

    def on_exit(self, child):
        with self.lock:
            self.exits.append((child.name, child.returncode))


@pytest.fixture
def pm():
    c = Collect()
    m = ProcessManager(on_line=c.on_line, on_exit=c.on_exit)
    m.collect = c  # type: ignore[attr-defined]
    m.start()
    try:
        yield m
    finally:
        for child in list(m.children.values()):
            signal_group(child.pgid, signal.SIGKILL)
        m.close()


@pytest.mark.timeout(20)
def test_exit_code_recorded_and_popen_never_waits(pm):
    child = pm.spawn("w", [PY, "-c", "import sys; sys.exit(7)"])
    assert child.exited.wait(5)
    assert child.returncode == 7 and child.popen.returncode == 7
    assert child.popen.poll() == 7  # cached: Popen does not wait again
    assert child.describe_exit() == "exit code 7"
    assert wait_for(lambda: pm.collect.exits == [("w", 7)])
    assert child.pid not in pm.children


@pytest.mark.timeout(20)
def test_child_runs_in_its_own_process_group(pm):
    child = pm.spawn("w", [PY, "-c", "import os; print(os.getpgrp())"])
    assert child.drained.wait(5)
    assert pm.collect.lines == [("w", "stdout", str(child.pid))]
    assert os.getpgrp() != child.pid


@pytest.mark.timeout(20)
def test_spawning_thread_is_the_manager_thread(pm):
    # PDEATHSIG fires when the spawning thread exits: it must be the long-lived manager thread
    code = "import ctypes,os; print(os.getppid())"
    child = pm.spawn("w", [PY, "-c", code])
    assert child.drained.wait(5)
    assert pm.collect.lines[0][2] == str(os.getpid())
    assert pm.thread.is_alive()


@pytest.mark.timeout(20)
def test_killed_child_is_noticed_at_once(pm):
    child = pm.spawn("w", [PY, "-c", "import time; print('up', flush=True); time.sleep(60)"])
    assert wait_for(lambda: pm.collect.lines, 5)
    t0 = time.monotonic()
    os.kill(child.pid, signal.SIGKILL)
    assert child.exited.wait(5)
    assert time.monotonic() - t0 < 0.5
    assert child.returncode == -signal.SIGKILL
    assert child.describe_exit() == "killed by SIGKILL"


@pytest.mark.timeout(30)
def test_10000_lines_printed_just_before_exit_all_arrive(pm):
    code = (
        "import sys\n"
        "w = sys.stdout.write\n"
        "for i in range(10000): w(f'line {i} ' + 'x' * (i % 50) + '\\n')\n"
        "sys.stderr.write('tail without newline')\n"
    )
    child = pm.spawn("w", [PY, "-c", code])
    assert child.exited.wait(10) and child.drained.wait(10)
    out = [line for (_, s, line) in pm.collect.lines if s == "stdout"]
    assert out == [f"line {i} " + "x" * (i % 50) for i in range(10000)]
    err = [line for (_, s, line) in pm.collect.lines if s == "stderr"]
    assert err == ["tail without newline"]


@pytest.mark.timeout(20)
def test_long_line_is_not_lost(pm):
    child = pm.spawn("w", [PY, "-c", "print('y' * 200000)"])
    assert child.drained.wait(5)
    assert "".join(line for (_, _, line) in pm.collect.lines) == "y" * 200000


@pytest.mark.timeout(20)
def test_lines_of_two_children_never_interleave(pm):
    code = ("import sys\n"
            "for i in range(3000): sys.stdout.write('%s-%d-' % (sys.argv[1], i) * 20 + '\\n')")
    a = pm.spawn("a", [PY, "-c", code, "a"])
    b = pm.spawn("b", [PY, "-c", code, "b"])
    assert a.drained.wait(10) and b.drained.wait(10)
    for name, _, line in pm.collect.lines:
        i = line.split("-")[1]
        assert line == f"{name}-{i}-" * 20
    assert len(pm.collect.lines) == 6000


@pytest.mark.timeout(20)
def test_stop_children_escalates_sigterm_then_sigkill(pm):
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    stubborn = pm.spawn("stubborn", [PY, "-c", code])
    polite_code = "import time; print('ready', flush=True); time.sleep(60)"
    polite = pm.spawn("polite", [PY, "-c", polite_code])
    assert wait_for(lambda: len(pm.collect.lines) == 2, 5)
    logs = []
    t0 = time.monotonic()
    signalled = stop_children([stubborn, polite], time.monotonic() + 0.2, term_timeout=0.3,
                              log=lambda m, lvl: logs.append(m))
    elapsed = time.monotonic() - t0
    assert signalled == {stubborn, polite}
    assert polite.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL
    assert 0.45 < elapsed < 2.0
    assert any("SIGKILL" in m and "stubborn" in m for m in logs)


@pytest.mark.timeout(20)
def test_stop_children_leaves_cooperative_children_alone(pm):
    child = pm.spawn("w", [PY, "-c", "import sys; sys.stdin.read()"])
    # stdin is /dev/null: it exits at once on its own
    assert stop_children([child], time.monotonic() + 5, term_timeout=1) == set()
    assert child.returncode == 0


@pytest.mark.timeout(20)
def test_call_later_runs_in_manager_thread_in_order(pm):
    seen = []
    done = threading.Event()
    pm.call_later(0.05, lambda: (seen.append(("b", threading.current_thread())), done.set()))
    pm.call_later(0.0, lambda: seen.append(("a", threading.current_thread())))
    token = pm.call_later(0.01, lambda: seen.append(("cancelled", None)))
    token.cancel()
    assert done.wait(5)
    assert [s for s, _ in seen] == ["a", "b"]
    assert all(t is pm.thread for _, t in seen)


@pytest.mark.timeout(30)
def test_grandchild_is_reaped_by_subreaper():
    # a worker that leaves a grandchild behind: its group is signalled, the orphan reaped
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    cmd = [PY, "-m", "targets.procs_harness", "sh", "-c", "sleep 30 & echo $!; exit 0"]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    try:
        lines = []
        for _ in range(3):
            lines.append(p.stdout.readline().strip())
        (line,) = [x for x in lines if x.startswith("LINE stdout ")]  # any order
        grandchild = int(line.split()[-1])
        assert "EXIT 0" in lines
        assert f"ADOPTED {grandchild} -{int(signal.SIGTERM)}" in lines
        p.stdin.close()
        assert p.stdout.readline().strip() == "CLOSED 0"
        assert p.wait(10) == 0
        assert not os.path.exists(f"/proc/{grandchild}")
    finally:
        p.kill()
        p.wait()


TRACEBACKS = r"""
import sys
print("before", file=sys.stderr, flush=True)
def f():
    raise KeyError("inner")
try:
    f()
except KeyError as e:
    try:
        raise RuntimeError("outer") from e
    except RuntimeError:
        import traceback
        traceback.print_exc()
print("after", file=sys.stderr, flush=True)
raise ValueError("last")
"""


@pytest.mark.timeout(20)
def test_a_traceback_on_stderr_is_one_record(pm):
    child = pm.spawn("w", [PY, "-c", TRACEBACKS])
    assert child.drained.wait(5)
    got = [line for name, stream, line in pm.collect.lines if stream == "stderr"]
    assert len(got) == 4, got  # before, the chained traceback, after, the last traceback
    assert got[0] == "before" and got[2] == "after"
    chained, last = got[1], got[3]
    assert chained.startswith("Traceback (most recent call last):")
    assert "KeyError: 'inner'" in chained and chained.endswith("RuntimeError: outer")
    assert "direct cause" in chained
    assert last.startswith("Traceback") and last.endswith("ValueError: last")


@pytest.mark.timeout(20)
def test_stop_children_says_nothing_more_about_a_killed_child(pm):
    """After a second Ctrl-C killed the workers: no 'sending SIGTERM', no SIGKILL again."""
    child = pm.spawn("w", [PY, "-c", "import signal, time; signal.signal(15, signal.SIG_IGN);"
                                     "print('up', flush=True); time.sleep(60)"])
    assert wait_for(lambda: ("w", "stdout", "up") in pm.collect.lines)
    child.kill()
    said: list[str] = []
    assert stop_children([child], time.monotonic(), term_timeout=0.1,
                         log=lambda msg, level: said.append(msg)) == set()
    assert child.returncode == -signal.SIGKILL
    assert said == [] and child.signalled == "SIGKILL"
