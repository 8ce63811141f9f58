"""Daemonizer: the original parent's exit status tells whether the daemon really started.

Each run sits under tests/progs/subreaper.py (a child subreaper), so the double-forked daemon is
re-parented to a process we own and gets reaped, not left to init.
"""

from __future__ import annotations

import os
import signal
import sys

import psutil
import pytest
from progs.procio import Child, prog

from multibus.plugins import read_pidfile

pytestmark = pytest.mark.timeout(40)


@pytest.fixture
def reaper_run():
    children: list[Child] = []

    def run(*args: str) -> Child:
        child = Child(prog("subreaper.py"), sys.executable, prog("daemon_bus.py"), *args)
        children.append(child)
        return child

    yield run
    for child in children:
        try:
            for p in psutil.Process(child.pid).children(recursive=True):
                p.kill()
        except psutil.Error:
            pass
        child.close()


def test_daemon_started_exit_0_then_sigterm(tmp_path, reaper_run):
    pidfile, logfile = tmp_path / "d.pid", tmp_path / "d.log"
    reaper = reaper_run(str(pidfile), str(logfile))
    assert reaper.expect("CHILD_EXIT") == "CHILD_EXIT 0", reaper.stderr
    daemon = read_pidfile(pidfile)
    assert daemon is not None
    proc = psutil.Process(daemon)
    assert proc.ppid() == reaper.pid  # double-forked, re-parented to the subreaper
    assert os.getsid(daemon) != os.getsid(0)  # own session: no controlling terminal
    assert any(f"Daemon started as PID {daemon}" in ln for ln in reaper.stderr), reaper.stderr
    os.kill(daemon, signal.SIGTERM)
    reaper.expect("ALL_REAPED")
    assert reaper.wait() == 0
    assert not pidfile.exists()
    log = logfile.read_text()
    assert "Bus STARTED" in log and "Caught signal SIGTERM." in log and "Bus EXITED" in log


def test_failing_start_listener_gives_exit_1_and_message(tmp_path, reaper_run):
    pidfile, logfile = tmp_path / "d.pid", tmp_path / "d.log"
    reaper = reaper_run(str(pidfile), str(logfile), "--fail")
    assert reaper.expect("CHILD_EXIT") == "CHILD_EXIT 1", reaper.stderr
    reaper.expect("ALL_REAPED")  # the failed daemon exited and was reaped
    assert reaper.wait() == 0
    summary = [ln for ln in reaper.stderr if "daemon failed to start:" in ln]
    assert summary and summary[0].endswith("ValueError: deliberate start failure"), reaper.stderr
    assert not pidfile.exists()
