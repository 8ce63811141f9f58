"""The pure parts of issue 16: 'after' order and cycles, per-group intensity, group states."""

from __future__ import annotations

import pytest

from multibus.fleet import Group, WorkerState
from multibus.order import OrderError, check, waves
from multibus.restart import GiveUp, RestartPolicy
from multibus.specs import Intensity, SpecError, WorkerSpec, coerce_specs


def test_waves_follow_after_and_keep_file_order_within_a_wave():
    after = {"web": ("db", "cache"), "db": (), "cache": (), "jobs": ("web",), "cron": ()}
    check(after)
    assert waves(after) == [["db", "cache", "cron"], ["web"], ["jobs"]]
    assert waves({"a": (), "b": ()}) == [["a", "b"]]  # no 'after': one wave, all at once
    # a subset keeps the order its members have through groups left out
    assert waves(after, ["jobs", "db"]) == [["db"], ["jobs"]]
    assert list(reversed(waves(after))) == [["jobs"], ["web"], ["db", "cache", "cron"]]


@pytest.mark.parametrize(("after", "message"), [
    ({"a": ("b",)}, "groups.a.after: no group 'b'; groups: a"),
    ({"a": ("a",)}, "groups.a.after: a cycle: a -> a"),
    ({"a": ("b",), "b": ("c",), "c": ("a",)}, "a cycle: a -> b -> c -> a"),
])
def test_unknown_names_and_cycles_are_refused_naming_them(after, message):
    with pytest.raises(OrderError, match=message):
        check(after)


def test_specs_check_after_too():
    with pytest.raises(SpecError, match="a cycle"):
        coerce_specs([WorkerSpec("a", "m:f", after=["b"]), WorkerSpec("b", "m:f", after=["a"])])
    with pytest.raises(SpecError, match="on_fatal 'x' must be one of stop-group, stop-fleet"):
        WorkerSpec("a", "m:f", on_fatal="x")
    spec = WorkerSpec("a", "m:f", max_restarts=2)
    assert spec.intensity(Intensity(5, 30.0)) == Intensity(2, 30.0)


def test_intensity_is_counted_per_group():
    now = [0.0]
    policy = RestartPolicy(Intensity(2, 10.0), (0.0, 0.0), clock=lambda: now[0])
    for _ in range(2):
        assert not isinstance(policy.decide("a.0", 0.1, "a"), GiveUp)
        assert not isinstance(policy.decide("b.0", 0.1, "b"), GiveUp)
    # group a is at its limit; group b's restarts did not count against it
    assert isinstance(policy.decide("a.0", 0.1, "a"), GiveUp)
    assert isinstance(policy.decide("b.0", 0.1, "b"), GiveUp)
    policy.reset("a")  # `multibus start a`
    assert not isinstance(policy.decide("a.0", 0.1, "a"), GiveUp)
    assert isinstance(policy.decide("b.0", 0.1, "b"), GiveUp)
    # a group's own intensity
    assert not isinstance(policy.decide("c.0", 0.1, "c", Intensity(5, 10.0)), GiveUp)


def test_group_state():
    g = Group(WorkerSpec("job", "m:f", count=2))
    assert g.state() == "STOPPED"  # EXITED: no process yet
    for w in g.wanted():
        w.state = WorkerState.STARTED
    assert g.state() == "STARTED"
    g.slots[1].state = WorkerState.SPAWNING
    assert g.state() == "STARTING"
    g.held = True
    assert g.state() == "STOPPING" and g.down
    for w in g.wanted():
        w.state = WorkerState.STOPPED
    assert g.state() == "STOPPED"
    g.held, g.fatal = False, "restart intensity reached"
    assert g.state() == "FATAL" and g.down
