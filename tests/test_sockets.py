"""Listening sockets owned by the supervisor and inherited by its workers (issue 17, part 1):
the fleet-file keys, binding (a port in use is one line, exit 2), and what a worker gets by
the systemd convention, forked from the zygote or exec'd."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_cli import ROOT, all_started, mb, running, unique, wait_for

from multibus.config import ConfigError, from_mapping
from multibus.sockets import bind, bound_address, parse_address
from multibus.specs import SocketSpec

TESTS = ROOT / "tests"


# -- addresses and fleet-file keys --------------------------------------------------------------

def test_addresses():
    assert parse_address("127.0.0.1:8080") == (socket.AF_INET, ("127.0.0.1", 8080))
    assert parse_address("[::1]:8080") == (socket.AF_INET6, ("::1", 8080))
    assert parse_address("unix:/run/app.sock") == (socket.AF_UNIX, "/run/app.sock")
    for bad in ("8080", "localhost", "::1:8080", "unix:app.sock", "host:99999", ""):
        with pytest.raises(ValueError):
            parse_address(bad)


def _cfg(table: dict, **group) -> object:
    return from_mapping({"sockets": table,
                         "groups": {"web": {"target": "m:f", **group}}}, source="f.toml")


def test_fleet_file_keys_and_their_errors():
    cfg = _cfg({"http": {"address": "127.0.0.1:0", "backlog": 16},
                "api": {"address": "unix:/tmp/x.sock", "mode": "0660"}},
               sockets=["api", "http"], max_surge=2)
    assert cfg.sockets == (SocketSpec("http", "127.0.0.1:0", 16),
                           SocketSpec("api", "unix:/tmp/x.sock", 1024, 0o660))
    assert cfg.specs[0].sockets == ("api", "http") and cfg.specs[0].max_surge == 2
    for table, group, said in (
        ({}, {"sockets": ["http"]}, "f.toml: groups.web.sockets: no socket 'http'; declare it "
                                    "as [sockets.http] with an address"),
        ({"http": {}}, {}, "f.toml: sockets.http.address: missing"),
        ({"http": {"address": "8080"}}, {}, "f.toml: sockets.http.address: '8080': expected"),
        ({"http": {"address": "127.0.0.1:1", "mode": "0660"}}, {},
         "f.toml: sockets.http.mode: only for unix sockets"),
        ({"http": {"address": "127.0.0.1:1", "port": 1}}, {},
         "f.toml: sockets.http.port: unknown key"),
        ({}, {"max_surge": 0}, "f.toml: groups.web.max_surge: expected an integer >= 1"),
    ):
        with pytest.raises(ConfigError) as e:
            _cfg(table, **group)
        assert str(e.value).startswith(said), str(e.value)
        assert "\n" not in str(e.value)


def test_bind_tcp_v6_unix_and_a_stale_unix_file(tmp_path):
    s = bind(SocketSpec("a", "127.0.0.1:0", 8))
    assert bound_address(s).startswith("127.0.0.1:") and s.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    s.close()
    if socket.has_ipv6:
        try:
            s6 = bind(SocketSpec("b", "[::1]:0"))
        except ValueError:
            pass  # no IPv6 loopback here
        else:
            assert bound_address(s6).startswith("[::1]:")
            s6.close()
    path = tmp_path / "app.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # its file stays: a dead server's
    u = bind(SocketSpec("c", f"unix:{path}", mode=0o600))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(ValueError, match="in use by a running server"):
        bind(SocketSpec("c", f"unix:{path}"))
    u.close()


def test_place_fds_moves_descriptors_to_3_in_any_order():
    """Run in a child: it rearranges its own descriptors 3... (a cycle included)."""
    code = textwrap.dedent("""
        import os, sys
        from multibus.sockets import place_fds
        r, w = os.pipe()          # whatever holds 3 and 4 now is replaced
        a = os.open(os.devnull, os.O_RDONLY)
        b = os.open("/", os.O_RDONLY)
        c = os.open(sys.executable, os.O_RDONLY)
        want = [os.fstat(fd).st_ino for fd in (c, r, b)]
        assert place_fds([c, r, b]) == [3, 4, 5]
        assert [os.fstat(fd).st_ino for fd in (3, 4, 5)] == want
        assert all(os.get_inheritable(fd) for fd in (3, 4, 5))
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=30)
    assert r.stdout.strip() == "ok", r.stderr


# -- the supervisor binds, workers inherit ------------------------------------------------------

def _fleet_file(tmp: Path, name: str, address: str, extra: str = "") -> Path:
    path = tmp / "f.toml"
    path.write_text(textwrap.dedent(f"""
        [supervisor]
        name = "{name}"
        pythonpath = ["{TESTS}"]
        {extra}
        [sockets.http]
        address = "{address}"
        [sockets.api]
        address = "unix:{tmp}/api.sock"
        mode = "0660"

        [groups.web]
        target = "targets.sockprobe:probe"
        count = 2
        sockets = ["api", "http"]
        env = {{ PROBE_DIR = "{tmp}" }}

        [groups.plain]
        target = "targets.sockprobe:probe"
        env = {{ PROBE_DIR = "{tmp}" }}
    """))
    return path


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        name = unique("sk")
        r = mb("run", str(_fleet_file(tmp_path, name, f"127.0.0.1:{port}")), timeout=60)
    finally:
        taken.close()
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if "PID file" not in ln
             and "PID " not in ln]  # the PID file taken, then given back: info lines
    assert lines == [f"multibus: cannot start supervisor {name!r}: sockets.http: cannot bind "
                     f"127.0.0.1:{port}: address already in use; stop what uses it or change "
                     "sockets.http.address"], r.stderr
    assert not list(tmp_path.glob("*.json"))  # no worker started


@pytest.mark.timeout(90)
@pytest.mark.parametrize("launch", ["fork", "exec"])
def test_workers_inherit_the_sockets_at_fd_3_by_the_systemd_convention(tmp_path, launch):
    name = unique("sk")
    path = _fleet_file(tmp_path, name, "127.0.0.1:0",
                       "zygote = false" if launch == "exec" else "")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with running(str(path), env=env):
        st = wait_for(lambda: all_started(name, 3), 60, "3 workers STARTED")
        assert {w["launch"].split(" ")[0] for w in st["workers"]} == {launch}
        got = {s["name"]: s["address"] for s in st["sockets"]}
        assert got["api"] == f"unix:{tmp_path}/api.sock" and got["http"].startswith("127.0.0.1:")
        assert stat.S_IMODE(os.stat(tmp_path / "api.sock").st_mode) == 0o660
        for w in ("web.0", "web.1"):
            seen = json.loads((tmp_path / f"{w}.json").read_text())
            assert seen["env"] == {"LISTEN_PID": str(seen["pid"]), "LISTEN_FDS": "2",
                                   "LISTEN_FDNAMES": "api:http", "MULTIBUS_SOCKET_FDS": None}
            assert seen["fds"] == {"3": ["AF_UNIX", 1], "4": ["AF_INET", 1]}
            assert seen["sockets"]["api"] == ["AF_UNIX", str(tmp_path / "api.sock")]
            assert seen["sockets"]["http"][1] == str(tuple(
                [got["http"].rpartition(":")[0], int(got["http"].rpartition(":")[2])]))
        plain = json.loads((tmp_path / "plain.0.json").read_text())
        assert set(plain["env"].values()) == {None} and plain["sockets"] == {}
        r = mb("exit", "--name", name)
        assert r.returncode == 0, r.stderr
    assert not (tmp_path / "api.sock").exists()  # removed with the supervisor
