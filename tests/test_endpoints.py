"""Endpoints: parsing, hub names, and private ipc endpoints claimed one hub per name.

The runtime dir itself is tested in test_rundir.py."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from multibus.rundir import runtime_dir, sweep_stale
from multibus.transport.endpoints import (
    IPC_PATH_MAX,
    Endpoints,
    HubNameInUse,
    InvalidEndpoint,
    check_name,
    ipc_owner,
    private_ipc,
    remove_ipc,
)

# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, control, down, up",
    [
        ("ipc:///run/x/hub", "ipc:///run/x/hub.control", "ipc:///run/x/hub.down",
         "ipc:///run/x/hub.up"),
        ("tcp://127.0.0.1:5550", "tcp://127.0.0.1:5550", "tcp://127.0.0.1:5551",
         "tcp://127.0.0.1:5552"),
        ("tcp://[::1]:7000", "tcp://[::1]:7000", "tcp://[::1]:7001", "tcp://[::1]:7002"),
        ("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*"),
        ("inproc://t", "inproc://t.control", "inproc://t.down", "inproc://t.up"),
        ("tcp://127.0.0.1:9, tcp://127.0.0.1:40000,ipc:///x/u",
         "tcp://127.0.0.1:9", "tcp://127.0.0.1:40000", "ipc:///x/u"),
    ],
)
def test_parse_and_round_trip(text, control, down, up):
    ep = Endpoints.parse(text)
    assert (ep.control, ep.down, ep.up) == (control, down, up)
    assert Endpoints.parse(ep.to_string()) == ep
    assert Endpoints.parse(ep) is ep


def test_compact_forms():
    assert Endpoints.ipc("/r/hub").to_string() == "ipc:///r/hub"
    assert Endpoints.tcp("127.0.0.1", 6000).to_string() == "tcp://127.0.0.1:6000"
    odd = Endpoints("tcp://127.0.0.1:1", "tcp://127.0.0.1:5", "tcp://127.0.0.1:3")
    assert odd.to_string() == "tcp://127.0.0.1:1,tcp://127.0.0.1:5,tcp://127.0.0.1:3"
    assert Endpoints.ipc("/r/hub").ipc_paths() == [Path(f"/r/hub.{s}") for s in
                                                   ("control", "down", "up")]
    assert not Endpoints.ipc("/r/hub").is_network
    assert Endpoints.tcp().is_network


@pytest.mark.parametrize(
    "text",
    ["", "hub", "udp://1.2.3.4:5", "ipc://", "tcp://127.0.0.1", "tcp://:5550",
     "tcp://127.0.0.1:65534", "tcp://127.0.0.1:http", "ipc:///a,ipc:///b"],
)
def test_parse_rejects_garbage(text):
    with pytest.raises(InvalidEndpoint):
        Endpoints.parse(text)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["a", "web", "web-1", "web_1.blue", "A" * 64, "0"])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "a/b", "..", ".hidden", "-x", "a b", "x" * 65, "caf\u00e9", "a\x00b", "a:b"]
)
def test_bad_names_are_refused(xdg, name):
    with pytest.raises(InvalidEndpoint, match="invalid hub name"):
        private_ipc(name)


def test_ipc_path_length_limit(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 100)
    deep.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    with pytest.raises(InvalidEndpoint) as err:
        private_ipc("hub")
    msg = str(err.value)
    assert f"{IPC_PATH_MAX}-byte limit" in msg and "shorter" in msg


# --------------------------------------------------------------------------- one hub per name


def test_private_ipc_endpoints_are_bindable_and_removed(xdg):
    ep = private_ipc("hub")
    try:
        assert ep == Endpoints.ipc(xdg / "multibus" / "hub")
        assert ipc_owner("hub") == os.getpid()
        ctx = zmq.Context()
        socks = [ctx.socket(zmq.ROUTER), ctx.socket(zmq.XPUB), ctx.socket(zmq.PULL)]
        try:
            for s, url in zip(socks, ep.urls(), strict=True):
                s.linger = 0
                s.bind(url)
            assert all(stat.S_ISSOCK(os.lstat(p).st_mode) for p in ep.ipc_paths())
        finally:
            for s in socks:
                s.close()
            ctx.term()
    finally:
        assert remove_ipc(ep)
    assert not any(p.exists() for p in ep.ipc_paths())
    assert not (xdg / "multibus" / "hub.lock").exists()
    assert ipc_owner("hub") is None
    remove_ipc(private_ipc("hub"))  # the name is free again


def test_second_hub_in_same_process_is_refused(xdg):
    ep = private_ipc("hub")
    try:
        with pytest.raises(HubNameInUse) as err:
            private_ipc("hub")
        assert err.value.pid == os.getpid()
        assert str(os.getpid()) in str(err.value)
    finally:
        remove_ipc(ep)


_HOLDER = """
import sys
from multibus.transport.endpoints import private_ipc
ep = private_ipc(sys.argv[1])
print(ep.to_string(), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(xdg):
    """Start another process that holds hub 'held'; yields (process, endpoints)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, "held"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line, "holder process failed to start"
        yield proc, Endpoints.parse(line)
    finally:
        proc.kill()
        proc.wait(timeout=5)
        proc.stdin.close()
        proc.stdout.close()


@pytest.mark.timeout(20)
def test_second_hub_in_another_process_is_refused_then_takes_over_when_it_dies(holder):
    proc, ep = holder
    assert ipc_owner("held") == proc.pid
    with pytest.raises(HubNameInUse) as err:
        private_ipc("held")
    assert err.value.pid == proc.pid
    assert f"pid {proc.pid}" in str(err.value)
    # remove_ipc never pulls a live hub's sockets away
    Path(ep.ipc_paths()[0]).touch()
    assert remove_ipc(ep) is False
    assert ep.ipc_paths()[0].exists()

    proc.kill()
    proc.wait(timeout=5)
    # the flock died with its owner: the name is free without any cleanup
    assert ipc_owner("held") is None
    mine = private_ipc("held")
    try:
        assert mine == ep
        assert ipc_owner("held") == os.getpid()
    finally:
        remove_ipc(mine)


def test_claim_removes_stale_sockets_of_a_dead_hub(xdg):
    ep = private_ipc("hub")
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.linger = 0
    s.bind(ep.control)
    s.close()
    ctx.term()
    remove_ipc(ep)
    # simulate a crashed hub: a socket file is left behind, nobody holds the lock
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.linger = 0
    s.bind(ep.control)
    path = ep.ipc_paths()[0]
    assert path.exists()
    try:
        again = private_ipc("hub")
        assert not path.exists()
        remove_ipc(again)
    finally:
        s.close()
        ctx.term()


def test_ipc_owner_without_runtime_dir(xdg):
    assert ipc_owner("nobody") is None


def _leave_socket_file(path: Path) -> None:
    """Create the unix socket file a killed hub leaves behind (nobody listening)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))


@pytest.mark.timeout(20)
def test_killed_hubs_leftovers_are_swept_but_live_hubs_are_not(holder):
    proc, ep = holder
    for p in ep.ipc_paths():
        _leave_socket_file(p)
    stray = ep.ipc_paths()[0].with_suffix(".notes")
    stray.write_text("not ours to delete")
    lock = Path(str(ep.ipc_paths()[0]).removesuffix(".control") + ".lock")
    assert sweep_stale() == 0  # the owner is alive: nothing is touched
    assert lock.exists() and all(p.exists() for p in ep.ipc_paths())

    proc.kill()
    proc.wait(timeout=5)
    mine = private_ipc("other")  # claiming any name sweeps the dead hub's leftovers
    try:
        assert not lock.exists()
        assert not any(p.exists() for p in ep.ipc_paths())
        assert ipc_owner("held") is None
        assert (runtime_dir() / "other.lock").exists()
    finally:
        remove_ipc(mine)
    assert stray.exists()  # only sockets and the lock of a dead hub are removed
