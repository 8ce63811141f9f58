"""Bridge in one process (hub and peer on two buses): mirroring, commands, hostile hub."""

from __future__ import annotations

import os
import random
import threading

import msgpack
import pytest
import zmq
from progs.procio import wait_for

from multibus.bus import Bus, ChannelFailures, states
from multibus.rundir import runtime_dir
from multibus.transport import wire
from multibus.transport.bridge import Bridge
from multibus.transport.endpoints import Endpoints


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}-{random.getrandbits(24):x}"


class Recorder:
    def __init__(self, bus: Bus, *channels: str) -> None:
        self.events: list[tuple] = []
        for ch in channels:
            bus.subscribe(ch, lambda *a, ch=ch, **kw: self.events.append((ch, a, kw)))

    def of(self, channel: str) -> list[tuple]:
        return [(a, kw) for ch, a, kw in self.events if ch == channel]


@pytest.fixture
def pair():
    """A hub and a peer bridge, joined; both buses exited afterwards."""
    hub_bus, peer_bus = Bus(), Bus()
    hub_rec = Recorder(hub_bus, "peer.joined", "peer.state", "peer.lost", "peer.log", "log",
                       "order")
    peer_rec = Recorder(peer_bus, "hub.joined", "hub.lost", "order", "graceful")
    hub = Bridge(hub_bus, role="hub", name=unique("h"), channels=["order"], heartbeat=0.1,
                 peer_timeout=1.0).subscribe()
    peer = Bridge(peer_bus, role="peer", name="w1", endpoints=hub.endpoints, channels=["order"],
                  heartbeat=0.1, peer_timeout=1.0).subscribe()
    try:
        assert wait_for(lambda: hub_rec.of("peer.joined"))
        yield hub, peer, hub_rec, peer_rec
    finally:
        peer_bus.exit()
        hub_bus.exit()


def test_constructor_refuses_bad_arguments_clearly():
    bus = Bus()
    with pytest.raises(ValueError, match="role must be 'hub' or 'peer'"):
        Bridge(bus, role="boss", name="x")
    with pytest.raises(ValueError, match="invalid bridge name"):
        Bridge(bus, role="hub", name="-bad name")
    for ch in ("main", "start", "log", "peer.x"):
        with pytest.raises(ValueError, match="cannot be mirrored"):
            Bridge(bus, role="hub", name="x", channels=[ch])
    with pytest.raises(ValueError, match="heartbeat < peer_timeout"):
        Bridge(bus, role="hub", name="x", heartbeat=2, peer_timeout=1)
    with pytest.raises(ValueError, match="needs the hub's endpoints"):
        Bridge(bus, role="peer", name="x")


def test_mirror_both_ways_with_kwargs_no_echo(pair):
    hub, peer, hub_rec, peer_rec = pair
    hub.bus.publish("order", "BUY", 20, "DXBZ", tags=("a", "b"), limit=None)
    peer.bus.publish("order", "SELL", 5, "ACME")
    assert wait_for(lambda: len(peer_rec.of("order")) == 2 and len(hub_rec.of("order")) == 2)
    # each side saw its own publish once (locally) and the other's once (from the wire)
    assert sorted(peer_rec.of("order")) == [
        (("BUY", 20, "DXBZ"), {"tags": ["a", "b"], "limit": None}),  # tuples arrive as lists
        (("SELL", 5, "ACME"), {}),
    ]
    assert sorted(hub_rec.of("order")) == [
        (("BUY", 20, "DXBZ"), {"tags": ("a", "b"), "limit": None}),  # its own, untouched
        (("SELL", 5, "ACME"), {}),
    ]
    # nothing bounces back later
    peer.bus.publish("order", "END", 0, "X")
    assert wait_for(lambda: len(hub_rec.of("order")) == 3)
    assert len(peer_rec.of("order")) == 3
    assert hub.stats()["sent"] == 1 and peer.stats()["sent"] == 2
    assert hub.stats()["received"] == 2 and peer.stats()["received"] == 1


@pytest.mark.parametrize("relay", [True, False])
def test_relay_off_keeps_peers_publishes_on_the_hub_and_origin_names_the_sender(relay):
    """A hub relays a peer's publishes to the other peers, unless made with relay=False
    (a parent's hosts: they hear the parent only). Either way its own publishes reach every
    peer, and a hub listener learns the sender from Bridge.origin()."""
    hub_bus, bus1, bus2 = Bus(), Bus(), Bus()
    seen_by_hub: list[tuple] = []
    hub = Bridge(hub_bus, role="hub", name=unique("h"), channels=["order"], heartbeat=None,
                 relay=relay)
    hub_bus.subscribe("order", lambda *a: seen_by_hub.append((a, hub.origin())))
    hub.subscribe()
    rec2 = Recorder(bus2, "order")
    peers = [Bridge(b, role="peer", name=n, endpoints=hub.endpoints, channels=["order"],
                    heartbeat=None) for b, n in ((bus1, "w1"), (bus2, "w2"))]
    try:
        for p in peers:
            p.subscribe()
        assert wait_for(lambda: all(v["joined"] for v in hub.peers().values())
                        and len(hub.peers()) == 2, what="both peers joined")
        bus1.publish("order", "BUY", 1)
        assert wait_for(lambda: seen_by_hub, what="the hub got w1's publish")
        assert seen_by_hub == [(("BUY", 1), "w1")]
        assert hub.origin() is None  # outside a delivery
        # what the hub publishes now reaches w2 after anything relayed before it
        hub_bus.publish("order", "MARK", 0)
        assert wait_for(lambda: (("MARK", 0), {}) in rec2.of("order"), what="the hub's mark")
        got = rec2.of("order")
        assert got == ([(("BUY", 1), {}), (("MARK", 0), {})] if relay else [(("MARK", 0), {})])
        assert hub.stats()["relayed"] == (1 if relay else 0)
    finally:
        for b in (bus1, bus2, hub_bus):
            b.exit()


def test_publish_of_unmirrorable_value_raises_in_publisher(pair):
    hub, _, _, _ = pair
    with pytest.raises(ChannelFailures, match="cannot mirror publish on 'order'"):
        hub.bus.publish("order", object())
    with pytest.raises(ChannelFailures, match="limit"):
        hub.bus.publish("order", b"x" * (hub.max_message + 10))
    assert hub.stats()["refused"] == 2


def test_commands_states_logs_and_graceful_once(pair):
    hub, peer, hub_rec, peer_rec = pair
    assert hub.command("start", wait=5) is True  # acked (received) by the connected peer
    assert wait_for(lambda: hub.peers()["w1"]["state"] == "STARTED")
    assert peer.bus.state is states.STARTED
    hub.command("graceful")
    hub.command("stop")
    assert wait_for(lambda: hub.peers()["w1"]["state"] == "STOPPED")
    # the table changes on the I/O thread, the 'peer.state' events follow on the dispatch one
    expected = ["STOPPED", "STARTING", "STARTED", "STOPPING", "STOPPED"]
    assert wait_for(lambda: [a[1] for a, _ in hub_rec.of("peer.state")] == expected), \
        hub_rec.of("peer.state")
    assert len(peer_rec.of("graceful")) == 1
    logs = [a[0] for a, _ in hub_rec.of("log")]
    assert "w1 | Bus STARTED" in logs and "w1 | Bus graceful" in logs
    assert logs.index("w1 | Bus graceful") < logs.index("w1 | Bus STOPPING")
    assert (("w1", "Bus STARTED", 20), {}) in hub_rec.of("peer.log")
    stats = peer.stats()
    assert stats["cmd_applied"] == 3 and stats["cmd_received"] == 3
    with pytest.raises(ValueError, match="unknown action"):
        hub.command("dance")
    with pytest.raises(Exception, match="for the hub"):
        peer.command("start")


def test_exit_command_closes_peer_threads_and_reports_exited(pair):
    hub, peer, hub_rec, _ = pair
    hub.command("start")
    hub.command("exit")
    assert wait_for(lambda: peer.bus.state is states.EXITING)
    assert wait_for(lambda: (("w1", "exited"), {}) in hub_rec.of("peer.lost"))
    assert wait_for(lambda: not [t for t in threading.enumerate()
                                 if t.name.endswith("-w1") and t.name.startswith("bridge-")])
    assert hub.peers()["w1"] == {**hub.peers()["w1"], "state": "EXITING", "connected": False}


def test_peer_without_channels_uses_control_only_and_applies_events_via_apply_via():
    """No mirrored channel: no 'down' connection, joined at hello without a sync probe, logs
    and states still arrive; with ``apply_via`` its events run there, in order, and it has no
    dispatch thread. The hub still mirrors to a peer that has channels."""
    hub_bus, quiet_bus, data_bus = Bus(), Bus(), Bus()
    hub_rec = Recorder(hub_bus, "peer.joined", "peer.state", "peer.log", "peer.lost")
    quiet_rec = Recorder(quiet_bus, "hub.joined", "order")
    data_rec = Recorder(data_bus, "order")
    ran: list[object] = []

    def apply_via(func):  # runs at once, in the I/O thread: enough to see what goes through
        ran.append(getattr(func, "args", func))
        func()

    hub = Bridge(hub_bus, role="hub", name=unique("h"), channels=["order"],
                 heartbeat=None).subscribe()
    quiet = Bridge(quiet_bus, role="peer", name="quiet", endpoints=hub.endpoints,
                   heartbeat=None, apply_via=apply_via).subscribe()
    data = Bridge(data_bus, role="peer", name="data", endpoints=hub.endpoints,
                  channels=["order"], heartbeat=None).subscribe()
    try:
        assert wait_for(lambda: {a[0] for a, _ in hub_rec.of("peer.joined")} == {"quiet", "data"})
        assert len(quiet._io._sockets) == 2 and quiet._io.data_in is None
        assert len(data._io._sockets) == 3
        assert hub.peers()["quiet"]["joined"]
        # the hub counts it joined once it sent the welcome; the peer may not have read it yet
        assert wait_for(lambda: quiet_rec.of("hub.joined") == [((hub.name,), {})])
        assert ("hub.joined", (hub.name,)) in ran  # the event went through apply_via
        assert quiet._dispatch.thread is None
        quiet_bus.log("from the quiet one", 30)
        assert wait_for(lambda: (("quiet", "from the quiet one", 30), {}) in hub_rec.of("peer.log"))
        hub.bus.publish("order", "BUY", 1)
        assert wait_for(lambda: data_rec.of("order") == [(("BUY", 1), {})])
        assert quiet_rec.of("order") == []
        assert hub.command("start", wait=5)
        assert wait_for(lambda: hub.peers()["quiet"]["state"] == "STARTED")
        hub.command("exit", "quiet")
        assert wait_for(lambda: (("quiet", "exited"), {}) in hub_rec.of("peer.lost"))
        quiet_states = [a[1] for a, _ in hub_rec.of("peer.state") if a[0] == "quiet"]
        assert quiet_states == ["STOPPED", "STARTING", "STARTED", "STOPPING", "STOPPED",
                                "EXITING"]
        assert hub.stats().get("invalid", 0) == 0 and quiet.stats().get("invalid", 0) == 0
    finally:
        data_bus.exit()
        quiet_bus.exit()
        hub_bus.exit()


def test_input_paused_for_a_slow_listener_resumes_without_other_traffic():
    """The I/O thread stops reading mirrored frames while DISPATCH_BACKLOG of them wait for
    the dispatch thread; when that thread catches up it must wake the I/O thread: with
    heartbeat=None nothing else would, and the rest of the frames would sit in the socket."""
    from multibus.transport.bridge import DISPATCH_BACKLOG

    hub_bus, peer_bus = Bus(), Bus()
    gate = threading.Event()
    got: list[int] = []

    def slow(i: int, payload: bytes) -> None:
        gate.wait(10)
        got.append(i)

    hub_bus.subscribe("order", slow)
    total = DISPATCH_BACKLOG * 3
    big = 8192  # max_message: one 4000-byte publish per frame
    hub = Bridge(hub_bus, role="hub", name=unique("h"), channels=["order"], heartbeat=None,
                 max_message=big).subscribe()
    peer = Bridge(peer_bus, role="peer", name="w1", endpoints=hub.endpoints,
                  channels=["order"], heartbeat=None, max_message=big).subscribe()
    try:
        wait_for(lambda: hub.peers().get("w1", {}).get("joined"), what="the peer to join")
        for i in range(total):
            peer_bus.publish("order", i, b"x" * 4000)
        wait_for(lambda: hub.stats()["dispatch_backlog"] >= DISPATCH_BACKLOG,
                 what="the hub to pause its input")
        wait_for(lambda: peer.stats().get("frames_out", 0) >= total,
                 what="the peer to hand every frame to its socket")
        gate.set()
        wait_for(lambda: len(got) == total, timeout=10)
        assert got == list(range(total)), f"{len(got)} of {total} publishes dispatched"
    finally:
        gate.set()
        peer_bus.exit()
        hub_bus.exit()


def test_hub_exit_removes_ipc_files_and_threads():
    bus = Bus()
    hub = Bridge(bus, role="hub", name=unique("x")).subscribe()
    paths = hub.endpoints.ipc_paths()
    assert all(p.exists() for p in paths)
    bus.exit()
    assert not any(p.exists() for p in paths)
    assert not [t for t in threading.enumerate() if t.name.startswith(f"bridge-io-{hub.name}")]


def test_peer_follows_a_restarted_hub():
    name = unique("r")
    hub_bus, peer_bus = Bus(), Bus()
    rec = Recorder(peer_bus, "hub.joined", "hub.lost")
    hub = Bridge(hub_bus, role="hub", name=name, heartbeat=0.1, peer_timeout=1).subscribe()
    Bridge(peer_bus, role="peer", name="w1", endpoints=hub.endpoints, heartbeat=0.1,
                  peer_timeout=1).subscribe()
    hub2_bus = Bus()
    try:
        assert wait_for(lambda: rec.of("hub.joined"))
        hub_bus.exit()
        assert wait_for(lambda: rec.of("hub.lost"))
        hub2 = Bridge(hub2_bus, role="hub", name=name, heartbeat=0.1, peer_timeout=1)
        hub2.subscribe()
        hub2.command("start")
        assert wait_for(lambda: peer_bus.state is states.STARTED, 10)
        assert len(rec.of("hub.joined")) == 2
        assert wait_for(lambda: hub2.peers()["w1"]["state"] == "STARTED")
    finally:
        peer_bus.exit()
        hub2_bus.exit()
        hub_bus.exit()


class FakeDown:
    """A hub's 'down' ROUTER that talks to one peer: ``send``/``send_multipart`` address
    ``ident``; ``recv()`` returns once that peer's connection is up (its handshake)."""

    def __init__(self, ctx: zmq.Context, ident: bytes) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.ident = ident
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)

    def send(self, frame: bytes) -> None:
        self.sock.send_multipart([self.ident, frame])

    def send_multipart(self, frames: list[bytes]) -> None:
        self.sock.send_multipart([self.ident, *frames])

    def recv(self) -> None:
        assert self.monitor.poll(10_000), "the peer never connected to 'down'"
        self.monitor.recv_multipart()

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close()


@pytest.fixture
def fake_hub():
    """Raw sockets where a hub would be, to feed a peer (named w1) garbage."""
    ctx = zmq.Context()
    base = runtime_dir() / unique("f")
    ep = Endpoints.ipc(base)
    router, xpub, pull = ctx.socket(zmq.ROUTER), FakeDown(ctx, b"w1"), ctx.socket(zmq.ROUTER)
    for s, url in ((router, ep.control), (xpub.sock, ep.down), (pull, ep.up)):
        s.linger = 0
        s.bind(url)
    try:
        yield ep, router, xpub, pull
    finally:
        for s in (router, xpub, pull):
            s.close()
        ctx.term()
        for p in ep.ipc_paths():
            p.unlink(missing_ok=True)


def test_peer_survives_and_counts_a_hostile_hub(fake_hub):
    ep, router, xpub, pull = fake_hub
    bus = Bus()
    rec = Recorder(bus, "order", "log")
    peer = Bridge(bus, role="peer", name="w1", endpoints=ep, channels=["order"],
                  heartbeat=0.1, peer_timeout=5).subscribe()
    try:
        hello = router.recv_multipart()  # the peer says hello
        assert hello[0] == b"w1" and wire.decode(hello[1])[0] == "hello"
        xpub.recv()  # its subscription: the down path exists
        rng = random.Random(3)
        bad = [rng.randbytes(rng.randint(0, 50)) for _ in range(300)]
        bad += [msgpack.packb({"v": 1, "k": "cmd", "epoch": "x"})] * 50
        for frame in bad:
            router.send_multipart([b"w1", frame])
            xpub.send(frame)
        router.send_multipart([b"w1", b"a", b"b"])  # wrong frame count
        xpub.send_multipart([b"a", b"b"])
        expected = 2 * len(bad) + 2
        assert wait_for(lambda: peer.stats()["invalid"] >= expected), peer.stats()
        assert peer.stats()["invalid"] == expected

        # a sequence gap is detected and logged with its size
        def pub(seq, n):
            entries = [msgpack.packb([i]) for i in range(n)]
            return wire.encode_pub("hubx", 9, seq, [("order", False, entries)])

        xpub.send(pub(0, 3))
        xpub.send(pub(10, 2))  # 7 lost
        assert wait_for(lambda: len(rec.of("order")) == 5)
        stats = peer.stats()
        assert stats["gaps"] == 1 and stats["lost"] == 7
        assert any("gap of 7 messages from 'hubx'" in a[0] for a, _ in rec.of("log"))
        assert bus.state is states.STOPPED and peer._io.thread.is_alive()
    finally:
        bus.exit()
