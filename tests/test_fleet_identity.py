"""Identity on the sockets (issue 14, part 5): a worker proves in its hello the secret its
supervisor gave it, and nobody else can take over a connected worker's routing id."""

from __future__ import annotations

import msgpack
import pytest
import zmq
from progs.procio import wait_for
from test_bridge_idle import events, unique
from test_supervisor_inproc import fleet  # noqa: F401 - the in-process supervisor fixture

from multibus.bus import Bus
from multibus.transport import wire
from multibus.transport.bridge import Bridge


@pytest.mark.timeout(60)
def test_an_impostor_of_a_worker_is_not_taken_for_it(fleet):  # noqa: F811
    bus, sup = fleet(target="targets.jobs:secret_probe", count=1)
    lost = events(bus, "peer.lost")
    bus.start()
    real = sup.table()[0]["pid"]
    ctx = zmq.Context()
    try:
        socks = []
        for ident in (b"w.0", None):  # its routing id, and a fresh one naming it
            d = ctx.socket(zmq.DEALER)
            d.linger = 0
            if ident is not None:
                d.routing_id = ident
            d.connect(sup.bridge.endpoints.control)
            d.send(wire.encode("hello", name="w.0", pid=real, epoch=7, state="STARTED",
                               down=False))
            socks.append(d)
        assert wait_for(lambda: sup.bridge.stats()["invalid"] >= 1, 5)  # the fresh one
        n = sup.bridge.stats()["disconnects"]
        for d in socks:
            d.close()
        assert wait_for(lambda: sup.bridge.stats()["disconnects"] > n, 5)
        # the real worker still answers on its own pipe, and is neither lost nor replaced
        assert sup.bridge.command("graceful", ["w.0"], wait=5)
        assert not wait_for(lambda: lost or sup.table()[0]["restarts"], 1.0), lost
        assert sup.table()[0]["pid"] == real and sup.table()[0]["state"] == "STARTED"
        # the target never sees the secret (nothing it starts inherits it)
        assert "w.0 | secret in env: False" in sup.logs
    finally:
        ctx.term()


@pytest.mark.timeout(30)
def test_a_hub_that_expects_a_secret_refuses_a_hello_without_it():
    hub_bus = Bus()
    joined = events(hub_bus, "peer.joined")
    hub = Bridge(hub_bus, role="hub", name=unique("id"), heartbeat=None).subscribe()
    buses = [hub_bus]
    try:
        hub.expect("w1", "c0ffee")
        hub.expect("w2", "beef")
        wrong: list[Bus] = []
        for name, secret in (("w1", None), ("w2", "c0ffee"), ("w3", "beef")):
            pbus = Bus()
            wrong.append(pbus)
            buses.append(pbus)
            Bridge(pbus, role="peer", name=name, endpoints=hub.endpoints, heartbeat=None,
                   secret=secret).subscribe()
        assert wait_for(lambda: hub.stats().get("invalid_auth", 0) >= 3, 5), hub.stats()
        assert not joined and not hub.peers()
        for pbus in wrong:  # while one is connected, its name is taken (no handover)
            pbus.exit()
        right = Bus()
        buses.append(right)
        Bridge(right, role="peer", name="w1", endpoints=hub.endpoints, heartbeat=None,
               secret="c0ffee").subscribe()
        assert wait_for(lambda: joined, 5) and joined[0][0] == "w1"
    finally:
        for b in reversed(buses):
            b.exit()


@pytest.mark.timeout(30)
def test_records_on_up_come_from_their_connection_and_print_on_one_line():
    hub_bus = Bus()
    logs: list[str] = []
    hub_bus.subscribe("log", lambda msg, level=20: logs.append(msg))
    joined = events(hub_bus, "peer.joined")
    hub = Bridge(hub_bus, role="hub", name=unique("id"), heartbeat=None).subscribe()
    peer_bus = Bus()
    ctx = zmq.Context()
    try:
        Bridge(peer_bus, role="peer", name="w1", endpoints=hub.endpoints,
               heartbeat=None).subscribe()
        assert wait_for(lambda: joined, 5)
        forged = wire.encode_logs("w1", [msgpack.packb(["forged as w1", 40])])
        socks = []
        for ident in (None, b"w1", b"supervisor"):  # a fresh id, the worker's, another
            d = ctx.socket(zmq.DEALER)
            d.linger = 0
            if ident is not None:
                d.routing_id = ident
            d.connect(hub.endpoints.up)
            d.send(forged)
            socks.append(d)
        # the fresh id and 'supervisor' are dropped as forged; 'w1' is taken (no handover)
        assert wait_for(lambda: hub.stats().get("invalid_origin", 0) >= 2, 5), hub.stats()
        for d in socks:
            d.close()
        peer_bus.log("one\nsupervisor x: fake line\x1b[2J", 30)
        assert wait_for(lambda: any(m.startswith("w1 | one") for m in logs), 5)
        assert r"w1 | one\nsupervisor x: fake line\x1b[2J" in logs
        assert not any("forged as w1" in m for m in logs)
    finally:
        ctx.term()
        peer_bus.exit()
        hub_bus.exit()
