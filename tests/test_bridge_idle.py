"""Bridge with ``heartbeat=None``: no timers while idle, death seen through the connection,
and a peer that lost its hub closes without lingering."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest
import zmq
from progs.procio import wait_for

from multibus.bus import Bus
from multibus.transport import wire
from multibus.transport.bridge import Bridge


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}-{random.getrandbits(24):x}"


def events(bus: Bus, channel: str) -> list[tuple]:
    got: list[tuple] = []
    bus.subscribe(channel, lambda *a: got.append(a))
    return got


def switches(thread: threading.Thread) -> int:
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


@pytest.fixture
def quiet_pair():
    hub_bus, peer_bus = Bus(), Bus()
    joined = events(hub_bus, "peer.joined")
    hub = Bridge(hub_bus, role="hub", name=unique("q"), heartbeat=None).subscribe()
    peer = Bridge(peer_bus, role="peer", name="w1", endpoints=hub.endpoints,
                  heartbeat=None).subscribe()
    try:
        assert wait_for(lambda: joined)
        yield hub, peer
    finally:
        peer_bus.exit()
        hub_bus.exit()


@pytest.mark.timeout(20)
def test_idle_io_threads_do_not_wake(quiet_pair):
    hub, peer = quiet_pair
    hub.bus.start()
    assert hub.command("start", wait=5)
    assert wait_for(lambda: hub.peers()["w1"]["state"] == "STARTED")
    time.sleep(0.3)  # settle: the last acks and state reports (not a synchronisation)
    threads = [hub._io.thread, peer._io.thread, hub._dispatch.thread, peer._dispatch.thread]
    before = [switches(t) for t in threads]
    time.sleep(1.0)
    woke = [switches(t) - b for t, b in zip(threads, before, strict=True)]
    assert max(woke) <= 1, woke
    # and the bridge still works after sleeping without a timeout
    assert hub.command("stop", wait=5)
    assert wait_for(lambda: hub.peers()["w1"]["state"] == "STOPPED")


@pytest.mark.timeout(20)
def test_hub_without_heartbeats_sees_a_vanished_peer():
    bus = Bus()
    lost = events(bus, "peer.lost")
    joined = events(bus, "peer.joined")
    hub = Bridge(bus, role="hub", name=unique("q"), heartbeat=None).subscribe()
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.routing_id = b"ghost"
        dealer.connect(hub.endpoints.control)
        sub = ctx.socket(zmq.DEALER)  # 'down' is a ROUTER sending to each peer by name
        sub.routing_id = b"ghost"
        sub.connect(hub.endpoints.down)
        dealer.send(wire.encode("hello", name="ghost", pid=os.getpid(), epoch=7,
                                state="STOPPED", down=True))
        assert dealer.poll(5000)
        assert wire.decode(dealer.recv())[0] == "welcome"
        # answer the sync probe so the hub counts it joined
        deadline = time.monotonic() + 5
        while not joined and time.monotonic() < deadline:
            if sub.poll(100):
                kind, msg = wire.decode(sub.recv())
                if kind == "sync":
                    dealer.send(wire.encode("ready", token=msg["token"]))
        assert wait_for(lambda: joined)
        dealer.close(linger=0)  # gone without a word, as after SIGKILL
        assert wait_for(lambda: ("ghost", "disconnected") in lost, 3), lost
        sub.close(linger=0)
    finally:
        bus.exit()
        ctx.term()


@pytest.mark.timeout(20)
def test_peer_that_lost_its_hub_closes_without_lingering():
    hub_bus, peer_bus = Bus(), Bus()
    joined = events(hub_bus, "peer.joined")
    lost = events(peer_bus, "hub.lost")
    hub = Bridge(hub_bus, role="hub", name=unique("q"), channels=["x"],
                 heartbeat=None).subscribe()
    peer = Bridge(peer_bus, role="peer", name="w1", endpoints=hub.endpoints, channels=["x"],
                  heartbeat=None).subscribe()
    try:
        assert wait_for(lambda: joined)
        hub_bus.exit()
        assert wait_for(lambda: lost, 3)
        assert lost[0] == ("disconnected",)
        for i in range(200):  # queued for a hub that is gone
            peer_bus.publish("x", i)
        t = time.monotonic()
        peer_bus.exit()
        assert time.monotonic() - t < 0.5
        assert not peer._io.thread.is_alive()
    finally:
        peer_bus.exit()
        hub_bus.exit()


@pytest.mark.timeout(20)
def test_mixed_heartbeat_settings_do_not_time_each_other_out():
    """A side without heartbeats answers the other's, so neither reports the other lost."""
    buses = [Bus() for _ in range(4)]
    hub_a_lost, hub_b_lost = events(buses[0], "peer.lost"), events(buses[2], "peer.lost")
    peer_a_lost, peer_b_lost = events(buses[1], "hub.lost"), events(buses[3], "hub.lost")
    try:
        hub_a = Bridge(buses[0], role="hub", name=unique("qa"), heartbeat=None).subscribe()
        Bridge(buses[1], role="peer", name="w1", endpoints=hub_a.endpoints, heartbeat=0.05,
               peer_timeout=0.3).subscribe()
        hub_b = Bridge(buses[2], role="hub", name=unique("qb"), heartbeat=0.05,
                       peer_timeout=0.3).subscribe()
        Bridge(buses[3], role="peer", name="w1", endpoints=hub_b.endpoints,
               heartbeat=None).subscribe()
        assert wait_for(lambda: hub_a.peers().get("w1", {}).get("joined"))
        assert wait_for(lambda: hub_b.peers().get("w1", {}).get("joined"))
        # absence check: several timeouts long, nobody may be reported lost
        assert not wait_for(lambda: hub_a_lost or hub_b_lost or peer_a_lost or peer_b_lost, 1.0)
    finally:
        for bus in reversed(buses):
            bus.exit()


@pytest.mark.timeout(20)
def test_peer_without_heartbeats_follows_a_restarted_hub():
    from multibus.bus import states

    name = unique("qr")
    hub_bus, peer_bus, hub2_bus = Bus(), Bus(), Bus()
    joined = events(peer_bus, "hub.joined")
    lost = events(peer_bus, "hub.lost")
    hub = Bridge(hub_bus, role="hub", name=name, heartbeat=None).subscribe()
    Bridge(peer_bus, role="peer", name="w1", endpoints=hub.endpoints,
           heartbeat=None).subscribe()
    try:
        assert wait_for(lambda: joined)
        hub_bus.exit()
        assert wait_for(lambda: lost)
        hub2 = Bridge(hub2_bus, role="hub", name=name, heartbeat=None).subscribe()
        assert hub2.command("start", wait=5) is not None
        assert wait_for(lambda: peer_bus.state is states.STARTED, 10)
        assert len(joined) == 2
        assert wait_for(lambda: hub2.peers()["w1"]["state"] == "STARTED")
    finally:
        peer_bus.exit()
        hub2_bus.exit()
        hub_bus.exit()


@pytest.mark.timeout(20)
def test_probe_heartbeats_are_answered_once_not_bounced(quiet_pair):
    """After a control disconnect the hub probes its peers with an hb; a peer without
    heartbeats answers it, and the hub (without heartbeats either) must not answer the answer:
    the two once bounced hb frames at full CPU forever after any worker died."""
    hub, peer = quiet_pair
    lost = events(hub.bus, "peer.lost")
    ctx = zmq.Context()
    try:
        ghost = ctx.socket(zmq.DEALER)
        ghost.routing_id = b"ghost"
        ghost.connect(hub.endpoints.control)
        ghost.send(wire.encode("hello", name="ghost", pid=os.getpid(), epoch=7,
                               state="STOPPED", down=False))
        assert ghost.poll(5000) and wire.decode(ghost.recv())[0] == "welcome"
        ghost.close(linger=0)  # gone without a word: the hub probes every peer
        assert wait_for(lambda: ("ghost", "disconnected") in lost, 3), lost
    finally:
        ctx.term()
    time.sleep(0.7)  # past the last scheduled probe (PROBE_DELAYS); a window, not a sync
    before = hub.stats()["frames_in"], peer.stats()["frames_in"]
    time.sleep(0.5)
    after = hub.stats()["frames_in"], peer.stats()["frames_in"]
    assert after == before, (before, after)
    assert peer.stats()["frames_in"] < 20  # welcome, commands, a few probes: no bouncing
