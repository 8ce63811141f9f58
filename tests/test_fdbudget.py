"""File descriptors: a supervisor raises its limit, refuses what does not fit, and is not
aborted by connections to its control socket (issue 14, part 3)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys

import psutil
import pytest
import test_supervisor
from progs.procio import wait_for
from test_supervisor import PY

from multibus import fdbudget
from multibus.rundir import control_path

fleets = test_supervisor.fleets  # the fixture: supervisors in a pty, all reaped
HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def test_the_budget_and_its_refusal_name_the_limit_and_the_fix(monkeypatch):
    monkeypatch.setattr(fdbudget, "limit", lambda: 1024)
    assert fdbudget.workers_fit() == 179  # (1024 - BASE - headroom) // PER_WORKER
    fdbudget.check_workers(179, "this fleet")
    with pytest.raises(fdbudget.FdBudgetExceeded) as err:
        fdbudget.check_workers(200, "this fleet")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("this fleet: 200 workers need about ")
    assert "limit of 1024 (RLIMIT_NOFILE; at most 179 workers fit)" in msg
    need = int(msg.split("ulimit -n ")[1].split("`")[0])
    assert fdbudget.workers_fit(need) >= 200 > fdbudget.workers_fit(need - 1)
    assert f"LimitNOFILE={need}" in msg


def test_raise_soft_limit_goes_up_to_the_hard_limit_never_down():
    code = ("import resource, sys; from multibus import fdbudget; N = resource.RLIMIT_NOFILE;"
            "resource.setrlimit(N, (256, 512)); print(fdbudget.raise_soft_limit(),"
            " resource.getrlimit(N), fdbudget.raise_soft_limit())")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=30,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.split("\n")[0] == "(256, 512) (512, 512) (512, 512)", out.stderr


@pytest.mark.skipif(HARD < 4096, reason="needs a hard RLIMIT_NOFILE of 4096 or more")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("soft, n", [
    (256, 60), pytest.param(1024, 200, marks=pytest.mark.soak)])
def test_workers_past_the_soft_limit_start_and_exit_cleanly(fleets, soft, n):
    """`ulimit -S -n 1024`: 200 workers need ~1,050 descriptors; the supervisor raises its
    soft limit to the hard one, so all start and all exit (was: EMFILE at job.197, then
    abort). The default run: 60 workers under 256."""
    f = fleets("--ulimit-n", f"{soft},{HARD}", "--start-timeout", "60", n=n)
    f.wait_line("FLEET STARTED", 90)
    table = f.table()
    assert sum(1 for w in table if w["state"] == "STARTED") == n
    assert psutil.Process(f.proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (HARD, HARD)
    os.kill(f.proc.pid, signal.SIGTERM)
    assert f.wait(60) == 0
    f.wait_line("CHILDREN 0")
    f.assert_all_gone()


@pytest.mark.timeout(60)
def test_a_fleet_past_a_hard_limit_is_refused_naming_it_and_nothing_starts(fleets):
    f = fleets("--ulimit-n", "256", n=100)
    line = f.wait_line("REFUSED", 20)
    assert "100 workers need about" in line and "limit of 256" in line
    assert "ulimit -n" in line and "LimitNOFILE=" in line
    assert f.wait(20) == 2
    assert not f.pids


def _connect(path: str) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return s
    except OSError:
        s.close()
        return None


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [300, pytest.param(1100, marks=pytest.mark.soak)])
def test_control_connections_past_the_budget_are_refused_and_it_keeps_running(
        fleets, xdg, capsys, n):
    """Under `ulimit -n 256` (soft and hard), connections to NAME.ctl that stay open: at its
    cap ((256 - 64) // 4 = 48) the control socket drops them and stops listening
    (ECONNREFUSED) until its descriptors are back under half that, instead of libzmq
    aborting the supervisor on EMFILE (was: exit 134 at ~1,070 under 1024); then it answers
    again. Paced by a status request every
    few connections (its answer means the connections before it were counted): a tight loop
    can outrun the control thread, see docs/design.md."""
    from multibus.cli import main
    from multibus.control import ControlClient, ControlError

    f = fleets("--ulimit-n", "256", n=2, extra_env={"XDG_RUNTIME_DIR": str(xdg)})
    f.wait_line("FLEET STARTED", 20)
    path = str(control_path(f.name))
    client = ControlClient(f.name, timeout=0.5)
    socks: list[socket.socket] = []
    try:
        for i in range(n):
            s = _connect(path)  # None: refused, while it does not listen
            if s is not None:
                socks.append(s)
            if i % 4 == 3:
                with contextlib.suppress(ControlError):  # it stopped listening meanwhile
                    client.status()
        f.wait_line("not taking connections for now", 10)
        assert f.proc.poll() is None
    finally:
        for s in socks:
            s.close()
    assert wait_for(lambda: main(["status", "--json", "--name", f.name]) == 0, 10)
    out = capsys.readouterr().out
    assert '"listening": 1' in out and '"paused": 0' not in out
    os.kill(f.proc.pid, signal.SIGTERM)
    assert f.wait(30) == 0


@pytest.mark.skipif(HARD < 4096, reason="needs a hard RLIMIT_NOFILE of 4096 or more")
@pytest.mark.timeout(120)
def test_1100_control_connections_at_once_under_ulimit_s_1024(fleets, xdg):
    """A burst of 1,100 connections under a soft limit of 1024 (the issue's abort): the
    supervisor raised its limit at start, so it survives them and answers after."""
    f = fleets("--ulimit-n", f"1024,{HARD}", n=2, extra_env={"XDG_RUNTIME_DIR": str(xdg)})
    f.wait_line("FLEET STARTED", 20)
    path = str(control_path(f.name))
    socks = []
    try:
        for _ in range(1100):
            s = _connect(path)
            if s is not None:
                socks.append(s)
        assert wait_for(lambda: _fds(f.proc.pid) > 1024, 20)
        assert f.proc.poll() is None
    finally:
        for s in socks:
            s.close()
    r = subprocess.run([sys.executable, "-m", "multibus", "status", "--name", f.name],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, XDG_RUNTIME_DIR=str(xdg)))
    assert r.returncode == 0, r.stderr
    os.kill(f.proc.pid, signal.SIGTERM)
    assert f.wait(30) == 0
