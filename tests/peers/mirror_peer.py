"""Test program: a peer bus + Bridge that the bridge tests drive from a hub.

Usage: python mirror_peer.py ENDPOINTS NAME [--cherrypy] [--heartbeat S] [--timeout S]
                             [--exit-on-hub-lost]

Mirrors 'data', 'done', 'report' and 'burst'. It checks that the 'data' publishes it gets are
0, 1, 2, ... and on 'done' publishes ``report(name, count, in_order)``; on ``burst(n)`` it
publishes ``data(i)`` for i in range(n), then ``report(name, -1, True)``. Prints ``READY pid``
once subscribed, ``HUB_JOINED``, ``HUB_LOST reason monotonic_time`` and ``STATE name`` lines
for the test to read. With --cherrypy the bus is the real ``cherrypy.engine``.
"""

import argparse
import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(3)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("endpoints")
    p.add_argument("name")
    p.add_argument("--cherrypy", action="store_true")
    p.add_argument("--heartbeat", type=float, default=0.1)
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--exit-on-hub-lost", action="store_true")
    p.add_argument("--parent", type=int, default=0)
    args = p.parse_args()
    if args.parent:
        die_with_parent(args.parent)

    from multibus.transport.bridge import Bridge

    if args.cherrypy:
        import cherrypy

        bus = cherrypy.engine
        bus.autoreload.unsubscribe()
    else:
        from multibus.bus import Bus

        bus = Bus()

    out_lock = threading.Lock()

    def out(*words: object) -> None:
        # one write per line under a lock: print() from several threads interleaves words
        line = " ".join(map(str, words)) + "\n"
        with out_lock:
            sys.stdout.write(line)
            sys.stdout.flush()

    expected = [0]
    in_order = [True]

    def on_data(i: int) -> None:
        if i != expected[0]:
            in_order[0] = False
        expected[0] = i + 1

    def on_done() -> None:
        bus.publish("report", args.name, expected[0], in_order[0])
        expected[0] = 0
        in_order[0] = True

    def on_burst(n: int) -> None:
        tracking = expected[0], in_order[0]
        for i in range(n):
            bus.publish("data", i)
        expected[0], in_order[0] = tracking  # our own publishes are not hub data
        bus.publish("report", args.name, -1, True)

    def on_hub_lost(reason: str) -> None:
        out("HUB_LOST", reason, repr(time.monotonic()))
        if args.exit_on_hub_lost:
            bus.exit()

    bus.subscribe("data", on_data)
    bus.subscribe("done", on_done)
    bus.subscribe("burst", on_burst)
    bus.subscribe("hub.joined", lambda name: out("HUB_JOINED", name))
    bus.subscribe("hub.lost", on_hub_lost)
    bus.subscribe("log", lambda msg, level=20: msg.startswith("Bus ") and out("STATE", msg[4:]))
    bridge = Bridge(
        bus, role="peer", name=args.name, endpoints=args.endpoints,
        channels=["data", "done", "report", "burst"],
        heartbeat=args.heartbeat, peer_timeout=args.timeout,
    ).subscribe()
    out("READY", os.getpid())
    bus.block()
    out("EXITED", bridge.stats().get("invalid", 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
