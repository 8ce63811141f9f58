"""Deploying new code under load: multibus rolling reload vs gunicorn HUP, side by side.

    python benchmarks/bench_reload.py [--clients 8] [--reloads 3] [--gap 2] [--workers 4]
                                      [--no-gunicorn] [--json FILE]

One run, on loopback, the same page (``examples/web.py``: says its code ``VERSION`` and pid)
served by 4 workers, under bounded load: ``--clients`` client threads, each opening a new
connection per request (``Connection: close``), for the whole run of each system.

* multibus: ``multibus run`` of a copy of ``examples/web.toml`` (CherryPy on the shared socket,
  workers forked from the zygote); each reload edits ``VERSION`` and runs ``multibus reload``.
* gunicorn sync / gthread (4 threads): ``gunicorn web:app -w 4`` (the same module's WSGI
  ``app``); each reload edits ``VERSION`` and sends SIGHUP to the master, and is over once
  every worker is a new process answering with the new version.
* then, for each system, a reload onto code that raises at import.

Reported per system: requests served, failed requests by kind (refused, reset, empty answer,
timeout, HTTP status...), p50/p99 latency of requests that started during a reload and of the
others, seconds per reload, and the versions answering in the last second. ``Load`` is also
what ``tests/test_reload.py`` drives. gunicorn is in the ``bench`` extra (``pip install
gunicorn``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
VERSION_RE = re.compile(r"version (\S+)")


# -- the load ---------------------------------------------------------------------------------

@dataclass
class Answer:
    start: float  # time.monotonic() when the connection was opened
    latency: float
    kind: str  # 'ok', or why it failed: 'refused', 'reset', 'empty', 'timeout', 'http 503'...
    version: str | None = None


def get(host: str, port: int, timeout: float = 10.0) -> tuple[str, str | None]:
    """One request on a new connection: ('ok', version) or (failure kind, None)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(REQUEST)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except ConnectionRefusedError:
        return "refused", None
    except ConnectionResetError:
        return "reset", None
    except TimeoutError:
        return "timeout", None
    except OSError as e:
        return f"error {e.errno}", None
    if not data:
        return "empty", None
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    if status != [b"200"]:
        return f"http {status[0].decode() if status else '?'}", None
    m = VERSION_RE.search(body.decode("utf-8", "replace"))
    return "ok", m.group(1) if m else None


@dataclass
class Load:
    """``clients`` threads sending requests to ``host:port`` (a connection each) until
    :meth:`stop`; use as a context manager. Each thread keeps its own answers (no lock)."""

    port: int
    clients: int = 8
    host: str = "127.0.0.1"
    _threads: list[threading.Thread] = field(default_factory=list)
    _lists: list[list[Answer]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Load:
        for i in range(self.clients):
            answers: list[Answer] = []
            self._lists.append(answers)
            t = threading.Thread(target=self._client, args=(answers,), name=f"load-{i}",
                                 daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _client(self, answers: list[Answer]) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            kind, version = get(self.host, self.port)
            answers.append(Answer(t0, time.monotonic() - t0, kind, version))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def answers(self, since: float = 0.0) -> list[Answer]:
        """Every answer so far of a request started at or after ``since``, by start time."""
        out = [a for answers in self._lists for a in list(answers) if a.start >= since]
        return sorted(out, key=lambda a: a.start)

    def wait(self, n: int, since: float = 0.0, timeout: float = 30.0) -> list[Answer]:
        """Until ``n`` answers of requests started after ``since`` are in (AssertionError on
        timeout); returns them."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.answers(since)
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(got)} of {n} answers in {timeout}s")
            time.sleep(0.02)

    def failures(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.answers():
            if a.kind != "ok":
                out[a.kind] = out.get(a.kind, 0) + 1
        return out


# -- the systems --------------------------------------------------------------------------------

def deploy(app_dir: Path, version: str, broken: bool = False) -> None:
    """Write ``examples/web.py`` into ``app_dir`` with ``VERSION = version`` (raising at
    import if ``broken``); no stale bytecode (same size, same second) is left behind."""
    src = (EXAMPLES / "web.py").read_text()
    extra = '\nraise RuntimeError("this deploy is broken")' if broken else ""
    (app_dir / "web.py").write_text(src.replace('VERSION = "1"', f'VERSION = "{version}"{extra}'))
    shutil.rmtree(app_dir / "__pycache__", ignore_errors=True)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _until(what: str, check: object, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()  # type: ignore[operator]
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _reap(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Wait for a server asked to stop; SIGKILL it after ``timeout`` s."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Multibus:
    """``multibus run`` of examples/web.toml (port 0), reloaded with ``multibus reload``."""

    def __init__(self, app_dir: Path, workers: int) -> None:
        self.dir = app_dir
        self.name = f"bench{os.getpid()}"
        self.label = "multibus"
        toml = (EXAMPLES / "web.toml").read_text()
        toml = toml.replace('"127.0.0.1:8080"', '"127.0.0.1:0"').replace(
            'name = "web"', f'name = "{self.name}"').replace("count = 4", f"count = {workers}")
        (app_dir / "web.toml").write_text(toml)
        self.workers = workers
        self.log = open(app_dir / "multibus.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "multibus", "run",
                                      str(app_dir / "web.toml")], env=_env(), cwd=app_dir,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        st = _until("the fleet", self._started, 60)
        self.port = int(st["sockets"][0]["address"].rpartition(":")[2])  # type: ignore[index]

    def _mb(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "multibus", *args, "--name", self.name],
                              env=_env(), capture_output=True, text=True, timeout=300)

    def _started(self) -> dict | None:
        r = self._mb("status", "--json")
        st = json.loads(r.stdout) if r.returncode == 0 else None
        ok = st and sum(w["state"] == "STARTED" for w in st["workers"]) == self.workers
        return st if ok else None

    def reload(self, version: str) -> tuple[bool, str]:
        r = self._mb("reload")
        return r.returncode == 0, (r.stdout + r.stderr).strip().splitlines()[-1][:160]

    def stop(self) -> None:
        self._mb("exit")
        _reap(self.proc)
        self.log.close()


class Gunicorn:
    """``gunicorn web:app`` (sync, or gthread with 4 threads), reloaded with SIGHUP: a reload
    is over once every worker is a new process (or the master is gone)."""

    def __init__(self, app_dir: Path, workers: int, kind: str) -> None:
        import psutil

        self.psutil = psutil
        self.label = f"gunicorn {kind}"
        self.workers = workers
        with socket.socket() as s:  # a free port (gunicorn binds it itself)
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = open(app_dir / f"gunicorn-{kind}.log", "w")  # noqa: SIM115 - see stop()
        argv = [sys.executable, "-m", "gunicorn", "web:app", "-w", str(workers), "-k", kind,
                "-b", f"127.0.0.1:{self.port}", "--backlog", "1024", "--graceful-timeout", "10",
                "--chdir", str(app_dir), "--log-level", "warning"]
        if kind == "gthread":
            argv += ["--threads", "4"]
        self.proc = subprocess.Popen(argv, env=_env(), cwd=app_dir, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _until("gunicorn", lambda: len(self._workers()) == workers
               and get("127.0.0.1", self.port)[0] == "ok", 60)

    def _workers(self) -> set[int]:
        try:
            return {p.pid for p in self.psutil.Process(self.proc.pid).children()}
        except self.psutil.Error:
            return set()

    def reload(self, version: str) -> tuple[bool, str]:
        old = self._workers()
        self.proc.send_signal(signal.SIGHUP)

        def over() -> bool:
            now = self._workers()
            return self.proc.poll() is not None or (
                len(now) == self.workers and not now & old
                and get("127.0.0.1", self.port) == ("ok", version))

        try:
            _until("the HUP", over, 60)
        except RuntimeError as e:
            return False, str(e)
        if self.proc.poll() is not None:
            return False, f"the master exited (status {self.proc.returncode})"
        return True, "every worker replaced"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _reap(self.proc)
        self.log.close()


# -- one phase, measured -------------------------------------------------------------------------

def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def phase(system: object, app_dir: Path, versions: list[str], broken: bool, clients: int,
          gap: float) -> dict:
    """Load ``system`` for ``gap`` s, reload it onto each of ``versions`` (the last one
    ``broken``: raising at import) with ``gap`` s between, then ``gap`` s more."""
    intervals: list[tuple[float, float]] = []
    reloads = []
    with Load(system.port, clients) as load:  # type: ignore[attr-defined]
        time.sleep(gap)
        for i, version in enumerate(versions):
            deploy(app_dir, version, broken=broken and i == len(versions) - 1)
            t0 = time.monotonic()
            ok, said = system.reload(version)  # type: ignore[attr-defined]
            t1 = time.monotonic()
            intervals.append((t0, t1))
            reloads.append({"ok": ok, "seconds": round(t1 - t0, 2), "said": said})
            time.sleep(gap)
        end = time.monotonic()
    answers = load.answers()
    during = [a for a in answers if any(t0 <= a.start <= t1 for t0, t1 in intervals)]
    outside = [a for a in answers if a not in during]

    def lat(xs: list[Answer], q: float) -> float | None:
        v = _pct([a.latency for a in xs if a.kind == "ok"], q)
        return None if v is None else round(v * 1000, 1)

    last = [a for a in answers if a.start >= end - 1.0]
    versions_end: dict[str, int] = {}
    for a in last:
        key = a.version if a.kind == "ok" else a.kind
        versions_end[str(key)] = versions_end.get(str(key), 0) + 1
    return {
        "system": system.label, "phase": "bad code" if broken else f"{len(versions)} reloads",  # type: ignore[attr-defined]
        "served": sum(a.kind == "ok" for a in answers), "failed": load.failures(),
        "p50_outside_ms": lat(outside, 0.5), "p99_outside_ms": lat(outside, 0.99),
        "p50_during_ms": lat(during, 0.5), "p99_during_ms": lat(during, 0.99),
        "reloads": reloads, "versions_last_second": versions_end,
    }


def table(rows: list[dict]) -> str:
    head = ("system", "phase", "served", "failed", "p50/p99 out ms", "p50/p99 during ms",
            "s/reload", "reload ok", "answers in the last second")
    out = [head]
    for r in rows:
        failed = ", ".join(f"{n} {k}" for k, n in sorted(r["failed"].items())) or "0"
        secs = "/".join(f"{x['seconds']:.2f}" for x in r["reloads"])
        oks = "/".join("yes" if x["ok"] else "no" for x in r["reloads"])
        vers = ", ".join(f"{k}: {n}" for k, n in sorted(r["versions_last_second"].items()))
        out.append((r["system"], r["phase"], str(r["served"]), failed,
                    f"{r['p50_outside_ms']}/{r['p99_outside_ms']}",
                    f"{r['p50_during_ms']}/{r['p99_during_ms']}", secs, oks, vers))
    widths = [max(len(row[i]) for row in out) for i in range(len(head))]
    lines = [" | ".join(c.ljust(widths[i]) for i, c in enumerate(row)) for row in out]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--reloads", type=int, default=3)
    ap.add_argument("--gap", type=float, default=2.0, help="seconds of load between steps")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--no-gunicorn", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    makers = [("multibus", lambda d: Multibus(d, args.workers))]
    if not args.no_gunicorn:
        makers += [(f"gunicorn {k}", lambda d, k=k: Gunicorn(d, args.workers, k))
                   for k in ("sync", "gthread")]
    rows = []
    for label, make in makers:
        for broken in (False, True):
            with tempfile.TemporaryDirectory(prefix="bench-reload-") as tmp:
                app_dir = Path(tmp)
                deploy(app_dir, "1")
                system = make(app_dir)
                try:
                    versions = ["bad"] if broken else [str(i + 2) for i in range(args.reloads)]
                    rows.append(phase(system, app_dir, versions, broken, args.clients,
                                      args.gap))
                finally:
                    system.stop()
            print(f"{label}: {rows[-1]['phase']} done", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
