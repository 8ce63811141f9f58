"""A supervisor process for the tests: one worker group, every event printed as a line.

Usage: python -m targets.fleet_harness --name NAME --target pkg.mod:fn [-n N] [--restart MODE]
       [--stop-timeout S] [--start-timeout S] [--term-timeout S] [--intensity N,T]
       [--backoff FIRST,CAP] [--env K=V] [--exec] [--zygote-preload M] [--cwd DIR]
       [--umask OCTAL] [--nofile SOFT] [--ulimit-n SOFT[,HARD]] [--no-table]
Runs the fleet with ``run_fleet`` (as ``multibus run`` does: same signals, same exit codes).
Prints "LOG <level> <msg>" for bus log records, "WORKERS <json>" for each state table,
"FLEET STARTED" / "FLEET ERROR <msg>" / "REFUSED <msg>", and at the end "CHILDREN <n>" (its
children left after the bus exited: 0 expected), then exits with the supervisor's exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from multibus.bus import Bus
from multibus.runner import FleetRefused, run_fleet
from multibus.supervisor import WorkerSpec


def children_left() -> int:
    me = os.getpid()
    n = 0
    for tid in os.listdir(f"/proc/{me}/task"):
        try:
            with open(f"/proc/{me}/task/{tid}/children") as f:
                n += len(f.read().split())
        except FileNotFoundError:
            pass  # that thread has just exited
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--target", default="targets.jobs:job")
    ap.add_argument("-n", type=int, default=1)
    ap.add_argument("--restart", default="permanent")
    ap.add_argument("--stop-timeout", type=float, default=5.0)
    ap.add_argument("--start-timeout", type=float, default=10.0)
    ap.add_argument("--term-timeout", type=float, default=2.0)
    ap.add_argument("--intensity", default="5,10")
    ap.add_argument("--backoff", default=None, help="restart backoff: first delay, cap")
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--zygote", action="store_true", help="fork workers from a zygote (default)")
    ap.add_argument("--exec", action="store_true", help="exec every worker (zygote=False)")
    ap.add_argument("--zygote-preload", action="append", default=[])
    ap.add_argument("--cwd", default=None, help="the workers' working directory")
    ap.add_argument("--umask", default=None, help="set when the fleet starts (after the zygote)")
    ap.add_argument("--nofile", type=int, default=None, help="RLIMIT_NOFILE soft limit, ditto")
    ap.add_argument("--ulimit-n", default=None, metavar="SOFT[,HARD]",
                    help="RLIMIT_NOFILE set first thing, as `ulimit -n` in a shell would")
    ap.add_argument("--no-table", action="store_true",
                    help="no WORKERS lines (a large fleet's table at every change)")
    a = ap.parse_args()
    if a.ulimit_n:
        import resource

        soft, _, hard = a.ulimit_n.partition(",")
        resource.setrlimit(resource.RLIMIT_NOFILE, (int(soft), int(hard or soft)))
    lock = threading.Lock()

    def emit(text: str) -> None:
        with lock:  # one write per line: threads never interleave inside a line
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    bus = Bus()
    t0 = time.monotonic()
    stamp = bool(os.environ.get("MB_TIMES"))

    def on_log(msg: str, level: int = 20) -> None:
        emit(f"LOG {level} {msg}" + (f"  @{time.monotonic() - t0:.3f}" if stamp else ""))

    if not a.no_table:
        bus.subscribe("workers", lambda rows: emit("WORKERS " + json.dumps(rows)))

    def set_limits() -> None:
        """What a supervisor may change after it started its zygote: workers get it too."""
        import resource

        if a.umask is not None:
            os.umask(int(a.umask, 8))
        if a.nofile is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (a.nofile, hard))

    bus.subscribe("start", set_limits, 10)  # before the supervisor's start (75) spawns
    env = dict(kv.split("=", 1) for kv in a.env)
    env.setdefault("PYTHONPATH", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = WorkerSpec(name="w", target=a.target, count=a.n, restart=a.restart,
                      stop_timeout=a.stop_timeout, start_timeout=a.start_timeout, env=env,
                      cwd=a.cwd)
    most, period = a.intensity.split(",")
    extra = {}
    if a.backoff:
        first, cap = a.backoff.split(",")
        extra["backoff"] = (float(first), float(cap))
    try:
        code = run_fleet([spec], name=a.name, bus=bus, log=on_log,
                         on_started=lambda sup: emit("FLEET STARTED"),
                         on_failed=lambda e: emit(f"FLEET ERROR {e}"),
                         intensity=(int(most), float(period)), term_timeout=a.term_timeout,
                         zygote=not a.exec, zygote_preload=a.zygote_preload, **extra)
    except FleetRefused as e:
        emit(f"REFUSED {e}")
        return e.code
    emit(f"CHILDREN {children_left()}")
    return code


if __name__ == "__main__":
    sys.exit(main())
