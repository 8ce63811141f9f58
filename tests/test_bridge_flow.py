"""Per-peer flow control on the hub's 'down' (issue 14, part 2): a peer that does not read,
or a stranger on the '.down' endpoint, never blocks the other peers, joins or commands."""

from __future__ import annotations

import threading

import pytest
import zmq
from progs.procio import wait_for
from test_bridge_idle import events, unique

from multibus.bus import Bus
from multibus.transport.bridge import Bridge

BIG = 60_000  # bytes per message: with max_message 64 KiB, one message per frame
SMALL_FRAMES = 65_536
WINDOW = 200  # messages (12 MB) a publisher runs ahead of a reading peer, at most


@pytest.fixture
def hub():
    """A hub mirroring 'order' whose frames are small (so pipes fill after a few MB) and that
    calls a peer slow after 1 s without progress; its peers are made by ``peer(name)``."""
    bus = Bus()
    hub = Bridge(bus, role="hub", name=unique("fl"), channels=["order"], heartbeat=None,
                 max_message=SMALL_FRAMES, send_timeout=1.0).subscribe()
    buses = []
    joined = events(bus, "peer.joined")

    def peer(name: str, listener=None) -> Bus:
        pbus = Bus()
        buses.append(pbus)
        got: list[int] = []
        pbus.subscribe("order", listener or (lambda i, data: got.append(i)))
        pbus.got = got  # type: ignore[attr-defined]
        Bridge(pbus, role="peer", name=name, endpoints=hub.endpoints, channels=["order"],
               heartbeat=None, max_message=SMALL_FRAMES).subscribe()
        assert wait_for(lambda: any(j[0] == name for j in joined), 10), f"{name} never joined"
        return pbus

    hub.peer = peer  # type: ignore[attr-defined]
    try:
        yield hub
    finally:
        for pbus in buses:
            pbus.exit()
        bus.exit()


def publish(bus: Bus, n: int, start: int = 0, keep_up: Bus | None = None) -> None:
    """Publish ``n`` BIG messages; with ``keep_up`` (a peer's bus), never more than WINDOW
    ahead of what it got: a burst of over QUEUE_BYTES makes even a reading peer slow when
    the machine is busy (by design), and this test is about the peers that do not read."""
    data = b"x" * BIG
    got = None if keep_up is None else keep_up.got  # type: ignore[attr-defined]
    for i in range(start, start + n):
        if got is not None and i - len(got) > WINDOW:
            assert wait_for(lambda i=i: i - len(got) <= WINDOW, 20), len(got)
        bus.publish("order", i, data)


@pytest.mark.timeout(60)
def test_a_peer_that_never_reads_blocks_nobody(hub):
    release = threading.Event()
    slow = events(hub.bus, "peer.slow")
    healthy = hub.peer("healthy")
    hub.peer("stuck", lambda i, data: release.wait(30))  # its dispatch thread never returns
    try:
        publish(hub.bus, 2000, keep_up=healthy)  # 120 MB: far more than the stuck one holds
        assert wait_for(lambda: len(healthy.got) == 2000, 20), len(healthy.got)
        assert healthy.got == list(range(2000))
        assert wait_for(lambda: slow, 10)
        assert slow[0][0] == "stuck" and "not reading" in slow[0][1]
        info = hub.peers()
        assert info["stuck"]["slow"] and info["stuck"]["dropped"] > 0
        assert not info["healthy"]["slow"] and info["healthy"]["dropped"] == 0
        assert hub.stats()["peer_dropped"] >= info["stuck"]["dropped"] > 0
        # commands and new joins do not wait behind it either
        assert hub.command("stop", ["healthy", "stuck"], wait=2)
        late = hub.peer("late")
        publish(hub.bus, 100, start=2000, keep_up=healthy)
        assert wait_for(lambda: len(late.got) == 100 and len(healthy.got) == 2100, 10)
    finally:
        release.set()


@pytest.mark.timeout(60)
def test_frames_queued_for_a_peer_when_the_stream_ends_still_reach_it(hub):
    """An idle hub (no heartbeat) still retries a peer's queue: the retry timer used to be
    overwritten by the next tick, so what waited when the publisher stopped stayed queued."""
    gate = threading.Event()
    lagging = hub.peer("lagging", lambda i, data: gate.wait(30) and lagging.got.append(i))
    try:
        publish(hub.bus, 400)  # 24 MB: more than its pipes hold, less than QUEUE_BYTES
        # the stream is over once the I/O thread sleeps (polls with a timeout, not every 1 ms)
        assert wait_for(lambda: hub.peers()["lagging"]["queued"] and hub._io.sleeping, 10)
        gate.set()
        assert wait_for(lambda: len(lagging.got) == 400, 10), (len(lagging.got), hub.peers())
        assert lagging.got == list(range(400)) and not hub.peers()["lagging"]["dropped"]
    finally:
        gate.set()


@pytest.mark.timeout(60)
def test_a_slow_peer_that_reads_again_ends_its_episode(hub):
    gate = threading.Event()
    slow = events(hub.bus, "peer.slow")
    logs: list[str] = []
    hub.bus.subscribe("log", lambda msg, level=20: logs.append(msg))
    lagging = hub.peer("lagging", lambda i, data: gate.wait(30))
    publish(hub.bus, 2000)
    assert wait_for(lambda: slow, 10)
    gate.set()  # it reads again: the next frame that reaches it ends the episode
    assert wait_for(lambda: publish(hub.bus, 1) or len(slow) == 2, 10)
    assert slow[1] == ("lagging", "")
    assert not hub.peers()["lagging"]["slow"]
    text = "\n".join(logs)
    assert text.count("'lagging' is slow") == 1  # logged once per episode
    assert "'lagging' reads again" in text and "mirrored messages were dropped for it" in text
    del lagging


@pytest.mark.timeout(60)
def test_strangers_on_the_down_endpoint_stall_nothing(hub):
    """A raw SUB (today's protocol) and a raw DEALER that connect to '.down' and never read."""
    ctx = zmq.Context()
    socks = []
    try:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        dealer = ctx.socket(zmq.DEALER)
        dealer.routing_id = b"nobody"
        for s in (sub, dealer):
            s.rcvhwm = 1
            s.linger = 0
            s.connect(hub.endpoints.down)
            socks.append(s)
        healthy = hub.peer("healthy")
        publish(hub.bus, 1000, keep_up=healthy)
        assert wait_for(lambda: len(healthy.got) == 1000, 20), (len(healthy.got), hub.peers())
        late = hub.peer("late")  # its sync probe is not stuck behind anyone
        publish(hub.bus, 10, start=1000)
        assert wait_for(lambda: len(late.got) == 10, 10)
        assert hub.command("stop", wait=2)
    finally:
        for s in socks:
            s.close()
        ctx.term()


@pytest.mark.timeout(30)
def test_a_command_its_main_thread_never_applies_flags_the_peer(hub):
    """Acked (by its I/O thread) but never applied (its main thread is stuck): after
    send_timeout the hub says so; the flag goes once a state report shows it moved."""
    slow = events(hub.bus, "peer.slow")
    held: list = []
    pbus = Bus()
    joined = events(hub.bus, "peer.joined")
    Bridge(pbus, role="peer", name="frozen", endpoints=hub.endpoints, heartbeat=None,
           apply_via=held.append).subscribe()  # commands are queued, never run
    try:
        assert wait_for(lambda: joined, 10)
        assert hub.command("start", ["frozen"], wait=2)  # acked at once
        assert wait_for(lambda: slow, 10)
        assert slow[0][0] == "frozen" and "STARTED not applied 1s after" in slow[0][1]
        assert "main thread does not answer" in slow[0][1]
        for fn in held:  # the main thread wakes up
            fn()
        assert wait_for(lambda: len(slow) == 2, 10) and slow[1] == ("frozen", "")
    finally:
        pbus.exit()
