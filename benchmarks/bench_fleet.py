"""Fleet benchmark: multibus Supervisor vs Circus 0.19 vs a bare Popen script.

    python benchmarks/bench_fleet.py [--sizes 1,10,50,200,1000] [--idle 20] [--respawns 5]
                                     [--repeat 3] [--exec-max 200] [--mb-exec-max 50]
                                     [--no-circus] [--no-exec]
                                     [--no-logs]

"multibus" forks workers from a zygote (the default) that preloaded their module (``Supervisor(
zygote_preload=["bench_fleet"])``); "mb-exec" execs each. Circus, bare and mb-exec run up to
``--exec-max`` workers. The multibus supervisor also runs a Control, as ``multibus run`` does.

Measured for each system; ready and stop are the median of ``--repeat`` launches, the
systems taking turns (idle and respawn: the first launch of 10):

* ready: launch -> every worker ready. multibus: ``bus.start()`` returned (every worker bus
  reported STARTED through the bridge). Circus / bare: every worker wrote ``ready <pid>`` to a
  FIFO after building and starting a multibus Bus (same imports minus the bridge).
  "bare-imp" (up to ``--mb-exec-max``): the bare script with workers that import what an
  exec'd multibus worker imports (``multibus.worker``, the bridge: zmq, msgpack) before they
  build the Bus: the "bare exec of the same imports" the ``--exec`` target is measured
  against (issue 18); the stricter ratio against "bare" is printed too.
* stop: SIGINT to the supervisor -> supervisor exited and every worker reaped.
* ready/stop_ms_per_worker: the slope between the two largest sizes a system ran.
* rss_mb, fds: the supervisor's, once the fleet is ready.
* status_max_during_start: the slowest ``multibus status`` answer while the fleet starts.
* idle (10 workers, ``--idle`` s): supervisor CPU time and context switches per second, all
  threads (``/proc/PID/task/*/status`` voluntary + nonvoluntary).
* respawn (10 workers): SIGKILL one worker -> its replacement ready (median of ``--respawns``).
* log_lines_per_s: 50 workers print 20,000 numbered lines each; the supervisor writes them to
  a file (multibus: the LogPrinter of ``multibus run``; Circus: its stream redirector to a
  FileStream); first to last line seen in the file, with lines lost and out of order per worker.

multibus's bytecode is compiled first (``compileall``), as an installed package has it.
Targets (issue 18) are checked at the end. Circus is the ``bench`` extra
(``pip install circus==0.19.0``).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# -- worker/supervisor programs (run as: python bench_fleet.py _role ...) -----------------------

def idle(bus) -> None:
    """multibus worker target: nothing to do."""


LINES = 20000  # lines each worker prints in the log throughput run
QUIET = 10.0  # s without a new line after the last one: the log run is over


def _print_lines(tag: str) -> None:
    out = sys.stdout
    for i in range(LINES):
        out.write(f"{tag} {i}\n")
    out.flush()


def printer(bus) -> None:
    """multibus worker target: print LINES numbered lines once started (from a thread, as a
    target subscribes and returns)."""
    import threading

    bus.subscribe("start", lambda: threading.Thread(
        target=_print_lines, args=(f"p{os.getpid()}",), daemon=True).start())


def _plain_printer() -> None:
    """A Circus worker of the log run: print LINES numbered lines, sleep until killed."""
    import signal

    _print_lines(f"p{os.getpid()}")
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    while True:
        signal.pause()


def _plain_worker(fifo: str, imports: bool = False) -> None:
    """A Circus/bare worker: build and start a Bus, say ready, sleep until killed; with
    ``imports`` (bare-imp), import first what an exec'd multibus worker imports."""
    import signal

    if imports:
        import multibus.transport.bridge
        import multibus.worker  # noqa: F401

    from multibus.bus import Bus

    bus = Bus()
    bus.subscribe("log", lambda *a, **k: None)
    bus.start()
    fd = os.open(fifo, os.O_WRONLY)
    os.write(fd, f"ready {os.getpid()}\n".encode())
    os.close(fd)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    while True:
        signal.pause()


def _plain_argv(fifo: str, imports: bool = False) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "_plain", fifo] + (
        ["imports"] if imports else [])


def _bare(n: int, fifo: str, imports: bool = False) -> None:
    """The bare Popen supervisor: spawn, respawn on death (os.wait), SIGTERM all on SIGINT."""
    import signal
    import subprocess

    procs = {}
    for _ in range(n):
        p = subprocess.Popen(_plain_argv(fifo, imports))
        procs[p.pid] = p
    try:
        while True:
            pid, _status = os.wait()
            if procs.pop(pid, None) is not None:
                p = subprocess.Popen(_plain_argv(fifo, imports))
                procs[p.pid] = p
    except KeyboardInterrupt:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait()


def _supervise(n: int, name: str, zygote: bool = True, target: str = "idle",
               logfile: str | None = None) -> int:
    """A supervisor as ``multibus run`` makes it: Supervisor + Control (``multibus status``
    answers), worker output to ``logfile`` through the LogPrinter if given."""
    import threading

    from multibus.bus import Bus
    from multibus.control import Control
    from multibus.supervisor import Supervisor, WorkerSpec

    lock = threading.Lock()

    def emit(text: str) -> None:
        with lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    bus = Bus()
    announced: set[int] = set()

    def on_state(name: str, state: str) -> None:
        """Say ``ready PID`` once per worker process whose bus reported STARTED."""
        w = sup.workers.get(name)
        pid = w.pid if w is not None else None
        if state == "STARTED" and pid is not None and pid not in announced:
            announced.add(pid)
            emit(f"ready {pid}")

    bus.subscribe("peer.state", on_state)
    printer = None
    if logfile:
        from multibus.logprinter import LogPrinter

        printer = LogPrinter(20, "text", open(logfile, "w"), max_queue=10000).start()  # noqa: SIM115
        bus.subscribe("log", printer)
    spec = WorkerSpec(name="b", target=f"bench_fleet:{target}", count=n,
                      env={"PYTHONPATH": os.pathsep.join([HERE, ROOT])})
    # the zygote (the default) imports the worker code once (as a forkserver user would ask
    # it to); mb-exec opts out
    opts = {"zygote_preload": ["bench_fleet"]} if zygote else {"zygote": False}
    sup = Supervisor(bus, [spec], name=name, pidfile=False, **opts)
    sup.subscribe()
    Control(bus, sup, name=name).subscribe()
    emit("CONTROL")
    try:
        bus.start()
        emit("READY")
        bus.block()
    except KeyboardInterrupt:
        bus.exit()
    if printer is not None:
        printer.close()
        emit(f"DROPPED {printer.dropped}")
    return sup.exit_code


MB = ("multibus", "mb-exec")  # workers forked from a zygote / each one exec'd


# -- the driver --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    import argparse
    import re
    import select
    import shutil
    import signal
    import statistics
    import subprocess
    import tempfile
    import threading
    import time

    import psutil

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,10,50,200,1000")
    ap.add_argument("--idle", type=float, default=20.0)
    ap.add_argument("--respawns", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3,
                    help="launch/stop each fleet this many times, systems interleaved; report "
                         "the median (one sample each is at the mercy of a noisy machine)")
    ap.add_argument("--exec-max", type=int, default=200,
                    help="largest fleet for Circus, bare and mb-exec (exec'ing 1,000 "
                         "interpreters takes over a minute on 2 cores)")
    ap.add_argument("--mb-exec-max", type=int, default=50,
                    help="largest fleet for mb-exec (200 exec'd workers need more than the "
                         "default start_timeout on a loaded 2-core machine)")
    ap.add_argument("--no-circus", action="store_true")
    ap.add_argument("--no-exec", action="store_true", help="skip multibus without zygote")
    ap.add_argument("--no-logs", action="store_true", help="skip the log throughput run")
    args = ap.parse_args(argv)
    # A stop is SIGINT to the supervisor: started in the background of a shell without job
    # control, this driver (and so every child) inherits SIGINT ignored, and a stop would wait
    # out the 60 s limit. A handled signal is reset to the default at exec: children get it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sizes = [int(x) for x in args.sizes.split(",")]
    # Bytecode, as an installed package has it: with PYTHONDONTWRITEBYTECODE set and no
    # __pycache__ (a fresh checkout), every exec'd worker (Circus's, bare's, mb-exec's)
    # would compile multibus from source at each start, which no deployment does.
    import compileall

    for d in (os.path.join(ROOT, "multibus"), HERE):
        compileall.compile_dir(d, quiet=1)
    tmp = tempfile.mkdtemp(prefix="bench-fleet-")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    circus = None if args.no_circus else shutil.which("circusd")
    if not args.no_circus and circus is None:
        print("circusd not found: pip install circus==0.19.0 (or --no-circus)", file=sys.stderr)
        return 2

    class Run:
        """One launched system: its process, and a way to learn about worker readiness.
        ``logfile``: its workers print LINES lines each, written there by the supervisor."""

        def __init__(self, system: str, n: int, logfile: str | None = None) -> None:
            self.system, self.n = system, n
            self.fifo = os.path.join(tmp, f"{system}-{n}.fifo")
            if os.path.exists(self.fifo):
                os.unlink(self.fifo)
            os.mkfifo(self.fifo)
            self.rfd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
            self.wfd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)  # never EOF
            self.buf = b""
            self.ready: dict[int, float] = {}  # pid -> when its ready line arrived
            self.notes: list[str] = []  # other lines of a multibus supervisor
            self.t0 = time.monotonic()
            self.name = f"bench{n}-{os.getpid()}"
            if system in MB:
                cmd = [sys.executable, os.path.abspath(__file__), "_supervise", str(n),
                       self.name, "zygote" if system == "multibus" else "exec"]
                cmd += ["printer", logfile] if logfile else []
                self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                             stdin=subprocess.DEVNULL)
                self.src = self.proc.stdout.fileno()
            elif system in ("bare", "bare-imp"):
                cmd = [sys.executable, os.path.abspath(__file__), "_bare", str(n), self.fifo]
                cmd += ["imports"] if system == "bare-imp" else []
                self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
                self.src = self.rfd
            else:
                ini = os.path.join(tmp, f"circus-{n}.ini")
                cmd = ([sys.executable, os.path.abspath(__file__), "_printer"] if logfile
                       else _plain_argv(self.fifo))
                stream = (f"stdout_stream.class = FileStream\n"
                          f"stdout_stream.filename = {logfile}\n" if logfile else "")
                with open(ini, "w") as f:
                    f.write(
                        "[circus]\n"
                        f"endpoint = ipc://{tmp}/c{n}.ctl\n"
                        f"pubsub_endpoint = ipc://{tmp}/c{n}.pub\n"
                        "statsd = False\n"
                        "[watcher:w]\n"
                        f"cmd = {' '.join(cmd)}\n"
                        f"numprocesses = {n}\n"
                        "copy_env = True\n" + stream
                    )
                self.proc = subprocess.Popen([circus, ini], env=env, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)
                self.src = self.rfd

        def pump(self, timeout: float) -> None:
            r, _, _ = select.select([self.src], [], [], max(0.0, timeout))
            if not r:
                return
            data = os.read(self.src, 1 << 20)
            now = time.monotonic()
            self.buf += data
            *lines, self.buf = self.buf.split(b"\n")
            for line in lines:
                text = line.decode()
                if text.startswith("ready "):
                    self.ready[int(text.split()[1])] = now
                elif text == "READY":
                    self.ready[-1] = now
                else:
                    self.notes.append(text)

        def wait_until(self, pred, timeout: float = 120.0) -> float:
            deadline = time.monotonic() + timeout
            while not pred():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.system}: timed out")
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.system}: exited with {self.proc.returncode}")
                self.pump(deadline - time.monotonic())
            return time.monotonic() - self.t0

        def all_ready(self) -> bool:
            if self.system in MB:
                return -1 in self.ready
            return len(self.ready) >= self.n

        def worker_pids(self) -> list[int]:
            try:
                kids = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                return []
            return [k.pid for k in kids]

        def stop(self) -> float:
            pids = self.worker_pids()
            t = time.monotonic()
            self.proc.send_signal(signal.SIGINT)
            while self.proc.poll() is None and time.monotonic() - t < 60:
                if self.src == self.rfd:
                    self.proc.wait(60)
                else:  # keep reading its stdout, or it blocks on a full pipe
                    self.pump(1.0)
                    r, _, _ = select.select([self.src], [], [], 0)
                    if r and not os.read(self.src, 1 << 20):
                        self.proc.wait(60)
            while any(_alive(p) for p in pids) and time.monotonic() - t < 30:
                time.sleep(0.001)
            return time.monotonic() - t

        def close(self) -> None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.rfd)
            os.close(self.wfd)

    class StatusProbe:
        """Ask a multibus supervisor for ``status`` over and over while its fleet starts
        (its Control answers once it said CONTROL); keeps each answer's latency."""

        def __init__(self, run: Run) -> None:
            from multibus.control import ControlClient

            self.client = ControlClient(run.name, timeout=10.0)
            self.run, self.latencies = run, []
            self.done = threading.Event()
            self.thread = threading.Thread(target=self._loop, daemon=True)

        def _loop(self) -> None:
            end = time.monotonic() + 120
            while not self.done.is_set() and time.monotonic() < end:
                t = time.monotonic()
                try:
                    self.client.status()
                except Exception:  # noqa: BLE001 - not up yet, or gone: try again
                    self.done.wait(0.02)
                    continue
                self.latencies.append(time.monotonic() - t)

        def stop(self) -> None:
            self.done.set()
            self.thread.join(15)

    def _alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def switches(pid: int) -> int:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total

    def cpu(pid: int) -> float:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system

    systems = ["multibus"] + ([] if args.no_exec else ["mb-exec"]) + ["bare"]
    systems += [] if args.no_exec else ["bare-imp"]
    systems += [] if circus is None else ["circus"]
    results: dict[tuple[str, str], float] = {}
    samples: dict[tuple[str, str], list[float]] = {}
    for n, rnd, system in ((n, r, s) for n in sizes for r in range(args.repeat)
                           for s in systems):
        if (system != "multibus" and n > args.exec_max) or (
                system in ("mb-exec", "bare-imp") and n > args.mb_exec_max):
            continue
        run = Run(system, n)
        probe = None
        try:
            if system == "multibus":
                run.wait_until(lambda r=run: "CONTROL" in r.notes)
                probe = StatusProbe(run)
                probe.thread.start()
            samples.setdefault((system, f"ready{n}"), []).append(run.wait_until(run.all_ready))
            if probe is not None:
                probe.stop()
                if probe.latencies:
                    samples.setdefault((system, f"status_max_during_start{n}"), []).append(
                        max(probe.latencies))
            sp = psutil.Process(run.proc.pid)
            samples.setdefault((system, f"rss_mb{n}"), []).append(sp.memory_info().rss / 2**20)
            samples.setdefault((system, f"fds{n}"), []).append(sp.num_fds())
            # let the fleet settle (circus keeps starting its own machinery)
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                run.pump(end - time.monotonic())
            if n == 10 and rnd == 0:
                c0, s0, t0 = cpu(run.proc.pid), switches(run.proc.pid), time.monotonic()
                end = t0 + args.idle
                while time.monotonic() < end:
                    run.pump(end - time.monotonic())
                dt = time.monotonic() - t0
                results[(system, "idle_cpu_ms_per_s")] = (cpu(run.proc.pid) - c0) / dt * 1e3
                results[(system, "idle_wakeups_per_s")] = (switches(run.proc.pid) - s0) / dt
                times = []
                for _ in range(args.respawns):
                    victims = [p for p in run.worker_pids() if p in run.ready]
                    if not victims:
                        break
                    victim = victims[0]
                    before = set(run.ready)
                    t = time.monotonic()
                    os.kill(victim, signal.SIGKILL)
                    run.wait_until(lambda b=before, r=run: any(p not in b for p in r.ready
                                                               if p != -1))
                    times.append(time.monotonic() - t)
                    run.ready.pop(victim, None)
                if times:
                    results[(system, "respawn")] = statistics.median(times)
            samples.setdefault((system, f"stop{n}"), []).append(run.stop())
        except RuntimeError as e:  # one failed launch is reported, the others still run
            print(f"{system:9s} N={n:<4d} FAILED: {e}", flush=True)
            samples.setdefault((system, f"failed{n}"), []).append(1)
            continue
        finally:
            if probe is not None:
                probe.stop()
            run.close()
        print(f"{system:9s} N={n:<4d} ready {samples[(system, f'ready{n}')][-1]:.3f}s  "
              f"stop {samples[(system, f'stop{n}')][-1]:.3f}s", flush=True)
    for key, values in samples.items():
        results[key] = statistics.median(values)
    for system in systems:  # the slope: seconds per worker between the two largest sizes
        ran = sorted(n for n in sizes if (system, f"ready{n}") in results)
        if len(ran) >= 2:
            lo, hi = ran[-2], ran[-1]
            for what in ("ready", "stop"):
                results[(system, f"{what}_ms_per_worker")] = 1e3 * (
                    results[(system, f"{what}{hi}")] - results[(system, f"{what}{lo}")]) / (hi - lo)

    if not args.no_logs:
        line_re = re.compile(rb"p(\d+) (\d+)$")
        for system in ["multibus"] + ([] if circus is None else ["circus"]):
            logfile = os.path.join(tmp, f"{system}.log")
            open(logfile, "w").close()
            run = Run(system, 50, logfile)
            want = 50 * LINES
            last: dict[bytes, int] = {}
            got = disorder = 0
            first = end = None
            try:
                with open(logfile, "rb") as f:
                    buf = b""
                    deadline = time.monotonic() + 180
                    while got < want and time.monotonic() < deadline:
                        run.pump(0.05)
                        data = f.read()
                        if not data:
                            if end is not None and time.monotonic() - end > QUIET:
                                break  # the rest is lost (Circus drops lines): do not wait 180 s
                            continue
                        now = time.monotonic()
                        buf += data
                        *lines, buf = buf.split(b"\n")
                        for line in lines:
                            m = line_re.search(line)
                            if m is None:
                                continue
                            first = first or now
                            end = now
                            got += 1
                            tag, i = m.group(1), int(m.group(2))
                            disorder += i != last.get(tag, -1) + 1
                            last[tag] = i
                run.stop()
            finally:
                run.close()
            dropped = next((int(x.split()[1]) for x in run.notes if x.startswith("DROPPED")), 0)
            rate = got / (end - first) if first and end and end > first else 0.0
            results[(system, "log_lines_per_s")] = rate
            results[(system, "log_lines_lost")] = want - got
            results[(system, "log_out_of_order")] = disorder
            results[(system, "log_dropped_counted")] = dropped
            print(f"{system:9s} logs: {got}/{want} lines, {rate:,.0f}/s, {disorder} out of "
                  f"order, {dropped} dropped (counted)", flush=True)

    keys = sorted({k for _, k in results}, key=lambda k: (k.rstrip("0123456789"), len(k), k))
    print()
    header = f"{'metric':26s}" + "".join(f"{s:>12s}" for s in systems)
    if circus:
        header += f"{'mb/circus':>11s}"
    print(header)
    for k in keys:
        row = f"{k:26s}" + "".join(
            f"{results[(s, k)]:12.4f}" if (s, k) in results else f"{'-':>12s}" for s in systems)
        if circus and ("circus", k) in results and results[("circus", k)] \
                and ("multibus", k) in results:
            row += f"{results[('multibus', k)] / results[('circus', k)]:11.3f}"
        print(row)

    def ratio(k: str, other: str = "circus") -> float:
        return results[("multibus", k)] / results[(other, k)]

    checks = []
    for n in (50, 200):
        if circus and ("circus", f"ready{n}") in results:
            checks.append((f"ready N={n} <= 0.5 x circus", ratio(f"ready{n}") <= 0.5))
            checks.append((f"stop N={n} <= 0.4 x circus", ratio(f"stop{n}") <= 0.4))
    if ("multibus", "ready1000") in results:
        checks.append(("1000 workers ready <= 5 s", results[("multibus", "ready1000")] <= 5))
        checks.append(("1000 workers stopped <= 2 s", results[("multibus", "stop1000")] <= 2))
        checks.append(("1000 workers: supervisor RSS <= 150 MB",
                       results[("multibus", "rss_mb1000")] <= 150))
    for n in sizes:
        if ("multibus", f"status_max_during_start{n}") in results:
            checks.append((f"status during the start of {n} < 0.3 s",
                           results[("multibus", f"status_max_during_start{n}")] < 0.3))
    if circus and ("circus", "log_lines_per_s") in results:
        checks.append(("log lines/s >= circus", ratio("log_lines_per_s") >= 1.0))
        checks.append(("log lines: none lost, in order per worker",
                       results[("multibus", "log_lines_lost")] == 0
                       and results[("multibus", "log_out_of_order")] == 0))
    if ("mb-exec", "ready50") in results and ("bare-imp", "ready50") in results:
        exec50, same = results[("mb-exec", "ready50")], results[("bare-imp", "ready50")]
        fewer = results[("bare", "ready50")]
        checks.append((f"--exec ready N=50 <= 1.5 x bare exec of the same imports "
                       f"({exec50 / same:.2f}x; against bare without the bridge's imports: "
                       f"{exec50 / fewer:.2f}x)", exec50 <= 1.5 * same))
    if 10 in sizes and ("multibus", "idle_wakeups_per_s") in results:
        checks.append(("idle wake-ups <= 0.2/s",
                       results[("multibus", "idle_wakeups_per_s")] <= 0.2))
    print()
    for label, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  {label}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":
        _plain_worker(sys.argv[2], sys.argv[3:4] == ["imports"])
    elif len(sys.argv) > 1 and sys.argv[1] == "_bare":
        _bare(int(sys.argv[2]), sys.argv[3], sys.argv[4:5] == ["imports"])
    elif len(sys.argv) > 1 and sys.argv[1] == "_supervise":
        from multibus.fastexit import exit_now

        # as the ``multibus`` command ends: the fleet is reaped, skip interpreter teardown
        exit_now(_supervise(int(sys.argv[2]), sys.argv[3], sys.argv[4] != "exec",
                            *sys.argv[5:7]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_printer":
        _plain_printer()
    else:
        sys.exit(main())
