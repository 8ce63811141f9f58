"""Issue 14's numbers: a supervisor under floods, a stuck peer, 200 workers under ulimit -n 1024.

    python benchmarks/bench_floods.py [--conns 1100] [--invalid 25000] [--ops 2000]
                                      [--zap 1000] [--orders-seconds 10] [--big 200]

Each part is bounded (counts and deadlines) and cleans up after itself. Printed:

* stuck: a fleet of bank, broker and a third worker whose 'order' listener never returns, all
  mirroring 'order' (``targets.jobs:order_*``): the healthy broker's orders per second over
  ``--orders-seconds`` s, measured after the stuck peer's queue has filled.
* floods on a ``multibus run`` supervisor started under ``ulimit -n 1024``: ``--conns``
  connections to ``<name>.ctl``, ``--invalid`` invalid control requests, ``--ops`` queued
  ``restart`` ops; ZAP: ``--zap`` connections with unknown CURVE keys to a tcp hub Bridge in a
  process of its own. After each: the process's RSS, its CPU time spent by the flood, its CPU%
  over the next 2 s (idle is 0), and whether it still answers ``status``.
* big: ``--big`` workers started and exited under ``ulimit -Sn 1024`` (the soft limit: with a
  hard limit of 1024 too, 200 workers are refused up front, naming the limit: issue 14 part 3):
  time to all STARTED, exit status, processes left.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, "tests")
sys.path[:0] = [ROOT, TESTS]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
TICK = os.sysconf("SC_CLK_TCK")


def usage(pid: int) -> tuple[float, float]:
    """(RSS MiB, CPU seconds) of ``pid``, all threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS"))
    return rss / 1024, cpu


def wait_for(pred, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step)


def run(args: list[str], log, ulimit: str | None = "-n 1024") -> subprocess.Popen:
    """``multibus run ARGS`` under ``ulimit ULIMIT`` ('-n 1024': soft and hard; '-Sn 1024':
    the soft limit only, which the supervisor raises to the hard one)."""
    cmd = [sys.executable, "-m", "multibus", "run", *args]
    if ulimit:
        cmd = ["bash", "-c", f"ulimit {ulimit} && exec \"$@\"", "run", *cmd]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT)


def status(name: str) -> dict | None:
    from multibus.control import ControlClient

    try:
        return ControlClient(name, timeout=10).status()
    except Exception:  # noqa: BLE001
        return None


def started(name: str, n: int) -> bool:
    st = status(name)
    return bool(st and len(st["workers"]) == n
                and all(w["state"] == "STARTED" for w in st["workers"]))


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def report(what: str, pid: int, before: tuple[float, float], answers: bool) -> None:
    rss, cpu = usage(pid)
    t0 = time.monotonic()
    time.sleep(2.0)  # measuring an interval, not synchronising
    after = usage(pid)[1]
    idle = 100 * (after - cpu) / (time.monotonic() - t0)
    print(f"  {what:<34} RSS {rss:6.1f} MiB (was {before[0]:.1f})  "
          f"flood CPU {cpu - before[1]:5.2f} s  CPU after {idle:4.1f} %  answers status: {answers}")


# -- the parts ---------------------------------------------------------------------------------

def stuck_peer(seconds: float, tmp: str) -> None:
    name = f"bfstuck{os.getpid()}"
    toml = os.path.join(tmp, "stuck.toml")
    with open(toml, "w") as f:
        f.write(f'[supervisor]\nname = "{name}"\nstop_timeout = 2.0\n'
                '[groups.bank]\ntarget = "targets.jobs:order_bank"\nchannels = ["order"]\n'
                '[groups.broker]\ntarget = "targets.jobs:order_broker"\nchannels = ["order"]\n'
                '[groups.stuck]\ntarget = "targets.jobs:order_stuck"\nchannels = ["order"]\n')
    log_path = os.path.join(tmp, "stuck.log")
    with open(log_path, "w") as log:
        proc = run([toml], log, ulimit=None)
    try:
        wait_for(lambda: started(name, 3), 60)
        time.sleep(5.0)  # let the stuck peer's queue fill (an interval, not a sync)

        def orders() -> int:
            with open(log_path, errors="replace") as f:
                got = re.findall(r"broker\.0 +\| orders (\d+)", f.read())
            return int(got[-1]) if got else 0
        n0, t0 = orders(), time.monotonic()
        time.sleep(seconds)
        n1, t1 = orders(), time.monotonic()
        st = status(name) or {}
        stuck = [w for w in st.get("workers", []) if w["group"] == "stuck"]
        print(f"stuck peer: healthy broker got {(n1 - n0) / (t1 - t0):,.0f} orders/s over "
              f"{t1 - t0:.0f} s (total {n1:,}); stuck worker state "
              f"{[(w['state'], w.get('stuck')) for w in stuck]}; bank publishes 20 per 5 ms")
    finally:
        print(f"  exit status {stop(proc)}")


def floods(conns: int, invalid: int, ops: int, tmp: str) -> None:
    import msgpack
    import zmq

    from multibus.control import ControlClient
    from multibus.rundir import runtime_dir

    name = f"bfflood{os.getpid()}"
    with open(os.path.join(tmp, "flood.log"), "w") as log:
        proc = run(["targets.jobs:job", "-n", "2", "--name", name], log)
    try:
        wait_for(lambda: started(name, 2), 60)
        pid = ControlClient(name).pid() or proc.pid
        print(f"floods on supervisor pid {pid} (ulimit -n 1024):")
        ctl = f"ipc://{runtime_dir()}/{name}.ctl"
        ctx = zmq.Context()
        ctx.set(zmq.MAX_SOCKETS, conns + 100)  # libzmq's default is 1023 per context
        before = usage(pid)
        socks = []
        for _ in range(conns):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ctl)
            socks.append(s)
        time.sleep(1.0)  # the connections are made asynchronously by libzmq
        ok = status(name) is not None
        for s in socks:
            s.close(0)
        report(f"{conns} ctl connections", pid, before, ok)

        before = usage(pid)
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.connect(ctl)
        for i in range(invalid):
            s.send_multipart([b"", b"\xc1garbage" if i % 2 else msgpack.packb({"cmd": 7})])
        time.sleep(1.0)
        s.close(0)
        st = status(name)
        report(f"{invalid} invalid requests", pid, before, st is not None)
        if st:
            print(f"    counters: {st.get('counters', {}).get('control')}")

        before = usage(pid)
        client = ControlClient(name, timeout=10)
        refused = 0
        for _ in range(ops):
            try:
                client.op("restart")
            except Exception:  # noqa: BLE001 - past the bound: refused, as it should be
                refused += 1
        st = status(name)
        report(f"{ops} queued restart ops ({refused} refused)", pid, before, st is not None)
        ctx.term()
    finally:
        t0 = time.monotonic()
        code = stop(proc)
        print(f"  SIGTERM -> exit {code} in {time.monotonic() - t0:.1f} s")


ZAP_HUB = """
import sys, time
from multibus.bus import Bus
from multibus.transport.bridge import Bridge
from multibus.transport.keys import CurveConfig, CurveKeys, dump_curve
hub_keys, good = CurveKeys.generate(), CurveKeys.generate()
bus = Bus()
hub = Bridge(bus, role="hub", name="zapbench", endpoints="tcp://127.0.0.1:*",
             curve=CurveConfig.hub(hub_keys, [good])).subscribe()
print(hub.endpoints.control, hub_keys.public.decode() if isinstance(hub_keys.public, bytes)
      else hub_keys.public, flush=True)
while True:
    line = sys.stdin.readline()
    if not line:
        break
    print(hub.stats()["zap_refused"], flush=True)
bus.exit()
"""


def zap(n: int) -> None:
    import zmq

    from multibus.transport.keys import CurveKeys, apply_client

    hub = subprocess.Popen([sys.executable, "-c", ZAP_HUB], cwd=ROOT, env=ENV, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        endpoint, public = hub.stdout.readline().split()

        def refused() -> int:
            hub.stdin.write("?\n")
            hub.stdin.flush()
            return int(hub.stdout.readline())
        before = usage(hub.pid)
        ctx = zmq.Context()
        done = 0
        t0 = time.monotonic()
        while done < n:
            batch = min(50, n - done)
            socks = []
            for _ in range(batch):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.RECONNECT_IVL, -1)
                apply_client(s, CurveKeys.generate(), public)
                s.connect(endpoint)
                socks.append(s)
            done += batch
            wait_for(lambda want=done: refused() >= want, 20)
            for s in socks:
                s.close(0)
        took = time.monotonic() - t0
        print(f"ZAP: {n} unknown CURVE keys refused in {took:.1f} s (hub process {hub.pid}):")
        report(f"{n} ZAP refusals", hub.pid, before, refused() >= n)
        ctx.term()
    finally:
        hub.stdin.close()
        try:
            hub.wait(20)
        except subprocess.TimeoutExpired:
            hub.kill()
            hub.wait()


def big(n: int, tmp: str) -> None:
    name = f"bfbig{os.getpid()}"
    with open(os.path.join(tmp, "big.log"), "w") as log:
        t0 = time.monotonic()
        proc = run(["targets.jobs:job", "-n", str(n), "--name", name], log, "-Sn 1024")
        ok = wait_for(lambda: started(name, n) or proc.poll() is not None, 180, step=0.25)
        ready = time.monotonic() - t0
        kids = subprocess.run(["pgrep", "-c", "-f", f"multibus: job.* \\[{name}\\]"],
                              capture_output=True, text=True).stdout.strip()
        t1 = time.monotonic()
        code = stop(proc)
        exited = time.monotonic() - t1
    left = subprocess.run(["pgrep", "-c", "-f", f"\\[{name}\\]"], capture_output=True,
                          text=True).stdout.strip()
    print(f"big: {n} workers under ulimit -Sn 1024: all STARTED {bool(ok)} in {ready:.1f} s "
          f"({kids} running), SIGTERM -> exit status {code} in {exited:.1f} s, "
          f"{left or 0} processes left")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conns", type=int, default=1100)
    ap.add_argument("--invalid", type=int, default=25000)
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--zap", type=int, default=1000)
    ap.add_argument("--orders-seconds", type=float, default=10.0)
    ap.add_argument("--big", type=int, default=200)
    ap.add_argument("--only", default="stuck,floods,zap,big")
    a = ap.parse_args()
    only = set(a.only.split(","))
    import resource  # this client opens --conns sockets itself: not under the 1024 limit

    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    with tempfile.TemporaryDirectory(prefix="bf-") as tmp:
        os.environ.setdefault("XDG_RUNTIME_DIR", tmp)
        ENV["XDG_RUNTIME_DIR"] = os.environ["XDG_RUNTIME_DIR"]
        if "stuck" in only:
            stuck_peer(a.orders_seconds, tmp)
        if "floods" in only:
            floods(a.conns, a.invalid, a.ops, tmp)
        if "zap" in only:
            zap(a.zap)
        if "big" in only:
            big(a.big, tmp)


if __name__ == "__main__":
    main()
