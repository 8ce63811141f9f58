"""The private runtime dir and the name locks in it (multibus.rundir), without any ZeroMQ."""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path

import pytest
from progs.procio import Child

from multibus import rundir
from multibus.rundir import HubNameInUse, UnsafeRuntimeDir, runtime_dir

# --------------------------------------------------------------------------- runtime dir


def test_runtime_dir_under_xdg_is_private_even_with_a_loose_umask(xdg):
    old = os.umask(0)
    try:
        path = runtime_dir()
    finally:
        os.umask(old)
    assert path == xdg / "multibus"
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.getuid()
    assert runtime_dir() == path  # idempotent


def test_runtime_dir_undoes_a_restrictive_umask(xdg):
    old = os.umask(0o277)
    try:
        path = runtime_dir()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700


def test_runtime_dir_falls_back_to_tmp_when_xdg_is_unusable(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by everyone: not a private base
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared))
    assert runtime_dir() == Path(f"/tmp/multibus-{os.getuid()}")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/path")
    assert runtime_dir() == Path(f"/tmp/multibus-{os.getuid()}")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert runtime_dir() == Path(f"/tmp/multibus-{os.getuid()}")


def test_runtime_dir_create_false_does_not_create(xdg):
    with pytest.raises(FileNotFoundError):
        runtime_dir(create=False)
    assert not (xdg / "multibus").exists()


def test_runtime_dir_refuses_a_symlink(xdg, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (xdg / "multibus").symlink_to(target)
    with pytest.raises(UnsafeRuntimeDir) as err:
        runtime_dir()
    msg = str(err.value)
    assert str(xdg / "multibus") in msg and "symlink" in msg and "rm -r" in msg
    assert "\n" not in msg


def test_runtime_dir_refuses_loose_permissions(xdg):
    (xdg / "multibus").mkdir()
    (xdg / "multibus").chmod(0o755)
    with pytest.raises(UnsafeRuntimeDir) as err:
        runtime_dir()
    assert f"chmod 700 {xdg / 'multibus'}" in str(err.value)
    # nothing was "fixed" behind the user's back
    assert stat.S_IMODE(os.lstat(xdg / "multibus").st_mode) == 0o755


def test_runtime_dir_refuses_a_file(xdg):
    (xdg / "multibus").write_text("x")
    with pytest.raises(UnsafeRuntimeDir, match="not a directory"):
        runtime_dir()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give the dir to another user")
def test_runtime_dir_refuses_another_owner(xdg):
    (xdg / "multibus").mkdir(mode=0o700)
    os.chown(xdg / "multibus", 65534, 65534)
    with pytest.raises(UnsafeRuntimeDir, match="owned by uid 65534"):
        runtime_dir()




# --------------------------------------------------------------------------- names and paths


def test_name_and_control_paths(xdg):
    assert rundir.name_path("web") == xdg / "multibus" / "web"
    assert rundir.control_path("web") == xdg / "multibus" / "web.ctl"
    assert rundir.pid_path("web") == xdg / "multibus" / "web.pid"
    for bad in ("a/b", "..", "-x", ""):
        with pytest.raises(ValueError, match="invalid hub name"):
            rundir.control_path(bad)


def test_control_path_does_not_create_the_dir_unless_asked(xdg):
    with pytest.raises(FileNotFoundError):
        rundir.control_path("web")
    assert rundir.control_path("web", create=True).parent.is_dir()


def test_name_owner_is_none_without_dir_or_for_a_bad_name(xdg):
    assert rundir.name_owner("web") is None
    runtime_dir()
    assert rundir.name_owner("web") is None
    assert rundir.name_owner("a/b") is None


# --------------------------------------------------------------------------- claims


def _socket_file(path: Path) -> None:
    """The unix socket file a killed process leaves behind (nobody listening)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))


def test_claim_owner_and_release_of_a_base_path(tmp_path):
    base = tmp_path / "hub"  # any directory: an explicit ipc address is claimed the same way
    stale = Path(f"{base}.control")
    _socket_file(stale)
    notes = Path(f"{base}.up")
    notes.write_text("a regular file is never removed as a socket")
    rundir.claim(base, [stale, notes])
    try:
        assert not stale.exists() and notes.exists()
        assert rundir.is_held(base) and rundir.owner(base) == os.getpid()
        assert Path(f"{base}.lock").read_text() == f"{os.getpid()}\n"
        assert stat.S_IMODE(os.stat(f"{base}.lock").st_mode) == 0o600
        with pytest.raises(HubNameInUse, match="my hub is already in use") as err:
            rundir.claim(base, what="my hub")
        assert err.value.pid == os.getpid()
    finally:
        assert rundir.release(base)
    assert not Path(f"{base}.lock").exists()
    assert rundir.owner(base) is None and not rundir.is_held(base)
    assert rundir.release(base)  # nobody holds it: releasing is allowed (and idempotent)
    assert not Path(f"{base}.lock").exists()


def test_claim_in_a_missing_directory_fails_and_release_says_so(tmp_path):
    base = tmp_path / "gone" / "hub"
    with pytest.raises(FileNotFoundError):
        rundir.claim(base)
    assert rundir.release(base) is False


_HOLDER = """
import signal
import sys
from multibus import rundir
rundir.claim(sys.argv[1])
print("held", flush=True)
signal.pause()
"""


@pytest.fixture
def holder(tmp_path):
    """Another process that holds the name lock of ``tmp_path/held``; yields (child, base)."""
    base = tmp_path / "held"
    with Child("-c", _HOLDER, str(base)) as child:
        child.expect("held")
        yield child, base


@pytest.mark.timeout(20)
def test_a_live_holder_is_named_and_its_files_are_safe_until_it_dies(holder):
    proc, base = holder
    sock = Path(f"{base}.down")
    _socket_file(sock)
    assert rundir.owner(base) == proc.pid
    with pytest.raises(HubNameInUse, match=f"pid {proc.pid}") as err:
        rundir.claim(base, [sock])
    assert err.value.pid == proc.pid
    assert rundir.release(base, [sock]) is False
    assert rundir.sweep_stale(base.parent) == 0
    assert sock.exists() and Path(f"{base}.lock").exists()

    proc.signal(signal.SIGKILL)
    proc.wait()
    assert rundir.owner(base) is None  # the kernel dropped the lock with its holder
    assert rundir.sweep_stale(base.parent) == 1
    assert not sock.exists() and not Path(f"{base}.lock").exists()


def test_sweep_skips_our_own_claims(tmp_path):
    base = tmp_path / "mine"
    rundir.claim(base)
    try:
        assert rundir.sweep_stale(tmp_path) == 0
        assert rundir.owner(base) == os.getpid()
    finally:
        rundir.release(base)


def test_running_supervisors_lists_live_names_with_a_control_socket(xdg):
    directory = runtime_dir()
    assert rundir.running_supervisors() == {}
    rundir.control_path("dead").touch()  # a control socket whose owner is gone
    base = rundir.name_path("live")
    rundir.claim(base)
    try:
        assert rundir.running_supervisors() == {}  # no control socket yet
        rundir.control_path("live").touch()
        assert rundir.running_supervisors() == {"live": os.getpid()}
    finally:
        rundir.release(base)
    assert rundir.running_supervisors() == {}
    assert sorted(p.name for p in directory.iterdir()) == ["dead.ctl", "live.ctl"]


def test_running_supervisors_without_a_runtime_dir(xdg):
    assert rundir.running_supervisors() == {}


_SUPERVISOR = """
import signal
import socket
import sys
from multibus import lockfile, rundir
base = sys.argv[1]
rundir.claim(base)
pid = lockfile.acquire(base + ".pid")
ctl = socket.socket(socket.AF_UNIX)
ctl.bind(base + ".ctl")
print("held", flush=True)
signal.pause()
"""


@pytest.mark.timeout(20)
def test_a_killed_supervisors_ctl_and_pid_files_are_swept_a_live_ones_kept(tmp_path):
    """A SIGKILLed supervisor leaves NAME.lock, NAME.ctl and NAME.pid: all provably stale
    (no lock held), all swept; a live one's are untouched (issue 14, part 6)."""
    names = [tmp_path / n for n in ("dead", "live")]
    files = [Path(f"{b}.{s}") for b in names for s in ("lock", "ctl", "pid")]
    with Child("-c", _SUPERVISOR, str(names[0])) as dead, \
            Child("-c", _SUPERVISOR, str(names[1])) as live:
        dead.expect("held")
        live.expect("held")
        assert all(f.exists() for f in files)
        assert rundir.sweep_stale(tmp_path) == 0
        dead.signal(signal.SIGKILL)
        dead.wait()
        assert rundir.sweep_stale(tmp_path) == 2  # the name, and its PID file
        assert [f.exists() for f in files] == [False] * 3 + [True] * 3
        live.signal(signal.SIGKILL)
        live.wait()


def test_orphaned_ctl_and_pid_files_are_swept_foreign_ones_kept(tmp_path):
    """A control socket whose lock file is gone (swept by an older version) and an unlocked
    PID file are stale; a regular file named .ctl and a hard-linked .pid are not ours to
    remove."""
    _socket_file(tmp_path / "old.ctl")
    (tmp_path / "old.pid").write_text("123\n")
    (tmp_path / "odd.ctl").write_text("not a socket")
    (tmp_path / "other").write_text("someone's file")
    os.link(tmp_path / "other", tmp_path / "linked.pid")
    mine = tmp_path / "mine"
    rundir.claim(mine)
    _socket_file(tmp_path / "mine.ctl")
    try:
        assert rundir.sweep_stale(tmp_path) == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "linked.pid", "mine.ctl", "mine.lock", "odd.ctl", "other"]
    finally:
        rundir.release(mine, [tmp_path / "mine.ctl"])
