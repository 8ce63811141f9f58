"""multibus.lockfile: the one flock'd-file open shared by the PID file and the name locks."""

from __future__ import annotations

import errno
import os
import signal
import stat

import pytest
from progs.procio import Child

from multibus import lockfile
from multibus.lockfile import LockBusy, acquire, parse_record, probe


def test_acquire_creates_a_private_file_that_children_do_not_inherit(tmp_path):
    path = tmp_path / "x.lock"
    old = os.umask(0)
    try:
        held = acquire(path)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert not os.get_inheritable(held.fd)
        assert held.is_current() and held.read() == ""
        held.write("123 4.5\n", sync=True)
        assert held.read() == "123 4.5\n" and path.read_text() == "123 4.5\n"
        held.write("7\n")  # replaces, never appends
        assert path.read_text() == "7\n"
    finally:
        assert held.close(unlink=True)
    assert not path.exists()
    assert held.close() is False  # closing twice does nothing


def test_write_makes_an_existing_file_private(tmp_path):
    path = tmp_path / "x.pid"
    path.write_text("old")
    path.chmod(0o644)
    held = acquire(path)
    try:
        assert held.read() == "old"  # a takeover can see what the last holder left
        held.write("1\n")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        held.close()
    assert path.read_text() == "1\n"  # close() without unlink keeps the file


def test_a_held_lock_is_busy_for_another_open_and_shows_the_holders_record(tmp_path):
    path = tmp_path / "x.lock"
    held = acquire(path)
    try:
        record = f"{os.getpid()} 1.5\n"  # a live owner's record: busy at once
        held.write(record)
        assert probe(path) == record
        with pytest.raises(LockBusy) as err:
            acquire(path)
        assert err.value.text == record and err.value.path == str(path)
        with pytest.raises(LockBusy):
            acquire(path, wait=0.02)  # retried for a moment, then still busy
    finally:
        held.close()
    assert probe(path) is None  # the file is still there, but nobody holds it
    acquire(path).close(unlink=True)


def test_symlinks_are_refused_and_missing_files_are_not_created_on_request(tmp_path):
    target = tmp_path / "target"
    target.write_text("")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(OSError) as err:
        acquire(link)
    assert err.value.errno == errno.ELOOP
    assert probe(link) is None
    with pytest.raises(FileNotFoundError):
        acquire(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    assert probe(tmp_path / "missing") is None


def test_a_replaced_file_is_not_ours_and_is_never_unlinked(tmp_path):
    path = tmp_path / "x.pid"
    held = acquire(path)
    path.unlink()
    path.write_text("someone else's")
    assert not held.is_current()
    assert held.close(unlink=True) is False
    assert path.read_text() == "someone else's"


def test_a_file_that_keeps_being_replaced_is_given_up(tmp_path):
    with pytest.raises(lockfile.LockReplaced):
        acquire(tmp_path / "x.lock", tries=0)


_HOLDER = """
import signal
import sys
from multibus.lockfile import acquire
held = acquire(sys.argv[1])
held.write("holder\\n")
print("held", flush=True)
signal.pause()
"""


@pytest.mark.timeout(20)
def test_the_lock_dies_with_its_holder(tmp_path):
    path = tmp_path / "x.lock"
    with Child("-c", _HOLDER, str(path)) as holder:
        holder.expect("held")
        assert probe(path) == "holder\n"
        holder.signal(signal.SIGKILL)
        holder.wait()
    held = acquire(path)  # no cleanup needed: the stale content is just text
    assert held.read() == "holder\n"
    held.close(unlink=True)


@pytest.mark.parametrize("text, record", [
    ("123 1700000000.25\n", (123, 1700000000.25)),
    ("123\n", (123, None)),
    ("123 soon", (123, None)),
    ("", (None, None)),
    ("garbage 1.0", (None, None)),
    ("\ufffd\ufffd", (None, None)),
])
def test_parse_record_never_raises(text, record):
    assert parse_record(text) == record


def test_a_fifo_is_refused_and_probing_it_does_not_block(tmp_path):
    path = tmp_path / "x.pid"
    os.mkfifo(path)
    with pytest.raises(lockfile.LockUnsafe) as info:
        acquire(path)
    assert info.value.text == "it is not a regular file"
    assert probe(path) is None


def test_a_hard_link_is_refused_and_the_other_file_is_left_untouched(tmp_path):
    victim = tmp_path / "precious"
    victim.write_text("keep me")
    victim.chmod(0o644)
    path = tmp_path / "x.pid"
    os.link(victim, path)
    with pytest.raises(lockfile.LockUnsafe, match="2 hard links"):
        acquire(path)
    assert victim.read_text() == "keep me"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_a_file_owned_by_another_user_is_refused(tmp_path):
    path = tmp_path / "x.pid"
    path.write_text("theirs")
    os.chown(path, 65534, 65534)
    with pytest.raises(lockfile.LockUnsafe, match="belongs to uid 65534"):
        acquire(path)
    assert path.read_text() == "theirs"
