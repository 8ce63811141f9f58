"""Time the Bridge against raw pyzmq between the same two processes; print a table and ratios.

    python benchmarks/bench_bridge.py [--count 50000] [--size 100] [--rounds 3]

One parent, one child started by exec (``sys.executable``, never fork). Each round runs:

* raw PUB/SUB: parent XPUB -> child SUB over ipc, ``--size``-byte payload plus an 8-byte
  sequence number, sent only once the subscription has arrived (no slow-joiner loss) with
  XPUB_NODROP so nothing is lost at the HWM; the child checks the sequence.
* mirrored publishes: ``hub_bus.publish('bench.tick', i, payload)`` on the parent, dispatched
  to a listener on the child's bus that checks ``i`` (0 lost required).
  rate = messages / (child's last receipt - parent's first send), on the system-wide monotonic
  clock both processes share.
* raw ROUTER/DEALER ping-pong over ipc (parent sends, child answers), and the same with only
  what one-thread-per-socket adds: an I/O thread owning the ROUTER and a polling child (info:
  the floor under any bridge that obeys the rule).
* lifecycle round trip: ``hub.command('graceful', [peer], wait=...)`` until the ack is seen on
  the hub (target); also until the peer's 'Bus graceful' log reaches the hub (info).

Rows report the best round. Targets: mirrored >= 0.5x raw; round trip <= 2x raw. Every wait
has a deadline (``--timeout``), so a lost message or a stuck peer ends the run with a report.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import select
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from multibus.rundir import runtime_dir  # noqa: E402

SEQ = struct.Struct("!Q")
PEER = "bench"
CHANNELS = ("bench.tick", "bench.ping")


# --------------------------------------------------------------------------- parent <-> child


class Channel:
    """Line-delimited JSON over two pipes, with deadlines on reads (select, no threads)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd
        self.buf = b""

    def send(self, **msg: Any) -> None:
        data = (json.dumps(msg) + "\n").encode()
        while data:
            data = data[os.write(self.write_fd, data):]

    def recv(self, timeout: float) -> dict[str, Any] | None:
        """Next message, or None if none arrives within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                return None
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                raise EOFError("the other process closed its pipe")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def expect(self, key: str, timeout: float) -> dict[str, Any]:
        msg = self.recv(timeout)
        if msg is None:
            raise TimeoutError(f"no {key!r} from the other process within {timeout:.0f}s")
        if "error" in msg:
            raise RuntimeError(f"other process failed: {msg['error']}")
        if key not in msg:
            raise RuntimeError(f"expected {key!r}, got {msg}")
        return msg


def _bridge_classes():
    """Imported late: the raw rows run without the Bridge (ImportError = rows skipped)."""
    bus = importlib.import_module("multibus.bus")
    bridge = importlib.import_module("multibus.transport.bridge")
    return bus.Bus, bridge.Bridge


# --------------------------------------------------------------------------- child side


class ChildBridge:
    """The child's bus + peer bridge, kept for all bridge phases of the run."""

    def __init__(self, endpoints: str, timeout: float) -> None:
        Bus, Bridge = _bridge_classes()

        self.timeout = timeout
        self.bus = Bus()
        self.pinged = threading.Event()
        self.done = threading.Event()
        self.reset(0)
        self.bus.subscribe("bench.ping", lambda *a: self.pinged.set())
        self.bus.subscribe("bench.tick", self.on_tick)
        self.bridge = Bridge(self.bus, role="peer", name=PEER, endpoints=endpoints,
                             channels=CHANNELS)
        self.bridge.subscribe()
        self.bus.start()

    def reset(self, count: int) -> None:
        self.count, self.expected, self.lost, self.received = count, 0, 0, 0
        self.bad_payload, self.t_last = 0, 0.0
        self.done.clear()

    def on_tick(self, i: int, payload: bytes) -> None:
        if i != self.expected:
            self.lost += max(0, i - self.expected)
        self.expected = i + 1
        self.received += 1
        if len(payload) != self.size:
            self.bad_payload += 1
        if i == self.count - 1:
            self.t_last = time.monotonic()
            self.done.set()

    def mirror(self, count: int, size: int, chan: Channel) -> dict[str, Any]:
        self.size = size
        self.reset(count)
        chan.send(armed=True)
        finished = self.done.wait(self.timeout)
        if not finished:  # the tail was lost or is stuck: report what arrived
            self.lost += count - self.expected
        return dict(mirror=True, received=self.received, lost=self.lost,
                    bad_payload=self.bad_payload, t_last=self.t_last, finished=finished,
                    stats=self.bridge.stats())

    def close(self) -> None:
        self.bus.exit()


def child_raw_pubsub(ctx: zmq.Context, url: str, count: int, size: int,
                     timeout: float) -> dict[str, Any]:
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.rcvhwm = 0  # the receiver never drops; the sender's NODROP applies back-pressure
    sub.rcvtimeo = int(timeout * 1000)
    sub.subscribe(b"")
    sub.connect(url)
    expected = lost = received = bad = 0
    t_last = 0.0
    try:
        while expected < count:
            try:
                frame = sub.recv(copy=True)
            except zmq.Again:
                break
            (i,) = SEQ.unpack_from(frame)
            if i != expected:
                lost += max(0, i - expected)
            expected = i + 1
            received += 1
            if len(frame) != SEQ.size + size:
                bad += 1
        t_last = time.monotonic()
    finally:
        sub.close()
    lost += count - expected
    return dict(raw=True, received=received, lost=lost, bad_payload=bad, t_last=t_last)


def child_raw_pingpong(ctx: zmq.Context, url: str, timeout: float,
                       poll: bool = False) -> dict[str, Any]:
    """Answer pings. ``poll``: wait in a Poller that also watches an eventfd, as an I/O
    thread serving more than one socket does, instead of a blocking recv()."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.rcvtimeo = int(timeout * 1000)
    dealer.connect(url)
    poller = zmq.Poller()
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    poller.register(dealer, zmq.POLLIN)
    poller.register(efd, zmq.POLLIN)
    answered = 0
    try:
        dealer.send(b"hello")
        while True:
            try:
                if poll and not poller.poll(int(timeout * 1000)):
                    break
                msg = dealer.recv(zmq.NOBLOCK if poll else 0)
            except zmq.Again:
                break
            if msg == b"done":
                break
            dealer.send(b"ack" + msg[3:])
            answered += 1
    finally:
        dealer.close()
        os.close(efd)
    return dict(pingpong=True, answered=answered)


def child_main(cmd_fd: int, result_fd: int) -> int:
    chan = Channel(cmd_fd, result_fd)
    ctx = zmq.Context()
    bridge: ChildBridge | None = None
    try:
        while True:
            msg = chan.recv(3600)
            if msg is None or msg["phase"] == "quit":
                return 0
            try:
                phase = msg["phase"]
                if phase == "raw_pubsub":
                    chan.send(**child_raw_pubsub(ctx, msg["url"], msg["count"], msg["size"],
                                                 msg["timeout"]))
                elif phase == "raw_pingpong":
                    chan.send(**child_raw_pingpong(ctx, msg["url"], msg["timeout"],
                                                   msg.get("poll", False)))
                elif phase == "bridge_setup":
                    bridge = ChildBridge(msg["endpoints"], msg["timeout"])
                    ok = bridge.pinged.wait(msg["timeout"])
                    chan.send(ready=ok, pid=os.getpid())
                elif phase == "bridge_mirror":
                    assert bridge is not None
                    chan.send(**bridge.mirror(msg["count"], msg["size"], chan))
                else:
                    chan.send(error=f"unknown phase {phase!r}")
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
                chan.send(error=f"{type(exc).__name__}: {exc}")
    except EOFError:
        return 0
    finally:
        if bridge is not None:
            bridge.close()
        ctx.destroy(linger=0)


# --------------------------------------------------------------------------- parent: raw


def raw_pubsub(ctx: zmq.Context, chan: Channel, url: str, count: int, size: int,
               timeout: float) -> dict[str, Any]:
    pub = ctx.socket(zmq.XPUB)
    pub.linger = 0
    pub.setsockopt(zmq.XPUB_NODROP, 1)
    pub.bind(url)
    try:
        chan.send(phase="raw_pubsub", url=url, count=count, size=size, timeout=timeout)
        if not pub.poll(int(timeout * 1000)):
            raise TimeoutError("raw SUB never subscribed")
        pub.recv()  # the subscription: from here on nothing is dropped
        payload = b"x" * size
        pack = SEQ.pack
        send = pub.send
        t0 = time.monotonic()
        for i in range(count):
            send(pack(i) + payload)  # blocks at the HWM under XPUB_NODROP: back-pressure
        t_sent = time.monotonic()
        res = chan.expect("raw", timeout + 5)
    finally:
        pub.close()
    return _rate(res, count, t0, t_sent)


def raw_pingpong(ctx: zmq.Context, chan: Channel, url: str, count: int,
                 timeout: float, handoff: bool = False) -> dict[str, Any]:
    """The caller sends a ping on a ROUTER and waits for the answer. ``handoff``: what the
    one-thread-per-socket rule adds and nothing else (the floor of any bridge that follows
    it): the caller hands each ping to an I/O thread that owns the ROUTER (a deque and an
    eventfd) and blocks on a lock that thread releases on the answer; the child polls."""
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.rcvtimeo = int(timeout * 1000)
    router.bind(url)
    samples: list[float] = []
    try:
        chan.send(phase="raw_pingpong", url=url, timeout=timeout, poll=handoff)
        ident, hello = router.recv_multipart()
        assert hello == b"hello"
        clock = time.perf_counter
        if handoff:
            samples = _handoff_pings(router, ident, count, timeout)
        else:
            for i in range(count):
                body = b"cmd" + SEQ.pack(i)
                t = clock()
                router.send_multipart([ident, body])
                reply = router.recv_multipart()
                samples.append(clock() - t)
                assert reply[1] == b"ack" + body[3:], reply
        router.send_multipart([ident, b"done"])
        res = chan.expect("pingpong", timeout)
        assert res["answered"] == count, res
    finally:
        router.close()
    return _latency(samples)


def _rate(res: dict[str, Any], count: int, t0: float, t_sent: float) -> dict[str, Any]:
    elapsed = res["t_last"] - t0 if res["received"] else float("nan")
    return dict(rate=count / elapsed if res["lost"] == 0 and elapsed > 0 else 0.0,
                received=res["received"], lost=res["lost"], bad=res["bad_payload"],
                send_rate=count / (t_sent - t0), elapsed=elapsed)


def _handoff_pings(router: zmq.Socket, ident: bytes, count: int,
                   timeout: float) -> list[float]:
    """Pings through an I/O thread that owns ``router`` until it ends (then this thread owns
    it again): see :func:`raw_pingpong`."""
    calls: collections.deque[tuple[bytes, threading.Lock]] = collections.deque()
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    done = threading.Event()

    def io() -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(efd, zmq.POLLIN)
        waiter = None
        while not done.is_set():
            events = dict(poller.poll(int(timeout * 1000)))
            if efd in events:
                os.eventfd_read(efd)
            while calls:
                body, waiter = calls.popleft()
                router.send_multipart([ident, body], zmq.NOBLOCK)
            if router in events:
                router.recv_multipart(zmq.NOBLOCK)
                if waiter is not None:
                    waiter.release()
                    waiter = None

    thread = threading.Thread(target=io, name="bench-io", daemon=True)
    thread.start()
    samples = []
    clock = time.perf_counter
    try:
        for i in range(count):
            lock = threading.Lock()
            lock.acquire()
            t = clock()
            calls.append((b"cmd" + SEQ.pack(i), lock))
            os.eventfd_write(efd, 1)
            if not lock.acquire(timeout=timeout):
                raise TimeoutError("raw hand-off ping-pong: no answer")
            samples.append(clock() - t)
    finally:
        done.set()
        os.eventfd_write(efd, 1)
        thread.join(timeout + 1)
        os.close(efd)
    return samples


def _latency(samples: list[float]) -> dict[str, Any]:
    s = sorted(samples)
    return dict(p50=statistics.median(s), p90=s[int(len(s) * 0.9)],
                p99=s[min(len(s) - 1, int(len(s) * 0.99))], mean=statistics.fmean(s), n=len(s))


# --------------------------------------------------------------------------- parent: bridge


class HubSide:
    """The parent's bus + hub bridge, and what it observes of the peer (on its own bus)."""

    def __init__(self, chan: Channel, timeout: float) -> None:
        Bus, Bridge = _bridge_classes()
        self.timeout = timeout
        self.bus = Bus()
        self.cond = threading.Condition()
        self.seen: dict[tuple[str, str], int] = {}  # (kind, value) -> count, for the peer
        self.bus.subscribe("peer.state", self._on_state)
        self.bus.subscribe("peer.log", self._on_log)
        self.bridge = Bridge(self.bus, role="hub", name=f"bench-{os.getpid()}",
                             channels=CHANNELS)
        self.bridge.subscribe()
        try:
            self.bus.start()
            self._handshake(chan)
        except BaseException:
            self.bus.exit()
            raise

    def _handshake(self, chan: Channel) -> None:
        timeout = self.timeout
        chan.send(phase="bridge_setup", endpoints=self.bridge.endpoints.to_string(),
                  timeout=timeout)
        # publish pings until the child's listener saw one: the mirror path is live end to end
        deadline = time.monotonic() + timeout
        while (msg := chan.recv(0.005)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError("child bridge never received a mirrored ping")
            self.bus.publish("bench.ping")
        if not msg.get("ready"):
            raise RuntimeError(f"child bridge not ready: {msg}")
        self.child_pid = msg["pid"]
        self._wait_count(("state", "STARTED"), 0, "the peer's STARTED state report")

    def _bump(self, key: tuple[str, str]) -> None:
        with self.cond:
            self.seen[key] = self.seen.get(key, 0) + 1
            self.cond.notify_all()

    def _on_state(self, name: str, state: str) -> None:
        if name == PEER:
            self._bump(("state", state))

    def _on_log(self, name: str, msg: str, level: int) -> None:
        if name == PEER:
            self._bump(("log", msg))

    def _count(self, key: tuple[str, str]) -> int:
        with self.cond:
            return self.seen.get(key, 0)

    def _wait_count(self, key: tuple[str, str], before: int, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        with self.cond:
            while self.seen.get(key, 0) <= before:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out waiting for {what}")
                self.cond.wait(left)

    def mirror(self, chan: Channel, count: int, size: int) -> dict[str, Any]:
        chan.send(phase="bridge_mirror", count=count, size=size)
        chan.expect("armed", self.timeout)
        payload = b"x" * size
        publish = self.bus.publish
        t0 = time.monotonic()
        for i in range(count):
            publish("bench.tick", i, payload)
        t_sent = time.monotonic()
        res = chan.expect("mirror", self.timeout + 5)
        out = _rate(res, count, t0, t_sent)
        out["child_stats"] = res.get("stats")
        return out

    def roundtrip(self, action: str, key: tuple[str, str], count: int) -> dict[str, Any]:
        """``hub.command(action)`` until the peer's report ``key`` reaches the hub's bus."""
        samples = []
        clock = time.perf_counter
        command = self.bridge.command
        for _ in range(count):
            before = self._count(key)
            t = clock()
            command(action, [PEER])
            self._wait_count(key, before, f"{key} after command({action!r})")
            samples.append(clock() - t)
        return _latency(samples)

    def ack_rtt(self, count: int) -> dict[str, Any]:
        """``hub.command('graceful', [peer], wait=...)``: until the peer's ack reached the hub
        (the round trip issue 3 names). The peer applies each graceful after acking it."""
        samples = []
        clock = time.perf_counter
        command = self.bridge.command
        timeout = self.timeout
        key = ("log", "Bus graceful")
        for _ in range(count):
            before = self._count(key)
            t = clock()
            if not command("graceful", [PEER], wait=timeout):
                raise TimeoutError(f"no ack within {timeout}s for command('graceful')")
            samples.append(clock() - t)
            # untimed: the peer applies and reports this graceful before the next command,
            # so no sample pays for the previous one's tail (the raw ping-pong has none)
            self._wait_count(key, before, "the graceful to be applied")
        return _latency(samples)

    def command_rtt(self, count: int) -> dict[str, Any]:
        """graceful: the peer acks, applies it and its 'Bus graceful' log reaches the hub."""
        return self.roundtrip("graceful", ("log", "Bus graceful"), count)

    def stop_start_rtt(self, count: int) -> dict[str, Any]:
        """stop -> STOPPED state report, then start -> STARTED; one sample per transition."""
        samples = []
        for _ in range(max(1, count // 2)):
            for action, state in (("stop", "STOPPED"), ("start", "STARTED")):
                samples.append(self.roundtrip(action, ("state", state), 1)["p50"])
        return _latency(samples)

    def close(self) -> None:
        self.bus.exit()


# --------------------------------------------------------------------------- idle cost


def _ctx_switches(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (thread name, voluntary context switches) of every thread of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                text = f.read()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
        out[int(tid)] = (fields.get("Name", "?").strip(),
                         int(fields.get("voluntary_ctxt_switches", "0")))
    return out


def idle_child(endpoints: str, count: int, heartbeat: float | None) -> int:
    """``count`` idle peers (each with its own context) until stdin closes."""
    Bus, Bridge = _bridge_classes()
    buses = []
    for i in range(count):
        bus = Bus()
        Bridge(bus, role="peer", name=f"idle{i}", endpoints=endpoints,
               heartbeat=heartbeat).subscribe()
        bus.start()
        buses.append(bus)
    sys.stdin.read()
    for bus in buses:
        bus.exit()
    return 0


def idle_main(seconds: float, peers: int, heartbeat: float | None) -> int:
    """Wake-ups per second of an idle hub with ``peers`` idle peers (another process), per
    thread, from /proc voluntary context switches over ``seconds``."""
    Bus, Bridge = _bridge_classes()
    bus = Bus()
    joined = threading.Semaphore(0)
    bus.subscribe("peer.joined", lambda name, pid: joined.release())
    bridge = Bridge(bus, role="hub", name=f"idle-{os.getpid()}", heartbeat=heartbeat)
    bridge.subscribe()
    bus.start()
    hb = "none" if heartbeat is None else str(heartbeat)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--idle-child", bridge.endpoints.to_string(), str(peers), hb],
        stdin=subprocess.PIPE, process_group=0,
    )
    try:
        for _ in range(peers):
            if not joined.acquire(timeout=20):
                raise TimeoutError("idle peers did not join in 20 s")
        time.sleep(1.0)  # let the joins settle (sync probes, state reports)
        before = _ctx_switches(os.getpid())
        cbefore = _ctx_switches(proc.pid)
        time.sleep(seconds)
        after = _ctx_switches(os.getpid())
        cafter = _ctx_switches(proc.pid)
        print(f"idle: hub + {peers} peers (other process), heartbeat={hb}, {seconds:g} s")
        for label, b, a in (("hub", before, after), ("peers", cbefore, cafter)):
            total = 0
            for tid, (name, n) in sorted(a.items()):
                if tid in b:
                    d = n - b[tid][1]
                    if label == "hub" and name.startswith("python") and tid == os.getpid():
                        continue  # this measuring thread (sleeping)
                    total += d
                    if d:
                        print(f"  {label} {name:18} tid {tid}: {d / seconds:8.2f} wakes/s")
            print(f"  {label} process total (bridge threads): {total / seconds:.2f} wakes/s")
        return 0
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        bus.exit()


# --------------------------------------------------------------------------- main


def spawn_child() -> tuple[subprocess.Popen, Channel]:
    cmd_r, cmd_w = os.pipe()
    res_r, res_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(cmd_r), str(res_w)],
        pass_fds=[cmd_r, res_w], process_group=0,
    )
    os.close(cmd_r)
    os.close(res_w)
    return proc, Channel(res_r, cmd_w)


def fmt_rate(r: float) -> str:
    return f"{r:,.0f}/s" if r else "LOST"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="messages per mirror round")
    parser.add_argument("--size", type=int, default=100, help="payload bytes")
    parser.add_argument("--pings", type=int, default=2_000, help="raw ping-pongs per round")
    parser.add_argument("--commands", type=int, default=300, help="lifecycle commands per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=20.0, help="deadline per wait (s)")
    parser.add_argument("--raw-only", action="store_true", help="skip the Bridge rows")
    parser.add_argument("--idle", type=float, metavar="SECONDS",
                        help="instead: measure an idle hub's wake-ups per second")
    parser.add_argument("--idle-peers", type=int, default=10)
    parser.add_argument("--heartbeat", default="0.5", help="for --idle: seconds or 'none'")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--idle-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(*args.child)
    if args.idle_child:
        ep, n, hb = args.idle_child
        return idle_child(ep, int(n), None if hb == "none" else float(hb))
    if args.idle:
        hb = None if args.heartbeat == "none" else float(args.heartbeat)
        return idle_main(args.idle, args.idle_peers, hb)

    tmp = Path(tempfile.mkdtemp(prefix="bench-", dir=runtime_dir()))
    proc, chan = spawn_child()
    ctx = zmq.Context()
    hub: HubSide | None = None
    rows: dict[str, list[dict[str, Any]]] = {
        k: [] for k in ("raw", "mirror", "ping", "handoff", "ack", "cmd", "state")
    }
    bridge_error = None
    try:
        if not args.raw_only:
            try:
                hub = HubSide(chan, args.timeout)
            except ImportError as exc:
                bridge_error = f"Bridge not available ({exc})"
        for r in range(args.rounds):
            rows["raw"].append(raw_pubsub(ctx, chan, f"ipc://{tmp}/pub{r}", args.count,
                                          args.size, args.timeout))
            if hub:
                rows["mirror"].append(hub.mirror(chan, args.count, args.size))
            rows["ping"].append(raw_pingpong(ctx, chan, f"ipc://{tmp}/rtr{r}", args.pings,
                                             args.timeout))
            rows["handoff"].append(raw_pingpong(ctx, chan, f"ipc://{tmp}/hnd{r}", args.pings,
                                                args.timeout, handoff=True))
            if hub:
                rows["ack"].append(hub.ack_rtt(args.commands))
                rows["cmd"].append(hub.command_rtt(args.commands))
                rows["state"].append(hub.stop_start_rtt(args.commands // 3))
        report(args, rows, bridge_error)
        return 0
    finally:
        if hub is not None:
            hub.close()
        try:
            chan.send(phase="quit")
        except OSError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(chan.read_fd)
        os.close(chan.write_fd)
        ctx.destroy(linger=0)
        shutil.rmtree(tmp, ignore_errors=True)


def report(args, rows: dict[str, list[dict[str, Any]]], bridge_error: str | None) -> None:
    print(f"Python {sys.version.split()[0]}, pyzmq {zmq.__version__}, libzmq "
          f"{zmq.zmq_version()}, {os.cpu_count()} CPUs; best of {args.rounds} rounds; "
          f"{args.count} msgs x {args.size} B; {args.pings} pings; {args.commands} commands")
    raw = max(rows["raw"], key=lambda r: r["rate"])
    ping = min(rows["ping"], key=lambda r: r["p50"])
    print(f"{'case':44} {'multibus':>14} {'raw pyzmq':>14} {'ratio':>7}  target")
    if rows["mirror"]:
        mir = max(rows["mirror"], key=lambda r: r["rate"])
        lost = sum(r["lost"] for r in rows["mirror"])
        ratio = mir["rate"] / raw["rate"]
        print(f"{'mirrored publish parent->child (msg/s)':44} {fmt_rate(mir['rate']):>14} "
              f"{fmt_rate(raw['rate']):>14} {ratio:6.2f}x  >= 0.5x "
              f"{'OK' if ratio >= 0.5 and not lost else 'MISS'}")
        print(f"{'  hub publish() call rate (msg/s)':44} {fmt_rate(mir['send_rate']):>14} "
              f"{fmt_rate(raw['send_rate']):>14}")
        print(f"{'  lost (all rounds)':44} {lost:>14} "
              f"{sum(r['lost'] for r in rows['raw']):>14}")
    else:
        print(f"{'raw PUB/SUB (msg/s)':44} {'-':>14} {fmt_rate(raw['rate']):>14}")
    if rows["cmd"]:
        ack = min(rows["ack"], key=lambda r: r["p50"])
        ratio = ack["p50"] / ping["p50"]
        print(f"{'command(graceful, wait=) ack round trip p50':44} {ack['p50'] * 1e6:14.1f} "
              f"{ping['p50'] * 1e6:14.1f} {ratio:6.2f}x  <= 2x "
              f"{'OK' if ratio <= 2 else 'MISS'}")
        for q in ("p90", "p99", "mean"):
            print(f"{'  ' + q + ' (us)':44} {ack[q] * 1e6:14.1f} {ping[q] * 1e6:14.1f} "
                  f"{ack[q] / ping[q]:6.2f}x")
        hnd = min(rows["handoff"], key=lambda r: r["p50"])
        print(f"{'raw + I/O-thread hand-off + poller p50 (us)':44} {hnd['p50'] * 1e6:14.1f} "
              f"{ping['p50'] * 1e6:14.1f} {hnd['p50'] / ping['p50']:6.2f}x  (floor, info)")
        cmd = min(rows["cmd"], key=lambda r: r["p50"])
        print(f"{'graceful applied + logged on hub p50 (us)':44} {cmd['p50'] * 1e6:14.1f} "
              f"{ping['p50'] * 1e6:14.1f} {cmd['p50'] / ping['p50']:6.2f}x  (info)")
        st = min(rows["state"], key=lambda r: r["p50"])
        print(f"{'stop->STOPPED / start->STARTED p50 (us)':44} {st['p50'] * 1e6:14.1f} "
              f"{ping['p50'] * 1e6:14.1f} {st['p50'] / ping['p50']:6.2f}x  (info)")
    else:
        print(f"{'raw ROUTER/DEALER round trip p50 (us)':44} {'-':>14} "
              f"{ping['p50'] * 1e6:14.1f}")
    if bridge_error:
        print(f"(Bridge rows skipped: {bridge_error})")
    print("per round: raw " + ", ".join(fmt_rate(r["rate"]) for r in rows["raw"])
          + (("; mirror " + ", ".join(fmt_rate(r["rate"]) for r in rows["mirror"]))
             if rows["mirror"] else ""))


if __name__ == "__main__":
    sys.exit(main())
