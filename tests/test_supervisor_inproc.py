"""Supervisor in the test process (no subreaper, no PID file): run-time API on real workers."""

from __future__ import annotations

import os
import signal
import sys
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from progs.procio import wait_for

from multibus.bus import Bus
from multibus.specs import SpecError, WorkerSpec
from multibus.supervisor import FleetError, HubBridge, Supervisor

HERE = Path(__file__).resolve().parent
PATH = os.pathsep.join([str(HERE), str(HERE.parent)])


@pytest.fixture
def fleet():
    made = []

    def make(target="targets.jobs:job", count=2, **kw):
        bus = Bus()
        tables: list[list[dict]] = []
        logs: list[str] = []
        bus.subscribe("workers", tables.append)
        bus.subscribe("log", lambda msg, level=20: logs.append(msg))
        spec = WorkerSpec(name="w", target=target, count=count, env={"PYTHONPATH": PATH},
                          start_timeout=kw.pop("start_timeout", 10.0),
                          stop_timeout=kw.pop("stop_timeout", 5.0))
        sup = Supervisor(bus, [spec], name=f"t{uuid.uuid4().hex[:8]}", pidfile=False,
                         subreaper=False, **kw)
        sup.tables, sup.logs = tables, logs  # type: ignore[attr-defined]
        made.append((bus, sup))
        sup.subscribe()
        return bus, sup

    try:
        yield make
    finally:
        for bus, sup in made:
            try:
                bus.exit()
            finally:
                for w in list(sup.workers.values()):
                    if w.child is not None and w.child.returncode is None:
                        os.killpg(w.child.pgid, 9)


@pytest.mark.timeout(60)
def test_table_scale_up_and_down(fleet):
    bus, sup = fleet(count=2)
    bus.start()
    assert [r["state"] for r in sup.table()] == ["STARTED", "STARTED"]
    assert sup.tables and all(r["pid"] for r in sup.tables[-1])
    sup.scale("w", 4)
    t = sup.table()
    assert [r["name"] for r in t] == ["w.0", "w.1", "w.2", "w.3"]
    assert all(r["state"] == "STARTED" for r in t)
    gone = [r["pid"] for r in t[1:]]
    sup.scale("w", 1)
    assert [r["name"] for r in sup.table()] == ["w.0"]
    assert wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in gone), 5)
    assert sup.killed == set()
    with pytest.raises(SpecError, match="no worker group 'nope'"):
        sup.scale("nope", 1)
    bus.exit()
    assert sup.exit_code == 0
    assert sup.table()[0]["state"] == "EXITED" and sup.table()[0]["exit_code"] == 0


@pytest.mark.timeout(60)
def test_parent_exit_is_one_round_and_waits_for_worker_stops(fleet):
    """The stop that opens the parent's exit sends 'exit' at once: each worker stops its bus
    once (not 'stop' and then again inside 'exit'), and the parent's stop phase still ends
    only after every worker has stopped."""
    bus, sup = fleet(count=3)
    bus.start()
    after_stop = []
    bus.subscribe("stop", lambda: after_stop.append([r["state"] for r in sup.table()]), 90)
    bus.exit()
    assert sup.exit_code == 0
    assert len(after_stop) == 1
    assert all(s in ("STOPPED", "EXITING", "EXITED") for s in after_stop[0]), after_stop
    for name in ("w.0", "w.1", "w.2"):
        assert sum(1 for m in sup.logs if m == f"{name} | Bus STOPPING") == 1, sup.logs


@pytest.mark.timeout(60)
def test_stale_peer_reports_do_not_touch_the_replacement(fleet, tmp_path, monkeypatch):
    """A killed worker's connection loss can reach the bus after its replacement (same
    name) was spawned: that report is about the old process and must not terminate the new
    one, nor may the old process's last state overwrite the new one's."""
    gate = tmp_path / "gate"
    monkeypatch.setenv("MB_GATE", str(gate))
    bus, sup = fleet(target="targets.jobs:gated", count=1)
    bus.start()
    (name, w), = sup.workers.items()
    old = w.child.pid
    gate.touch()  # the replacement will wait before it connects
    os.kill(old, 9)
    wait_for(lambda: w.child.pid != old and w.state == "SPAWNING",
             what="the replacement to be spawned")
    new = w.child.pid
    bus.publish("peer.state", name, "STOPPING")  # the old process's last words, late
    bus.publish("peer.lost", name, "disconnected")  # listeners run before publish returns
    assert w.state == "SPAWNING"
    (tmp_path / "gate.open").touch()
    wait_for(lambda: sup.table()[0]["state"] == "STARTED", what="the replacement to start")
    assert w.child.pid == new and w.restarts == 1
    assert not [m for m in sup.logs if f"(pid {new})" in m and "lost contact" in m], sup.logs


@pytest.mark.timeout(60)
def test_suspended_worker_is_resumed_with_its_sigterm(fleet):
    """A SIGSTOPped worker can act neither on 'exit' nor on SIGTERM: after its stop timeout
    the supervisor sends SIGTERM and then SIGCONT (as systemd does), so the worker exits on its
    SIGTERM instead of being SIGKILLed a term timeout later."""
    bus, sup = fleet(count=1, stop_timeout=0.3, term_timeout=15)
    bus.start()
    w = sup.workers["w.0"]
    os.kill(w.child.pid, signal.SIGSTOP)
    bus.exit()
    assert w.child.returncode == 0, w.child.describe_exit()
    assert sup.exit_code == 1  # it had to be signalled


@pytest.mark.timeout(60)
def test_stop_keeps_processes_and_start_again(fleet):
    bus, sup = fleet(count=2)
    bus.start()
    pids = [r["pid"] for r in sup.table()]
    bus.stop()
    assert [r["state"] for r in sup.table()] == ["STOPPED", "STOPPED"]
    assert [r["pid"] for r in sup.table()] == pids
    bus.start()
    assert [r["state"] for r in sup.table()] == ["STARTED", "STARTED"]
    assert [r["pid"] for r in sup.table()] == pids
    bus.graceful()
    bus.exit()
    assert sup.exit_code == 0


@pytest.mark.timeout(60)
def test_start_timeout_names_worker_and_its_error(fleet):
    bus, sup = fleet(target="targets.jobs:failing_start", count=1, start_timeout=3.0)
    with pytest.raises(FleetError) as e:
        bus.start()
    msg = str(e.value)
    # issue 15 item 3: the worker reports its failed start, so the start fails at once
    # (it said "not STARTED" after start_timeout before)
    assert "w.0" in msg and "failed to start" in msg and "cannot open port 99999" in msg
    bus.exit()
    assert sup.exit_code == 1


@pytest.mark.timeout(30)
def test_bad_spec_fails_before_anything_runs():
    with pytest.raises(SpecError, match="restart 'sometimes' must be one of"):
        WorkerSpec(name="w", target="a.b:c", restart="sometimes")
    with pytest.raises(SpecError, match="target 'abc' must look like"):
        WorkerSpec(name="w", target="abc")
    with pytest.raises(SpecError, match="unknown key"):
        WorkerSpec.from_dict({"name": "w", "target": "a:b", "cuont": 3})
    with pytest.raises(SpecError, match="cannot be mirrored"):
        WorkerSpec(name="w", target="a:b", channels=["main"])
    assert threading.active_count() >= 1  # nothing started
    assert sys.modules.get("multibus.supervisor") is not None


class FakeHub:
    """A :class:`multibus.supervisor.HubBridge` that records what the supervisor asks of it."""

    def __init__(self, bus, **kw) -> None:
        self.kw = kw
        self.endpoints = SimpleNamespace(to_string=lambda: "ipc:///nowhere")
        self.commands: list[tuple[str, list[str] | None]] = []
        self.forgotten: list[str] = []
        self.expected: dict[str, str] = {}

    def subscribe(self) -> FakeHub:
        return self

    def command(self, action, peers=None, wait=None):
        self.commands.append((action, None if peers is None else list(peers)))
        return None

    def peers(self):
        return {}

    def forget(self, name):
        self.forgotten.append(name)

    def expect(self, name, secret):
        self.expected[name] = secret

    def share_with(self, uid, gid):
        raise AssertionError("no worker runs as another user here")

    def stats(self):
        return {}


@pytest.mark.timeout(30)
def test_bridge_factory_builds_the_hub_and_scale_of_a_stopped_fleet_spawns_nothing():
    bus = Bus()
    hubs: list[FakeHub] = []

    def factory(bus, **kw) -> HubBridge:
        hubs.append(FakeHub(bus, **kw))
        return hubs[-1]

    spec = WorkerSpec(name="w", target="a.b:c", count=1, channels=["jobs"])
    sup = Supervisor(bus, [spec], name=f"t{uuid.uuid4().hex[:8]}", pidfile=False,
                     subreaper=False, bridge_factory=factory)
    sup.subscribe()
    try:
        (hub,) = hubs
        assert hub.kw["role"] == "hub" and hub.kw["channels"] == ["jobs"]
        sup.scale("w", 3)
        assert [(r["name"], r["state"], r["pid"]) for r in sup.table()] == [
            ("w.0", "EXITED", None), ("w.1", "EXITED", None), ("w.2", "EXITED", None)]
        sup.scale("w", 1)
        assert [r["name"] for r in sup.table()] == ["w.0"]
        assert hub.forgotten == ["w.1", "w.2"]
    finally:
        bus.exit()
    assert hub.commands == [("exit", None)]
    assert sup.exit_code == 0


@pytest.mark.timeout(60)
def test_kill_all_sigkills_every_live_worker_and_records_it(fleet):
    bus, sup = fleet(count=2)
    bus.start()
    children = [w.child for w in sup.workers.values()]
    sup.kill_all()
    assert all(c.exited.wait(5) for c in children)
    assert [c.returncode for c in children] == [-signal.SIGKILL] * 2
    assert sup.killed == {"w.0", "w.1"}
    bus.exit()
    assert sup.exit_code == 1


def test_worker_launch_contract_args_parse_back_and_env_is_built_once(monkeypatch):
    from multibus import config
    from multibus.worker import _parse, worker_args, worker_env

    args = worker_args("w.3", "a.b:c", parent_pid=42, endpoints="ipc:///x", stop_timeout=2,
                       heartbeat=None, peer_timeout=20.0, channels=["jobs", "news"])
    assert _parse(args) == {"parent_pid": 42, "name": "w.3", "target": "a.b:c",
                            "stop_timeout": 2.0, "endpoints": "ipc:///x", "heartbeat": None,
                            "peer_timeout": 20.0, "channels": ["jobs", "news"]}
    assert config.worker_env is worker_env  # one definition, for spawning and for checks
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = worker_env(WorkerSpec(name="w", target="a.b:c", env={"PORT": "80"}))
    assert env["PORT"] == "80" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == ["/elsewhere", str(HERE.parent)]


@pytest.mark.timeout(60)
def test_scaling_down_is_not_a_loss(fleet):
    """Workers that exit because they were scaled away are not 'lost': no warning, no
    SIGTERM, exit code 0 (SIGTTOU and `multibus scale` both come here)."""
    bus, sup = fleet(count=4)
    records: list[tuple[str, int]] = []
    bus.subscribe("log", lambda msg, level=20: records.append((msg, level)))
    bus.start()
    gone = [w.child for w in list(sup.workers.values())[1:]]
    sup.scale("w", 1)
    assert all(c.exited.wait(5) for c in gone)
    assert [c.returncode for c in gone] == [0, 0, 0]
    assert all(c.signalled == "" for c in gone)
    assert not [m for m, lvl in records if lvl >= 30 or "lost contact" in m], records
    bus.exit()
    assert sup.exit_code == 0 and sup.kills == []
