"""The ``multibus`` command end to end: run a fleet file, control it from other processes."""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from progs import procio

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


# the predicates here run `multibus status` and the like: poll every 50 ms, not 5
wait_for = functools.partial(procio.wait_for, step=0.05)


def mb(*args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m multibus ARGS`` (works with or without the console script)."""
    return subprocess.run([sys.executable, "-m", "multibus", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env=env)


def status(name: str) -> dict | None:
    r = mb("status", "--json", "--name", name, timeout=30)
    return json.loads(r.stdout) if r.returncode == 0 else None


def states(name: str) -> list[str]:
    st = status(name)
    return [w["state"] for w in st["workers"]] if st else []


def all_started(name: str, n: int) -> dict | None:
    st = status(name)
    if st and st["state"] == "STARTED" and len(st["workers"]) == n and all(
            w["state"] == "STARTED" for w in st["workers"]):
        return st
    return None


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}x{time.monotonic_ns() % 100000}"


# run as a session leader whose controlling terminal is its stdin (what a terminal's shell
# gives a command), then exec `python -m multibus ARGS`
ON_TERMINAL = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
               "os.execv(sys.executable, [sys.executable, '-m', 'multibus', *sys.argv[1:]])")


@contextlib.contextmanager
def running(*args: str, env: dict | None = None,
            terminal: int | None = None) -> Iterator[tuple[subprocess.Popen, Path]]:
    """``multibus run ARGS`` in the background, output in a file; always stopped and reaped.

    Detached (stdin /dev/null, as under systemd), or with ``terminal`` (a pty's slave fd) as
    its stdin and controlling terminal."""
    head = [sys.executable, "-m", "multibus"] if terminal is None else [
        sys.executable, "-c", ON_TERMINAL]
    with supervised([*head, "run", *args], env=env, terminal=terminal) as (proc, log):
        yield proc, log


@contextlib.contextmanager
def supervised(argv: list[str], env: dict | None = None, terminal: int | None = None,
               wait: float = 20, check_left: bool = True,
               ) -> Iterator[tuple[subprocess.Popen, Path]]:
    """``argv`` (a supervisor) in the background, its output in a file; on the way out
    SIGTERM (then SIGKILL after ``wait`` s) to it and to any process it left behind, which
    fails the test when ``check_left``."""
    with tempfile.NamedTemporaryFile("w+", prefix="mb-run-", suffix=".log", delete=False) as f:
        log = Path(f.name)
    out = open(log, "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=out,
                            stderr=subprocess.STDOUT, text=True, env=env,
                            stdin=subprocess.DEVNULL if terminal is None else terminal,
                            start_new_session=terminal is not None)
    descendants: set[int] = set()

    def note() -> None:
        try:
            descendants.update(p.pid for p in psutil.Process(proc.pid).children(recursive=True))
        except psutil.Error:
            pass

    try:
        yield proc, log
        note()
    finally:
        note()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        out.close()
        # workers are grandchildren: they must not outlive their supervisor
        left = []
        for pid in descendants:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
        gone, alive = psutil.wait_procs(left, timeout=5)
        for p in alive:
            p.kill()
        log.unlink(missing_ok=True)
        assert not (check_left and alive), f"processes left behind: {[p.pid for p in alive]}"


def output(log: Path) -> str:
    return log.read_text(errors="replace")


# --------------------------------------------------------------------------- fleet.toml


@pytest.mark.timeout(90)
def test_fleet_toml_lifecycle():
    """The example: 3 job workers that run after 'files', a cmd program (issue 16)."""
    name = unique("tf")
    with running(str(EXAMPLES / "fleet.toml"), "--name", name) as (proc, log):
        st = wait_for(lambda: all_started(name, 4), 30, "3 job workers and files.0 STARTED")
        assert st["name"] == name and st["pid"] == proc.pid and st["version"] == 1
        assert [g["name"] for g in st["groups"]] == ["job", "files"]
        assert st["groups"][0]["after"] == ["files"] and st["groups"][1]["cmd"][0] == "python3"
        w0 = st["workers"][0]
        assert set(w0) == {"group", "name", "index", "pid", "state", "restarts", "exit_code",
                           "uptime", "cpu_percent", "memory_rss", "launch"}  # + issue 18
        assert w0["memory_rss"] > 1_000_000 and w0["cpu_percent"] >= 0
        pids = {w["pid"] for w in st["workers"]}
        assert all(psutil.pid_exists(p) for p in pids)
        with urllib.request.urlopen("http://127.0.0.1:8765/", timeout=10) as page:
            assert page.status == 200  # the cmd group serves

        table = mb("status", "--name", name)
        assert table.returncode == 0
        assert "GROUP" in table.stdout and "job.2" in table.stdout and "STARTED" in table.stdout

        def jobs(st: dict) -> list[dict]:
            return [w for w in st["workers"] if w["group"] == "job"]

        r = mb("scale", "job", "5", "--name", name)
        assert r.returncode == 0, r.stderr
        st = all_started(name, 6)
        assert st and st["groups"][0]["count"] == 5
        r = mb("scale", "job", "2", "--name", name)
        assert r.returncode == 0, r.stderr
        st = wait_for(lambda: all_started(name, 3), 10, "2 job workers")
        assert [w["name"] for w in jobs(st)] == ["job.0", "job.1"]
        two = {w["pid"] for w in jobs(st)}

        r = mb("stop", "--name", name)
        assert r.returncode == 0, r.stderr
        st = status(name)
        assert st["state"] == "STOPPED"
        assert [w["state"] for w in jobs(st)] == ["STOPPED", "STOPPED"]
        assert {w["pid"] for w in jobs(st)} == two  # processes stay
        assert [w["state"] for w in st["workers"] if w["group"] == "files"] == ["EXITED"]

        r = mb("start", "--name", name)
        assert r.returncode == 0, r.stderr
        assert all_started(name, 3)

        r = mb("restart", "--name", name)
        assert r.returncode == 0, r.stderr
        st = all_started(name, 3)
        assert st and {w["pid"] for w in jobs(st)} == two  # bus transitions, same processes

        r = mb("scale", "nosuch", "1", "--name", name)
        assert r.returncode == 1 and "no group 'nosuch'" in r.stderr

        r = mb("exit", "--name", name)
        assert r.returncode == 0, r.stderr
        assert proc.wait(20) == 0


def test_bad_usage_exits_2():
    r = mb("run", "not-a-target")
    assert r.returncode == 2 and "neither a .toml file nor" in r.stderr
    r = mb("run", str(EXAMPLES / "fleet.toml"), "-n", "3")
    assert r.returncode == 2 and "-n and --mirror apply to a TARGET" in r.stderr
    r = mb("run", "jobs:worker", "--name", "a/b")
    assert r.returncode == 2 and "invalid hub name" in r.stderr
    r = mb("scale", "job", "-1", "--name", unique("x"))
    assert r.returncode == 2


# --------------------------------------------------------------------------- signals, logs, systemd


@pytest.mark.timeout(90)
def test_signals_logs_and_systemd_notify(tmp_path):
    name = unique("ts")
    sock_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
    try:
        with running(str(EXAMPLES / "fleet.toml"), "--name", name, "--log-format", "json",
                     env=env) as (proc, log):
            assert notify.recv(4096).decode().startswith("READY=1")
            assert all_started(name, 4)  # READY=1 came once every worker was STARTED

            proc.send_signal(signal.SIGTTIN)
            wait_for(lambda: all_started(name, 5), 20, "4 job workers after SIGTTIN")
            proc.send_signal(signal.SIGTTOU)
            wait_for(lambda: all_started(name, 4), 20, "3 job workers after SIGTTOU")

            proc.send_signal(signal.SIGHUP)

            def reloaded() -> bool:
                r = mb("logs", "job", "--name", name, "-n", "1000")
                return r.stdout.count("Bus graceful") >= 3 and r.stdout.count(
                    "reloaded after job") >= 3
            wait_for(reloaded, 20, "every job worker reloaded (graceful)")

            r = mb("logs", "job.1", "--name", name, "--log-format", "json", "-n", "5")
            recs = [json.loads(line) for line in r.stdout.splitlines()]
            assert recs and all(rec["source"] == "job.1" and rec["group"] == "job" and
                                rec["index"] == 1 for rec in recs)
            assert proc.poll() is None  # SIGHUP did not end it

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
            msgs = []
            while True:
                try:
                    msgs.append(notify.recv(4096).decode())
                except TimeoutError:
                    break
                if "STOPPING=1" in msgs[-1]:
                    break
            assert any("STOPPING=1" in m for m in msgs), msgs
            lines = output(log).splitlines()
            recs = [json.loads(line) for line in lines]  # every line is a JSON record
            assert {"time", "level", "source", "group", "index", "message"} <= set(recs[0])
            assert any(r["source"] == "supervisor" and r["message"] == "Bus EXITED"
                       for r in recs)
    finally:
        notify.close()


@pytest.mark.timeout(60)
def test_closing_the_terminal_stops_the_fleet():
    """SIGHUP with a controlling terminal exits (as CherryPy's SignalHandler), instead of the
    reload it is when detached (test_signals_logs_and_systemd_notify): closing the terminal
    does not leave the fleet running (issue 15)."""
    name = unique("th")
    master, slave = os.openpty()
    try:
        with running(str(EXAMPLES / "fleet.toml"), "--name", name, terminal=slave) as (
                proc, log):
            os.close(slave)
            slave = -1
            st = wait_for(lambda: all_started(name, 4), 30, "4 workers STARTED")
            os.close(master)  # the terminal goes away: the kernel sends SIGHUP
            master = -1
            assert proc.wait(20) == 0
            text = output(log)
            assert "SIGHUP on a terminal (it closed): stopping the fleet" in text
            assert "Bus graceful" not in text
            assert not any(psutil.pid_exists(w["pid"]) and psutil.Process(w["pid"]).status()
                           != psutil.STATUS_ZOMBIE for w in st["workers"])
    finally:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)


@pytest.mark.timeout(60)
def test_logs_follow_and_level_filter():
    name = unique("tl")
    with running(str(EXAMPLES / "fleet.toml"), "--name", name, "--log-level", "warning") as (
            proc, log):
        wait_for(lambda: all_started(name, 4), 30, "4 workers STARTED")
        follower = subprocess.Popen(
            [sys.executable, "-m", "multibus", "logs", "-f", "job.0", "--name", name, "-n", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            lines: list[str] = []
            got = threading.Event()

            def read() -> None:
                for line in follower.stdout:
                    lines.append(line)
                    if "job" in line and "done" in line:
                        got.set()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            assert got.wait(15), lines
            assert all("| " in ln and "job.0" in ln for ln in lines)
            assert mb("exit", "--name", name).returncode == 0
            assert follower.wait(15) == 0  # -f ends when the supervisor is gone
        finally:
            if follower.poll() is None:
                follower.kill()
            follower.wait(5)
        assert proc.wait(20) == 0
        text = output(log)
        assert "job 1 done" not in text and "Bus STARTED" not in text  # INFO filtered out


# --------------------------------------------------------------------------- cherrypy


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("no two consecutive free ports")


def _get(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read().decode()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
        return body
    finally:
        conn.close()


def _answers(port: int) -> bool:
    try:
        _get(port)
        return True
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_cherrypy_site_graceful_without_failed_requests(tmp_path):
    name = unique("tw")
    base = _free_port_pair()
    text = (EXAMPLES / "cherrypy_site.toml").read_text()
    assert 'HTTP_PORT_BASE = "8080"' in text and 'pythonpath = ["."]' in text
    text = text.replace('HTTP_PORT_BASE = "8080"', f'HTTP_PORT_BASE = "{base}"')
    text = text.replace('pythonpath = ["."]', f'pythonpath = ["{EXAMPLES}"]')
    path = tmp_path / "site.toml"
    path.write_text(text)
    ports = (base, base + 1)
    with running(str(path), "--name", name) as (proc, log):
        wait_for(lambda: all_started(name, 2), 40, "2 cherrypy workers STARTED")
        assert all(_answers(p) for p in ports)
        assert "generation 0" in _get(base) and "web.1" in _get(base + 1)

        ok = [0, 0]
        failures: list[str] = []
        seen: list[set[str]] = [set(), set()]
        stop = threading.Event()

        def hammer(i: int) -> None:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline and ok[i] < 20000:
                try:
                    body = _get(ports[i])
                    ok[i] += 1
                    seen[i].add(body.rsplit("generation ", 1)[1].strip())
                except Exception as e:  # noqa: BLE001 - every failure counts
                    failures.append(f"{ports[i]}: {e!r}")

        threads = [threading.Thread(target=hammer, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: min(ok) >= 20, 20, "requests before graceful")
            r = mb("graceful", "--name", name)
            assert r.returncode == 0, r.stderr
            wait_for(lambda: all("1" in s for s in seen), 20, "generation 1 on both ports")
            after = list(ok)
            wait_for(lambda: all(ok[i] >= after[i] + 20 for i in (0, 1)), 20,
                     "requests after graceful")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        print(f"requests ok per port: {ok}, failed: {len(failures)}")
        assert failures == [], failures[:5]
        assert all(s == {"0", "1"} for s in seen), seen

        r = mb("stop", "--name", name)
        assert r.returncode == 0, r.stderr
        assert not any(_answers(p) for p in ports)  # stop closed the ports
        assert states(name) == ["STOPPED", "STOPPED"]
        r = mb("start", "--name", name)
        assert r.returncode == 0, r.stderr
        assert all(_answers(p) for p in ports)

        r = mb("exit", "--name", name)
        assert r.returncode == 0, r.stderr
        assert proc.wait(30) == 0
        assert "cherrypy: Serving on" in output(log)


# --------------------------------------------------------------------------- a slow start


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["SIGTERM", "exit"])
def test_exit_is_not_delayed_by_a_slow_start(tmp_path, how):
    """Answered while starting, and an exit request aborts the start instead of queueing
    behind it for start_timeout."""
    name = unique("tz")
    path = tmp_path / "slow.toml"
    path.write_text(f'[supervisor]\nname = "{name}"\nterm_timeout = 1\n'
                    f'pythonpath = ["{ROOT / "tests"}"]\n'
                    '[groups.s]\ntarget = "targets.jobs:slow_start"\ncount = 2\n'
                    'start_timeout = 50\nstop_timeout = 2\n')
    with running(str(path)) as (proc, log):
        st = wait_for(lambda: (s := status(name)) and s["state"] == "STARTING" and all(
            w["state"] == "STARTING" for w in s["workers"]) and s, 30, "workers STARTING")
        assert len(st["workers"]) == 2
        queued = mb("stop", "--name", name, "--no-wait")  # queued, not refused
        assert queued.returncode == 0 and "queued" in queued.stdout
        t0 = time.monotonic()
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            r = mb("exit", "--name", name)
            assert r.returncode == 0, r.stderr
        proc.wait(20)
        assert time.monotonic() - t0 < 15  # not start_timeout (50 s)


@pytest.mark.timeout(60)
def test_bank_broker_toml():
    name = unique("tb")
    with running(str(EXAMPLES / "bank_broker.toml"), "--name", name) as (proc, log):
        wait_for(lambda: all_started(name, 2), 30, "bank and broker STARTED")
        wait_for(lambda: "order placed for" in mb("logs", "broker", "--name", name).stdout, 20,
                 "an order mirrored from the bank to the broker")
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(20) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("toml", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_example_files_are_valid(toml):
    from multibus.config import load
    from multibus.preflight import check_targets

    check_targets(load(toml))


@pytest.mark.timeout(60)
def test_run_target_with_count_and_mirror():
    name = unique("tt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(EXAMPLES), str(ROOT)]))
    with running("jobs:worker", "-n", "2", "--mirror", "orders", "--name", name, env=env) as (
            proc, log):
        st = wait_for(lambda: all_started(name, 2), 30, "2 workers STARTED")
        assert [{k: g[k] for k in ("name", "target", "count", "running")}  # + issue 16
                for g in st["groups"]] == [{"name": "jobs", "target": "jobs:worker",
                                            "count": 2, "running": 2}]
        assert [w["name"] for w in st["workers"]] == ["jobs.0", "jobs.1"]
        # issue 18: workers retitle themselves (the channel is no longer in the command line)
        assert psutil.Process(st["workers"][0]["pid"]).cmdline()[0] == f"multibus: jobs.0 [{name}]"
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(20) == 0


def test_run_with_zygote_forks_workers():
    name = unique("tz")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(EXAMPLES), str(ROOT)]))
    with running("jobs:worker", "-n", "2", "--zygote", "--name", name, env=env) as (proc, log):
        st = wait_for(lambda: all_started(name, 2), 30, "2 workers STARTED")
        for w in st["workers"]:  # issue 18: the status says it (not the command line)
            assert w["launch"] == "fork"
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(20) == 0


def test_run_exec_opts_out_of_the_zygote():
    r = mb("run", "targets.jobs:job", "--exec", "--preload", "targets.jobs")
    assert r.returncode == 2
    assert "--exec: cannot be combined with --zygote, --preload" in r.stderr
    name = unique("tx")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(EXAMPLES), str(ROOT)]))
    with running("jobs:worker", "-n", "2", "--exec", "--name", name, env=env) as (proc, log):
        st = wait_for(lambda: all_started(name, 2), 30, "2 workers STARTED")
        assert [w["launch"] for w in st["workers"]] == ["exec (zygote disabled)"] * 2
        assert "LAUNCH" in mb("status", "--name", name).stdout
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(20) == 0


def test_zygote_preload_from_a_fleet_file_imports_the_worker_module_once(tmp_path):
    # the module is found only through the group's pythonpath (run from ROOT, not tests/)
    stamp = tmp_path / "imports"
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[supervisor]\nzygote_preload = ["targets.stamped"]\n'
                     '[groups.s]\ntarget = "targets.stamped:worker"\ncount = 2\n'
                     f'pythonpath = ["{ROOT / "tests"}"]\n')
    name = unique("tp")
    env = dict(os.environ, MB_STAMP=str(stamp))
    with running(str(fleet), "--name", name, env=env) as (proc, log):
        st = wait_for(lambda: all_started(name, 2), 30, "2 workers STARTED")
        workers = {w["pid"] for w in st["workers"]}
        assert all(w["launch"] == "fork" for w in st["workers"])  # issue 18: not the cmdline
        importers = [int(line) for line in stamp.read_text().split()]
        # the target check before the start, then the zygote: never a worker
        assert len(importers) == 2 and not workers & set(importers), (importers, workers)
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(20) == 0


def test_preload_option_names_a_module():
    r = mb("run", "targets.jobs:job", "--preload", "targets/jobs.py")
    assert r.returncode == 2
    assert "--preload 'targets/jobs.py': expected a module name like 'app.jobs'" in r.stderr


@pytest.mark.timeout(60)
def test_second_ctrl_c_kills_a_stuck_stop():
    name = unique("tk")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    with running("targets.jobs:stubborn", "-n", "2", "--name", name, env=env) as (proc, log):
        wait_for(lambda: all_started(name, 2), 30, "2 workers STARTED")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: (s := status(name)) and s["state"] == "STOPPING", 10, "STOPPING")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 1  # workers had to be killed
        assert time.monotonic() - t0 < 4  # not stop_timeout (5 s) + term_timeout (2 s)
        assert "interrupted again" in output(log)


@pytest.mark.timeout(60)
def test_run_refuses_a_target_that_does_not_import_before_anything_starts(tmp_path):
    """The targets are checked while `multibus run` imports the rest of the supervisor: a
    group whose target does not import still fails with one line, exit 2, before the
    supervisor starts (no control socket, no PID file)."""
    name = unique("tbad")
    f = tmp_path / "bad.toml"
    f.write_text(f'[supervisor]\nname = "{name}"\n[groups.ok]\ntarget = "targets.jobs:job"\n'
                 f'[groups.web]\ntarget = "nosuchmodule_xyz:serve"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    r = mb("run", str(f), env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "groups.web.target" in lines[0], r.stderr
    assert "No module named 'nosuchmodule_xyz'" in lines[0] and "Traceback" not in r.stderr
    assert status(name) is None
