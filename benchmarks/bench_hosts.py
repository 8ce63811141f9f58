"""Several hosts (issue 19): 8 network namespaces x 25 workers under a parent, against the
same 200 workers under one local supervisor.

    sudo python benchmarks/bench_hosts.py [--hosts 8] [--workers 25] [--rounds 7] [--launches 3]

Measures, for each set-up: cold ready (supervisors launched -> every worker STARTED, as the
parent's status shows; median of ``--launches``, each a fresh start), and on the last launch,
through the control socket: ``stop``, ``start`` (ready again,
fleet-wide) and ``graceful`` (each op until done, median of ``--rounds``; each on a fleet
settled for SETTLE s after the one before: a host's log lines of the last op may still be on
their way when its state is reported), and ``status`` latency (median of 20). Prints a
table with the ratio hosts/local (target: <= 1.5), then the CPU time each role used over the
whole run (supervisors; workers, with what they reaped), read just before the fleet stops.
multibus's bytecode is compiled first (``compileall``), as an installed package has it: with
PYTHONDONTWRITEBYTECODE set, every supervisor and worker would compile it from source at
each start.

The namespaces share this machine's CPUs. Each host's own start-up (a supervisor and a
zygote interpreter, their imports, its CURVE link) is paid on the same CPUs, where separate
hosts would pay it in parallel. Cold ready is CPU-bound (every CPU busy from launch to
ready), so with more hosts than CPUs the ratio measures that sharing as much as the fleet
layer; ``--hosts N --workers 200/N`` with N CPUs gives each host a CPU of its own.
Root only (network namespaces, see tests/netns.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from netns import Hosts, free_port, multibus, skip_reason, supervisor  # noqa: E402

from multibus.control import ControlClient, ControlError  # noqa: E402


def keygen(keys: Path, name: str) -> None:
    from multibus.transport.keys import make_keys

    make_keys(keys, name)


def wait_started(name: str, n: int, timeout: float = 120) -> float:
    t0 = time.monotonic()
    client = ControlClient(name)
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(ControlError):
            st = client.status()
            if sum(w["state"] == "STARTED" for w in st["workers"]) == n:
                return time.monotonic() - t0
        time.sleep(0.05)
    with contextlib.suppress(ControlError):
        st = client.status()
        print(st.get("hosts"), [(w.get("host"), w["state"]) for w in st["workers"]][:20])
    raise RuntimeError(f"{name}: {n} workers not STARTED within {timeout}s")


def op_time(name: str, action: str) -> float:
    client = ControlClient(name, timeout=30)
    t0 = time.monotonic()
    done = client.wait_op(int(client.op(action)["op"]), 300)
    if done["state"] != "done":
        raise RuntimeError(f"{action}: {done}")
    return time.monotonic() - t0


SETTLE = 0.5  # s between ops: each is timed on a fleet done with the one before (its logs)


def measure(name: str, n: int, rounds: int) -> dict[str, float]:
    out: dict[str, list[float]] = {"stop": [], "start": [], "graceful": []}
    for _ in range(rounds):
        time.sleep(SETTLE)
        out["stop"].append(op_time(name, "stop"))
        time.sleep(SETTLE)
        out["start"].append(op_time(name, "start"))
        wait_started(name, n)
        time.sleep(SETTLE)
        out["graceful"].append(op_time(name, "graceful"))
    client = ControlClient(name)
    lat = []
    for _ in range(20):
        t0 = time.perf_counter()
        client.status()
        lat.append(time.perf_counter() - t0)
    res = {k: statistics.median(v) for k, v in out.items()}
    res["status"] = statistics.median(lat)
    return res


def cpu(pid: int) -> tuple[float, float]:
    """(CPU s of the supervisor ``pid`` itself, CPU s of everything under it: its live
    descendants and what it and they reaped). ``ip netns exec`` execs its command, so a
    namespaced supervisor's pid is its own."""
    import psutil

    def total(p: psutil.Process) -> tuple[float, float]:
        t = p.cpu_times()
        return t.user + t.system, t.children_user + t.children_system

    try:
        sup = psutil.Process(pid)
        own, reaped = total(sup)
        below = reaped
        for child in sup.children(recursive=True):
            try:
                mine, theirs = total(child)
                below += mine + theirs
            except psutil.Error:
                continue
    except psutil.Error:
        return 0.0, 0.0
    return own, below


def local(tmp: Path, n: int, rounds: int, launches: int) -> dict[str, float]:
    name = f"bhl{os.getpid()}"
    f = tmp / "local.toml"
    f.write_text(f'[supervisor]\nname = "{name}"\npythonpath = ["{ROOT / "tests"}"]\n'
                 f'[groups.job]\ntarget = "targets.hostjobs:job"\ncount = {n}\n')
    ready = []
    for launch in range(launches):
        t0 = time.monotonic()
        with supervisor(multibus("run", str(f))) as (proc, _):
            wait_started(name, n)
            ready.append(time.monotonic() - t0)
            if launch == launches - 1:
                res = {"ready": statistics.median(ready), **measure(name, n, rounds)}
                res["cpu_sup"], res["cpu_workers"] = cpu(proc.pid)
    return res


def hosts(tmp: Path, h: int, per: int, rounds: int, launches: int) -> dict[str, float]:
    name = f"bhp{os.getpid()}"
    keys = tmp / "keys"
    keygen(keys, "parent")
    names = [f"{name}h{i}" for i in range(h)]
    for hn in names:
        keygen(keys, hn)
    ns = Hosts(h)
    try:
        ready = [launch_hosts(tmp, ns, name, names, per, 0)[0] for _ in range(launches - 1)]
        took, res = launch_hosts(tmp, ns, name, names, per, rounds)
        return {**res, "ready": statistics.median([*ready, took])}
    finally:
        ns.close()


def launch_hosts(tmp: Path, ns: Hosts, name: str, names: list[str], per: int,
                 rounds: int) -> tuple[float, dict[str, float]]:
    """Start the parent and the hosts and wait until every worker is STARTED; then, with
    ``rounds``, measure the ops and read the CPU used; stop them all. Returns the time to
    ready and the figures."""
    h = len(names)
    port = free_port()
    allow = ", ".join(f'"keys/{hn}.key"' for hn in names)
    (tmp / "parent.toml").write_text(
        f'[supervisor]\nname = "{name}"\n[downstream]\nlisten = "tcp://0.0.0.0:{port}"\n'
        f'key = "keys/parent.key_secret"\nallow = [{allow}]\n')
    with contextlib.ExitStack() as stack:
        t0 = time.monotonic()
        parent, _ = stack.enter_context(supervisor(multibus("run",
                                                            str(tmp / "parent.toml"))))
        procs, outs = [], []
        for i, hn in enumerate(names):
            f = tmp / f"{hn}.toml"
            f.write_text(f'[supervisor]\nname = "{hn}"\npythonpath = ["{ROOT / "tests"}"]\n'
                         f'[upstream]\nkey = "keys/{hn}.key_secret"\n'
                         f'server_key = "keys/parent.key"\n'
                         f'[groups.job]\ntarget = "targets.hostjobs:job"\ncount = {per}\n')
            join = f"tcp://{ns.parent_ip(i)}:{port}"
            proc, out = stack.enter_context(supervisor(ns.argv(i, multibus(
                "run", str(f), "--join", join))))
            procs.append(proc)
            outs.append(out)
        try:
            wait_started(name, h * per)
        except RuntimeError:  # say what the hosts said
            for hn, out in zip(names, outs, strict=True):
                print(f"--- {hn}:\n" + "".join(out.read_text().splitlines(True)[-15:]))
            raise
        took = time.monotonic() - t0
        if not rounds:
            return took, {}
        res = measure(name, h * per, rounds)
        res["cpu_parent"] = sum(cpu(parent.pid))
        children = [cpu(p.pid) for p in procs]
        res["cpu_sup"] = sum(c[0] for c in children)
        res["cpu_workers"] = sum(c[1] for c in children)
        return took, res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--workers", type=int, default=25, help="per host")
    ap.add_argument("--rounds", type=int, default=7, help="of each op, on the last launch")
    ap.add_argument("--launches", type=int, default=3, help="cold starts of each set-up")
    args = ap.parse_args()
    for opt in ("hosts", "workers", "rounds", "launches"):
        if getattr(args, opt) < 1:
            ap.error(f"--{opt} must be at least 1")
    why = skip_reason()
    if why:
        print(f"bench_hosts: {why}", file=sys.stderr)
        return 2
    n = args.hosts * args.workers
    import compileall

    for d in (ROOT / "multibus", ROOT / "tests" / "targets"):
        compileall.compile_dir(str(d), quiet=1)
    # this checkout's multibus in every process (a worker is `python -m multibus.worker`)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory(prefix="bench-hosts-") as d:
        os.environ.setdefault("XDG_RUNTIME_DIR", d)
        lo = local(Path(d), n, args.rounds, args.launches)
        hi = hosts(Path(d), args.hosts, args.workers, args.rounds, args.launches)
    print(f"\n{n} workers: one local supervisor vs {args.hosts} hosts (network namespaces) x "
          f"{args.workers} under a parent; medians of {args.launches} cold starts, {args.rounds} "
          f"rounds of each op (status: of 20)\n")
    print(f"{'':24}{'local':>10}{'hosts':>10}{'ratio':>8}")
    for key, label in (("ready", "cold ready (s)"), ("start", "start, fleet-wide (s)"),
                       ("graceful", "graceful (s)"), ("stop", "stop (s)"),
                       ("status", "status latency (ms)")):
        scale = 1000 if key == "status" else 1
        a, b = lo[key] * scale, hi[key] * scale
        print(f"{label:24}{a:10.3f}{b:10.3f}{b / a:8.2f}")
    print(f"\nCPU s over the whole run (user+system): local: supervisor "
          f"{lo['cpu_sup']:.2f}, workers {lo['cpu_workers']:.2f}; hosts: parent "
          f"{hi['cpu_parent']:.2f}, {args.hosts} child supervisors {hi['cpu_sup']:.2f}, "
          f"workers {hi['cpu_workers']:.2f}")
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average at the end: {' '.join(load)} (on {os.cpu_count()} CPUs)")
    cpus = os.cpu_count() or 1
    if args.hosts > cpus:
        print(f"{args.hosts} hosts share {cpus} CPUs: each host's start-up runs on the same "
              f"CPUs (--hosts {cpus} --workers {n // cpus}: one CPU per host)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
