"""Our plugins on a real cherrypy.engine, and DropPrivileges (needs root, in a subprocess)."""

from __future__ import annotations

import grp
import os
import pwd
import signal
import subprocess
import sys

import pytest
from progs.procio import Child, prog

from multibus.bus import Bus
from multibus.plugins import DropPrivileges, read_pidfile

pytestmark = pytest.mark.timeout(30)


def test_plugins_on_real_cherrypy_engine(tmp_path):
    path = tmp_path / "engine.pid"
    with Child(prog("cherrypy_engine.py"), str(path)) as child:
        child.expect("HEARTBEAT")
        assert read_pidfile(path) == child.pid
        child.signal(signal.SIGTERM)
        child.expect("DONE")
        assert child.wait() == 0
        assert any("Caught signal SIGTERM." in ln for ln in child.stderr), child.stderr
    assert not path.exists()


DROP = """
import os, sys
from multibus.bus import Bus
from multibus.plugins import DropPrivileges
bus = Bus()
DropPrivileges(bus, umask=0o027, uid=sys.argv[1]).subscribe()
bus.start()
print(os.getuid(), os.geteuid(), os.getgid(), os.getgroups(), oct(os.umask(0)))
try:
    os.setuid(0)
    print("REGAINED")
except PermissionError:
    print("LOCKED")
bus.exit()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_drop_privileges_to_nobody():
    nobody = pwd.getpwnam("nobody")
    out = subprocess.run([sys.executable, "-c", DROP, "nobody"], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 0, out.stderr
    ids, locked = out.stdout.splitlines()
    uid, euid, gid, groups, umask = ids.split(" ", 4)
    assert int(uid) == int(euid) == nobody.pw_uid
    assert int(gid) == nobody.pw_gid  # primary group, not root's gid 0
    assert groups == "[]" and umask == "0o27" and locked == "LOCKED"


def test_drop_privileges_unknown_names_are_clear():
    bus = Bus()
    with pytest.raises(ValueError, match="no such user 'no-such-user-xyz'"):
        DropPrivileges(bus, uid="no-such-user-xyz")
    with pytest.raises(ValueError, match="no such group 'no-such-group-xyz'"):
        DropPrivileges(bus, gid="no-such-group-xyz")
    plugin = DropPrivileges(bus, uid=0, gid=grp.getgrgid(os.getgid()).gr_name)
    assert plugin.uid == 0 and plugin.gid == os.getgid()
