"""A host's name is bound to its CURVE key (issue 19): a peer whose key the hub allowed under
one name cannot join, report or log under another. In-process, over tcp on loopback."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
import zmq
from progs.procio import wait_for

from multibus.bus import Bus
from multibus.config import ConfigError, load
from multibus.transport import wire
from multibus.transport.bridge import Bridge
from multibus.transport.keys import (
    CurveConfig,
    CurveKeys,
    TransportSecurityError,
    apply_client,
    dump_curve,
    load_curve,
    load_keys,
    make_keys,
)


class Fleet:
    """A tcp hub whose allow-list binds key A to host-a and key B to host-b, and its peers;
    everything exits when the test ends, passed or not."""

    def __init__(self, stack: ExitStack) -> None:
        self.stack = stack
        self.hub_keys, self.a, self.b = (CurveKeys.generate() for _ in range(3))
        self.joined: list[str] = []
        self.logs: list[str] = []
        bus = self.bus(hub=True)
        bus.subscribe("peer.joined", lambda name, pid: self.joined.append(name))
        bus.subscribe("log", lambda msg, level=20: self.logs.append(msg))
        self.hub = Bridge(bus, role="hub", name="names-hub", endpoints="tcp://127.0.0.1:*",
                          curve=CurveConfig.hub(self.hub_keys, {self.a.public: "host-a",
                                                                self.b.public: "host-b"}),
                          heartbeat=0.25, peer_timeout=2.0).subscribe()

    def bus(self, hub: bool = False) -> Bus:
        bus = Bus()
        self.stack.callback(bus.exit)
        return bus

    def peer(self, name: str, keys: CurveKeys) -> tuple[Bus, Bridge]:
        bus = self.bus()
        bridge = Bridge(bus, role="peer", name=name, endpoints=self.hub.endpoints,
                        curve=CurveConfig.peer(keys, self.hub_keys), heartbeat=0.25,
                        peer_timeout=2.0).subscribe()
        return bus, bridge

    def raw(self, url: str, name: str, keys: CurveKeys) -> zmq.Socket:
        """A bare DEALER with ``keys`` that calls itself ``name``."""
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        self.stack.callback(sock.close, 0)
        sock.linger = 0
        sock.routing_id = name.encode()
        apply_client(sock, keys, self.hub_keys)
        sock.connect(url)
        return sock

    def refused(self) -> int:
        return self.hub.stats()["name_refused"]


@pytest.fixture
def fleet():
    with ExitStack() as stack:
        yield Fleet(stack)


@pytest.mark.timeout(40)
def test_a_host_that_joins_under_another_hosts_name_is_refused(fleet):
    impostor_bus, _ = fleet.peer("host-a", fleet.b)  # host-b's key, host-a's name
    wait_for(lambda: fleet.refused() >= 2, 10, "the impostor's hellos refused")
    assert "host-a" not in fleet.hub.peers() and fleet.joined == []
    warnings = [m for m in fleet.logs if "calling itself 'host-a'" in m]
    assert warnings and "allowed as 'host-b'" in warnings[0]
    assert len(warnings) <= 3  # rate-limited: its hellos keep coming
    # under its own name the same key joins
    fleet.peer("host-b", fleet.b)
    wait_for(lambda: "host-b" in fleet.joined, 10, "host-b joined under its own name")
    # once the impostor is gone, the real host-a joins under its name
    impostor_bus.exit()
    fleet.peer("host-a", fleet.a)
    wait_for(lambda: "host-a" in fleet.joined, 10, "the real host-a joined")
    assert fleet.joined == ["host-b", "host-a"]
    assert fleet.hub.peers()["host-a"]["connected"]


@pytest.mark.timeout(30)
def test_a_frame_under_another_name_gets_no_answer_on_control_nor_passes_up(fleet):
    ep = fleet.hub.endpoints
    hello = wire.encode("hello", name="host-a", pid=1, epoch=1, state="STARTED", down=False)
    control = fleet.raw(ep.control, "host-a", fleet.b)
    control.send(hello)
    wait_for(lambda: fleet.refused() >= 1, 10, "the hello refused")
    assert control.poll(300) == 0  # not even a 'who': the hub refused it as it read it
    before = fleet.hub.stats()
    up = fleet.raw(ep.up, "host-a", fleet.b)
    up.send(b"not even a frame")
    wait_for(lambda: fleet.refused() > before["name_refused"], 10, "the 'up' frame refused")
    after = fleet.hub.stats()
    assert after["invalid"] == before["invalid"]  # refused for its name, before decoding
    # a stranger's key never gets that far: the ZAP handler refuses its handshake
    fleet.raw(ep.control, "host-c", CurveKeys.generate()).send(hello)
    wait_for(lambda: fleet.hub.stats()["zap_refused"] >= 1, 10, "the stranger refused")
    assert fleet.hub.peers() == {}
    # host-a's own key under its own name is welcome
    control.close(0)  # the impostor's connection gives the name back (soon: said again)
    ok = fleet.raw(ep.control, "host-a", fleet.a)
    wait_for(lambda: ok.send(hello) or ok.poll(100), 10, "a welcome for the real host-a")
    assert wire.decode(ok.recv())[0] == "welcome"


def test_allow_lists_bind_keys_to_names_and_travel_with_them():
    hub, a, b = (CurveKeys.generate() for _ in range(3))
    cfg = CurveConfig.hub(hub, {a.public: "host-a", b.public: None})
    assert cfg.allowed == {a.public, b.public}
    assert cfg.key_names() == {a.public: "host-a", b.public: None}
    assert load_curve(dump_curve(cfg)) == cfg
    assert CurveConfig.hub(hub, [a, b]).names == ()  # a plain list: any name
    with pytest.raises(TransportSecurityError, match="peer name"):
        CurveConfig.hub(hub, {a.public: "no/slash"})
    with pytest.raises(TransportSecurityError, match="empty CURVE allow-list"):
        CurveConfig.hub(hub, {})


def _parent(tmp_path: Path, allow: str) -> Path:
    f = tmp_path / "parent.toml"
    f.write_text('[downstream]\nlisten = "tcp://0.0.0.0:7000"\nkey = "keys/parent.key_secret"\n'
                 f"allow = {allow}\n")
    return f


def test_downstream_allow_names_each_keys_host(tmp_path):
    for n in ("parent", "host-b", "other", "job.1"):
        make_keys(tmp_path / "keys", n)
    pub = {n: load_keys(tmp_path / "keys" / f"{n}.key").public for n in ("host-b", "other")}
    cfg = load(_parent(tmp_path, '["keys/host-b.key", { host-c = "keys/other.key" }]'))
    assert cfg.downstream.curve.key_names() == {pub["host-b"]: "host-b",
                                                pub["other"]: "host-c"}
    for allow, why in (
        ('["keys/job.1.key"]', "not shaped like a worker name"),
        ('["keys/host-b.key", { host-b = "keys/other.key" }]', "one key per host"),
        ('[{ x = "keys/host-b.key" }, { y = "keys/host-b.key" }]', "one host per key"),
        ("[1]", "key files or { HOST = FILE } tables"),
        ("[]", "the public key files of the hosts allowed to join"),
    ):
        with pytest.raises(ConfigError, match="downstream.allow") as err:
            load(_parent(tmp_path, allow))
        assert why in str(err.value) and "\n" not in str(err.value), str(err.value)
