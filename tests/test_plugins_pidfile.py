"""PIDFile: locked, 0600, stale files taken over, a live owner named, removed on clean exit."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import psutil
import pytest
from progs.procio import Child, prog, wait_for

from multibus.bus import Bus, states
from multibus.plugins import PIDFile, PIDFileError, read_pidfile

pytestmark = pytest.mark.timeout(30)


def start_owner(path) -> Child:
    child = Child(prog("pidfile_bus.py"), str(path))
    child.expect("STARTED")
    return child


# -- acceptance: real processes -----------------------------------------------------------

def test_mode_contents_and_clean_exit_removes(tmp_path):
    path = tmp_path / "app.pid"
    with start_owner(path) as owner:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        pid, ctime = path.read_text().split()
        assert int(pid) == owner.pid
        assert float(ctime) == pytest.approx(psutil.Process(owner.pid).create_time(), abs=1.5)
        assert read_pidfile(path) == owner.pid
        owner.signal(signal.SIGTERM)
        assert owner.wait() == 0
    assert not path.exists()
    assert read_pidfile(path) is None


def test_second_live_instance_is_refused_naming_the_first(tmp_path):
    path = tmp_path / "app.pid"
    with start_owner(path) as first:
        with Child(prog("pidfile_bus.py"), str(path)) as second:
            assert second.wait() == 3
            errors = [ln for ln in second.stderr if ln.startswith("START FAILED: ")]
            assert len(errors) == 1, second.stderr
            assert str(path) in errors[0] and f"pid {first.pid}" in errors[0]
            assert "stop it first or use another PID file path" in errors[0]
        assert read_pidfile(path) == first.pid  # the refused one did not touch the file
        first.signal(signal.SIGTERM)
        assert first.wait() == 0


def test_sigkilled_owner_leaves_stale_file_taken_over(tmp_path):
    path = tmp_path / "app.pid"
    with start_owner(path) as first:
        first.signal(signal.SIGKILL)
        first.wait()
        assert path.exists() and read_pidfile(path) is None  # stale: owner dead
        with start_owner(path) as second:
            assert read_pidfile(path) == second.pid
            assert any("Taking over stale PID file" in ln and f"owner pid {first.pid} is dead" in ln
                       for ln in second.stderr), second.stderr
            second.signal(signal.SIGINT)
            assert second.wait() == 0
    assert not path.exists()


def test_reused_pid_is_stale(tmp_path):
    """The file names a live process (our parent) but with another create time: not an owner."""
    path = tmp_path / "app.pid"
    live = os.getpid()
    path.write_text(f"{live} {psutil.Process(live).create_time() - 1000.0}\n")
    assert read_pidfile(path) is None
    with start_owner(path) as owner:
        assert read_pidfile(path) == owner.pid
        assert any("now belongs to another process" in ln for ln in owner.stderr), owner.stderr
        owner.signal(signal.SIGTERM)
        assert owner.wait() == 0


# -- in-process details ------------------------------------------------------------------------

def test_start_error_reaches_caller_and_bus_stops(tmp_path):
    path = tmp_path / "app.pid"
    holder = Bus()
    PIDFile(holder, path).subscribe()
    holder.start()
    try:
        bus = Bus()
        PIDFile(bus, path).subscribe()
        with pytest.raises(PIDFileError, match=f"pid {os.getpid()}"):
            bus.start()
        assert bus.state is states.STOPPED
        bus.exit()
    finally:
        holder.exit()
    assert not path.exists()


def test_symlink_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    link = tmp_path / "app.pid"
    link.symlink_to(target)
    bus = Bus()
    PIDFile(bus, link).subscribe()
    with pytest.raises(PIDFileError, match="symlink"):
        bus.start()
    assert target.read_text() == "precious\n"
    bus.exit()


def test_hard_link_and_fifo_are_refused_in_one_line(tmp_path):
    victim = tmp_path / "precious"
    victim.write_text("keep me\n")
    linked = tmp_path / "linked.pid"
    os.link(victim, linked)
    fifo = tmp_path / "fifo.pid"
    os.mkfifo(fifo)
    for path, why in ((linked, "2 hard links"), (fifo, "not a regular file")):
        bus = Bus()
        PIDFile(bus, path).subscribe()
        with pytest.raises(PIDFileError, match=why) as info:
            bus.start()
        assert "\n" not in str(info.value) and "remove it" in str(info.value)
        bus.exit()
    assert victim.read_text() == "keep me\n"


def test_replaced_file_is_not_unlinked(tmp_path):
    """Exit removes the file only if it is still the one we locked."""
    path = tmp_path / "app.pid"
    bus = Bus()
    PIDFile(bus, path).subscribe()
    bus.start()
    os.unlink(path)
    path.write_text("someone else\n")
    bus.exit()
    assert path.read_text() == "someone else\n"


def test_existing_loose_mode_is_tightened_and_garbage_taken_over(tmp_path):
    path = tmp_path / "app.pid"
    path.write_text("garbage")
    os.chmod(path, 0o644)
    logs = []
    bus = Bus()
    bus.subscribe("log", lambda msg, level: logs.append(msg))
    PIDFile(bus, path).subscribe()
    bus.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert read_pidfile(path) == os.getpid()
        assert any("unreadable content" in m for m in logs)
    finally:
        bus.exit()


def test_read_pidfile_cases(tmp_path):
    path = tmp_path / "x.pid"
    assert read_pidfile(path) is None  # missing
    path.write_text("")
    assert read_pidfile(path) is None  # empty
    path.write_text("not-a-pid\n")
    assert read_pidfile(path) is None
    path.write_text(f"{os.getpid()}\n")  # CherryPy's format: pid only
    assert read_pidfile(path) == os.getpid()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(f"{dead.pid} 1.0\n")
    assert read_pidfile(path) is None


def test_lock_is_released_when_owner_dies_without_cleanup(tmp_path):
    """A holder killed mid-run releases the lock at once (kernel), so no wait is needed."""
    path = tmp_path / "app.pid"
    with start_owner(path) as owner:
        owner.signal(signal.SIGKILL)
        owner.wait()
    assert wait_for(lambda: read_pidfile(path) is None, timeout=2)
    bus = Bus()
    PIDFile(bus, path).subscribe()
    bus.start()
    assert read_pidfile(path) == os.getpid()
    bus.exit()
    assert not path.exists()
