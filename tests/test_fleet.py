"""The fleet model: groups resize, slots change state on the hub's reports, rows keep their form."""

from __future__ import annotations

import json
from types import SimpleNamespace

import msgpack

from multibus.bus import states
from multibus.child import Child
from multibus.fleet import Fleet, Group, WorkerState
from multibus.specs import WorkerSpec


def spec(name: str = "w", count: int = 2) -> WorkerSpec:
    return WorkerSpec(name=name, target="a.b:c", count=count)


def give_process(slot, pid: int) -> Child:
    slot.child = Child(name=slot.name, popen=SimpleNamespace(pid=pid))
    slot.pid = pid
    slot.since = slot.child.started
    slot.state = WorkerState.SPAWNING
    return slot.child


def test_fleet_maps_worker_names_to_slots_group_by_group():
    fleet = Fleet([spec("web", 2), spec("job", 1)])
    assert list(fleet) == ["web.0", "web.1", "job.0"]
    assert fleet["job.0"].spec.name == "job" and fleet["job.0"].wn.index == 0
    assert fleet.get("job.1") is None and fleet.get("nope") is None and "web.x" not in fleet
    assert len(fleet) == 3
    rows = fleet.rows(now=0.0)
    assert rows[0] == {"name": "web.0", "group": "web", "pid": None, "state": "EXITED",
                       "restarts": 0, "exit_code": None, "uptime": 0.0,
                       "launch": None}  # issue 18 added "launch"


def test_resize_removes_the_highest_and_refills_the_lowest_free_indices():
    g = Group(spec(count=4))
    live = g.slots[1]
    give_process(live, 111)
    removed, added = g.resize(1)
    assert [s.name for s in removed] == ["w.1", "w.2", "w.3"] and added == []
    assert sorted(g.slots) == [0, 1]  # w.1 stays until its process is gone
    assert not live.wanted and [s.name for s in g.wanted()] == ["w.0"]
    removed, added = g.resize(3)
    assert removed == [] and [s.name for s in added] == ["w.2", "w.3"]  # 1 is still taken
    live.child.returncode = 0
    g.discard(live)
    assert sorted(g.slots) == [0, 2, 3] and g.count == 3


def test_resize_cancels_a_removed_workers_restart():
    g = Group(spec(count=2))
    cancelled = []
    g.slots[1].pending = SimpleNamespace(cancel=lambda: cancelled.append(1))
    g.slots[1].state = WorkerState.BACKOFF
    g.resize(1)
    assert cancelled == [1] and 1 not in g.slots


def test_reports_apply_only_to_the_current_joined_process():
    fleet = Fleet([spec(count=1)])
    slot = fleet["w.0"]
    assert not fleet.peer_joined("w.0", 5)  # no process yet
    give_process(slot, 5)
    assert not fleet.peer_state("w.0", "STARTED")  # not joined: about an older process
    assert not fleet.peer_joined("w.0", 4)  # an older process's join
    assert fleet.peer_joined("w.0", 5) and slot.state is WorkerState.JOINED
    assert fleet.peer_state("w.0", states.STARTED) and slot.state is WorkerState.STARTED
    assert fleet.peer_state("w.0", "STOPPING") and slot.state == "STOPPING"
    assert not fleet.peer_state("w.0", "SPAWNING")  # not a bus state
    assert fleet.current("w.0", joined=True) is slot
    slot.child.returncode = 0
    assert fleet.current("w.0") is None and not fleet.peer_state("w.0", "STOPPED")


def test_states_keep_their_wire_form():
    fleet = Fleet([spec(count=1)])
    give_process(fleet["w.0"], 7)
    fleet.peer_joined("w.0", 7)
    row = fleet.rows(now=fleet["w.0"].since + 1.5)[0]
    assert type(row["state"]) is str and row["state"] == "JOINED"
    assert row["pid"] == 7 and row["uptime"] == 1.5
    assert json.loads(json.dumps(row))["state"] == "JOINED"
    assert msgpack.unpackb(msgpack.packb(row))["state"] == "JOINED"
    assert WorkerState.STARTED == "STARTED" and f"{WorkerState.BACKOFF}" == "BACKOFF"


def test_describe_names_the_state_the_last_exit_and_the_last_lines():
    fleet = Fleet([spec(count=1)])
    slot = fleet["w.0"]
    give_process(slot, 9).returncode = 2
    slot.state = WorkerState.EXITED
    slot.last_lines = ["", "Traceback", "ValueError: no port"]
    assert slot.describe() == "w.0 is EXITED (last exit code 2): Traceback / ValueError: no port"
