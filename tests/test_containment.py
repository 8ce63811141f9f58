"""Containment (issue 14 part 1): nothing a fleet started outlives it, whatever the way out.

Black-box through ``multibus run`` with a fleet file: workers (tests/targets/escapers.py) that
start a child, a ``setsid`` child, a double-forked daemon, or block every catchable signal in
their stop listener; each records the pids a test then checks. Both boundaries are tested: a
cgroup v2 group (this machine: root, cgroup2 mounted) and the /proc scan fallback (forced with
``containment = "scan"``). The soak loop (``-m soak``) repeats "SIGKILL the supervisor" 100 times.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from progs.procio import wait_for

from multibus import containment
from multibus.bus import Bus
from multibus.containment import Containment, cgroup2_mount
from multibus.runner import FleetRefused, run_fleet
from multibus.specs import WorkerSpec
from multibus.supervisor import Supervisor

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PATH = os.pathsep.join([str(HERE), str(ROOT)])
HAVE_CGROUP = cgroup2_mount() is not None and os.geteuid() == 0
needs_cgroup = pytest.mark.skipif(not HAVE_CGROUP, reason="needs root and a cgroup v2 mount")
MODES = [pytest.param("cgroup", marks=needs_cgroup), "scan"]


def alive(pid: int) -> bool:
    """Running (a zombie is dead: it only waits for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def mb(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multibus", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=30, env=env)


@dataclass
class Fleet:
    name: str
    proc: subprocess.Popen
    log: Path
    records: Path
    env: dict
    pids: list[int] = field(default_factory=list)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_supervisor(self) -> float:
        """SIGKILL the supervisor; the monotonic time it was sent."""
        t0 = time.monotonic()
        self.proc.kill()
        self.proc.wait(10)
        return t0

    def status(self, *args: str) -> subprocess.CompletedProcess:
        return mb("status", "--name", self.name, *args, env=self.env)


@contextlib.contextmanager
def fleet(tmp_path: Path, target: str = "all_kinds", n: int = 2, mode: str = "auto",
          stop_timeout: float = 1.0) -> Iterator[Fleet]:
    """``multibus run`` of ``n`` workers of ``targets.escapers:<target>`` with ``containment =
    mode``; yields once every worker recorded its pids. Always: the supervisor and every
    recorded pid are killed at the end, so a failing test leaves nothing behind."""
    name = f"c{uuid.uuid4().hex[:8]}"
    records = tmp_path / f"rec-{name}"
    records.mkdir()
    toml = tmp_path / f"{name}.toml"
    toml.write_text(f"""
[supervisor]
name = "{name}"
containment = "{mode}"
stop_timeout = {stop_timeout}
term_timeout = 0.5
[groups.esc]
target = "targets.escapers:{target}"
count = {n}
env = {{ MB_ESCAPE_DIR = "{records}" }}
""")
    env = dict(os.environ, PYTHONPATH=PATH)
    log = tmp_path / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "multibus", "run", str(toml)], cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    f = Fleet(name, proc, log, records, env)
    try:
        def recorded() -> bool:
            return len([p for p in records.iterdir() if not p.name.endswith(".tmp")]) >= n
        wait_for(lambda: recorded() or proc.poll() is not None, 30)
        assert recorded(), f"workers did not start: {f.output()[-2000:]}"
        f.pids = sorted({int(x) for p in records.iterdir() if not p.name.endswith(".tmp")
                         for x in p.read_text().split()})
        yield f
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        left = [p for p in f.pids if alive(p)]
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def groups_of(name: str) -> list[str]:
    mount = cgroup2_mount()
    if mount is None:
        return []
    return [d for _root, dirs, _f in os.walk(mount) for d in dirs
            if d.startswith(f"multibus-{name}-")]


# -- SIGKILL of the supervisor: every kind of escape, both boundaries -------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["child", "setsid", "daemon", "blocker"])
def test_sigkill_of_the_supervisor_leaves_nothing(tmp_path, mode, kind):
    with fleet(tmp_path, kind, n=2, mode=mode) as f:
        assert len(f.pids) == (2 if kind == "blocker" else 4)
        t0 = f.kill_supervisor()
        left = wait_for(lambda: not any(alive(p) for p in f.pids), 2.0)
        took = time.monotonic() - t0
        assert left, (f"still alive 2 s after SIGKILL of the supervisor: "
                      f"{[p for p in f.pids if alive(p)]}")
        assert took < 2.0
        if mode == "cgroup":  # the guardian removed the group
            assert wait_for(lambda: not groups_of(f.name), 2.0), groups_of(f.name)


# -- clean exit: what the workers left is killed, and said ------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_clean_exit_kills_what_is_left_and_logs_each(tmp_path, mode):
    with fleet(tmp_path, "all_kinds", n=2, mode=mode, stop_timeout=0.5) as f:
        f.proc.send_signal(signal.SIGTERM)
        code = f.proc.wait(30)
        out = f.output()
        assert code == 1, out  # the blocking workers had to be killed
        assert not [p for p in f.pids if alive(p)], out
        said = [ln for ln in out.splitlines() if "containment: killed" in ln]
        assert len(said) == 1, out
        assert "WARNING" in said[0] and "sleep 1000" in said[0]
        if mode == "cgroup":
            assert not groups_of(f.name)
            assert f"left in cgroup {cgroup2_mount()}/multibus-{f.name}-{f.proc.pid}" in said[0]
        else:
            assert "left in scan (marker MULTIBUS_FLEET=" in said[0]


@pytest.mark.timeout(60)
def test_exit_command_kills_a_leftover_daemon_and_exits_0(tmp_path):
    with fleet(tmp_path, "daemon", n=1, mode="auto") as f:
        assert mb("exit", "--name", f.name, env=f.env).returncode == 0
        assert f.proc.wait(30) == 0
        assert "containment: killed 1 process left in" in f.output()  # the daemon, named
        assert not [p for p in f.pids if alive(p)]


# -- status says which containment is in force ------------------------------------------------

@needs_cgroup
@pytest.mark.timeout(60)
def test_status_names_the_cgroup_and_every_process_is_in_it(tmp_path):
    with fleet(tmp_path, "all_kinds", n=2) as f:
        group = f"{cgroup2_mount()}/multibus-{f.name}-{f.proc.pid}"
        r = f.status()
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0].endswith(f", containment: cgroup {group}")
        assert json.loads(f.status("--json").stdout)["containment"] == f"cgroup {group}"
        rel = group[len(cgroup2_mount()):]
        for pid in [f.proc.pid, *f.pids]:  # supervisor, workers, children, daemons
            with open(f"/proc/{pid}/cgroup") as fh:
                assert f"0::{rel}\n" in fh.read(), pid


@pytest.mark.timeout(60)
def test_status_names_the_scan_marker(tmp_path):
    with fleet(tmp_path, "child", n=1, mode="scan") as f:
        st = json.loads(f.status("--json").stdout)
        assert st["containment"].startswith(f"scan (marker MULTIBUS_FLEET={f.name}-{f.proc.pid}-")
        assert f", containment: {st['containment']}" in f.status().stdout.splitlines()[0]
        assert not groups_of(f.name)


@pytest.mark.timeout(60)
def test_containment_none_is_said(tmp_path):
    with fleet(tmp_path, "blocker", n=1, mode="none", stop_timeout=0.2) as f:
        assert json.loads(f.status("--json").stdout)["containment"] == "none"


def test_a_bad_containment_value_exits_2_in_one_line(tmp_path):
    toml = tmp_path / "f.toml"
    toml.write_text('[supervisor]\ncontainment = "jail"\n[groups.a]\ntarget = "m:f"\n')
    r = mb("run", str(toml))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "supervisor.containment" in r.stderr and "'scan'" in r.stderr


@pytest.mark.timeout(30)
def test_cgroup_forced_without_cgroup_v2_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(containment, "cgroup2_mount", lambda *a: None)
    spec = WorkerSpec(name="w", target="targets.jobs:job", env={"PYTHONPATH": PATH})
    with pytest.raises(FleetRefused) as e:
        run_fleet([spec], name=f"t{uuid.uuid4().hex[:8]}", log=lambda *a: None,
                  containment="cgroup")
    assert e.value.code == 2
    assert "containment = 'cgroup'" in str(e.value) and "'scan'" in str(e.value)
    assert Containment.describe_active() == "none"


# -- a Supervisor inside a threaded program (this test process) -------------------------------

def _own_cgroup() -> str:
    return containment.own_cgroup() or ""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_supervisors_in_this_process_each_get_a_boundary_and_clean_it(tmp_path, mode):
    home, marker = _own_cgroup(), os.environ.get("MULTIBUS_FLEET")
    seen = []
    for _ in range(2):  # one after the other: a new boundary each time, none left over
        bus = Bus()
        logs: list[str] = []
        bus.subscribe("log", lambda msg, level=20, logs=logs: logs.append(msg))
        spec = WorkerSpec(name="w", target="targets.escapers:setsid", count=1,
                          env={"PYTHONPATH": PATH, "MB_ESCAPE_DIR": str(tmp_path)})
        sup = Supervisor(bus, [spec], name=f"t{uuid.uuid4().hex[:8]}", pidfile=False,
                         subreaper=False, containment=mode)
        try:
            sup.subscribe()
            bus.start()
            desc = Containment.describe_active()
            assert desc.startswith(mode) and desc not in seen
            seen.append(desc)
            assert sup.containment is not None
            guardian = sup.containment.guardian_pid
            assert guardian and alive(guardian)
            recs = wait_for(lambda: [p for p in tmp_path.iterdir()
                                     if not p.name.endswith(".tmp")], 10)
            pids = [int(x) for p in recs for x in p.read_text().split()]
        finally:
            bus.exit()
        for p in recs:
            p.unlink()
        assert not [p for p in pids if alive(p)]
        assert any("containment: killed 1 process left in" in m for m in logs), logs
        assert not alive(guardian)  # reaped: the test's own child check finds nothing
        assert _own_cgroup() == home and os.environ.get("MULTIBUS_FLEET") == marker
        assert Containment.describe_active() == "none"
    assert not groups_of("t")


# -- soak: SIGKILL the supervisor of a fleet that tries every escape, again and again ---------

def _sigkill_rounds(tmp_path: Path, rounds: int) -> list[float]:
    times = []
    for i in range(rounds):
        d = tmp_path / str(i)
        d.mkdir()
        with fleet(d, "all_kinds", n=2) as f:
            t0 = f.kill_supervisor()
            gone = wait_for(lambda: not any(alive(p) for p in f.pids), 2.0, step=0.001)
            times.append(time.monotonic() - t0)
            assert gone, f"round {i}: left {[p for p in f.pids if alive(p)]}"
    return times


@pytest.mark.timeout(120)
def test_sigkill_rounds_short(tmp_path):
    assert len(_sigkill_rounds(tmp_path, 3)) == 3


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_sigkill_rounds_soak(tmp_path):
    times = sorted(_sigkill_rounds(tmp_path, 100))
    print(f"\n100 rounds: 0 left; time to clean: median {times[50] * 1000:.1f} ms, "
          f"max {times[-1] * 1000:.1f} ms")
