"""Recycling (issue 16, item 5): a worker past its group's max_memory or max_age is gracefully
replaced (new pid, counted per group in status --json, logged), not counted as a crash, and
never while the fleet is stopping.

Black-box through `multibus run` (tests/test_cli.py's harness) for the replacements; the
"not while stopping" rule with the Recycler's clock in hand (no waiting for time to pass)."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_cli import ROOT, all_started, output, running, unique, wait_for

from multibus.fleet import Fleet, WorkerState
from multibus.recycle import Recycler, replace
from multibus.specs import SpecError, WorkerSpec


def fleet_file(tmp_path: Path, name: str, group: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(f'[supervisor]\nname = "{name}"\npythonpath = ["{ROOT / "tests"}"]\n\n'
                    f"[groups.w]\n{group}\n")
    return path


def replaced(name: str, reason: str) -> dict | None:
    """The status once group w counts a replacement for ``reason`` and runs a STARTED
    worker again."""
    st = all_started(name, 1)
    if st and st["groups"][0]["replaced"][reason] >= 1:
        return st
    return None


@pytest.mark.timeout(90)
def test_a_worker_past_max_memory_is_replaced(tmp_path):
    name = unique("rm")
    path = fleet_file(tmp_path, name, 'target = "targets.chatty:hog"\nmax_memory = "100MB"\n'
                      f'env = {{ MB_HOG_MB = "150", MB_HOG_MARK = "{tmp_path / "mark"}" }}')
    with running(str(path)) as (proc, log):
        st = wait_for(lambda: replaced(name, "max_memory"), 30, "a replacement")
        text = wait_for(lambda: (t := output(log)) and "replaced (max_memory)" in t and t, 10,
                        "the replacement logged")
    old, new = map(int, re.search(r"w\.0 replaced \(max_memory\): pid (\d+) -> (\d+)",
                                  text).groups())
    w, g = st["workers"][0], st["groups"][0]
    assert w["pid"] == new != old and w["restarts"] == 0  # not a crash
    assert w["memory_rss"] < 100_000_000  # the replacement does not hog
    assert (g["max_memory"], g["max_age"], g["max_age_jitter"]) == (100_000_000, None, 0.0)
    assert g["replaced"] == {"max_memory": 1, "max_age": 0}
    assert f"worker w.0 (pid {old}): RSS " in text and "is past its max_memory 100.0 MB" in text
    assert "lost contact" not in text and "restarting" not in text


@pytest.mark.timeout(90)
def test_max_age_replaces_each_worker_after_that_long(tmp_path):
    name = unique("ra")
    path = fleet_file(tmp_path, name, 'target = "targets.jobs:job"\nmax_age = 1\n'
                      "max_age_jitter = 0")
    with running(str(path)) as (proc, log):
        first = wait_for(lambda: all_started(name, 1), 30, "the worker STARTED")
        old = first["workers"][0]["pid"]
        st = wait_for(lambda: (s := replaced(name, "max_age")) and s["workers"][0]["pid"] != old
                      and s, 30, "a replacement after max_age")
        assert st["groups"][0]["max_age"] == 1.0 and st["workers"][0]["restarts"] == 0
        text = wait_for(lambda: (t := output(log)) and "replaced (max_age)" in t and t, 10,
                        "the replacement logged")
    assert f"worker w.0 (pid {old}): " in text and "past its max_age 1s" in text
    assert "lost contact" not in text


@pytest.mark.timeout(90)
def test_a_worker_on_shared_sockets_is_replaced_surge_first(tmp_path):
    """With shared sockets the replacement is STARTED before the old worker is asked to
    stop (a rolling reload's step): the group never runs short."""
    name = unique("rs")
    path = tmp_path / "fleet.toml"
    path.write_text(f'[supervisor]\nname = "{name}"\npythonpath = ["{ROOT / "tests"}"]\n\n'
                    '[sockets.s]\naddress = "127.0.0.1:0"\n\n'
                    '[groups.w]\ntarget = "targets.jobs:job"\nsockets = ["s"]\n'
                    'max_age = 1\nmax_age_jitter = 0\n')
    with running(str(path)) as (proc, log):
        first = wait_for(lambda: all_started(name, 1), 30, "the worker STARTED")
        old = first["workers"][0]["pid"]
        text = wait_for(lambda: (t := output(log)) and "replaced (max_age)" in t and t, 30,
                        "a replacement after max_age, logged")
    m = re.search(r"w\.0 replaced \(max_age\): pid (\d+) -> (\d+) \((w\.\d+)\)", text)
    assert m and int(m[1]) == old != int(m[2]) and m[3] != "w.0", text
    started = text.index(f"{m[3]} STARTED")  # the reload step's line: new one up ...
    assert started < text.index("replaced (max_age)")  # ... before the old one was let go
    assert "lost contact" not in text


def test_recycling_keys_are_checked():
    with pytest.raises(SpecError, match="max_age_jitter needs max_age"):
        WorkerSpec(name="w", target="m:f", max_age_jitter=5)
    with pytest.raises(SpecError, match="max_memory 'lots' is not a size"):
        WorkerSpec(name="w", target="m:f", max_memory="lots")
    assert WorkerSpec(name="w", target="m:f", max_memory="1.5GiB").max_memory == 1610612736


# -- the Recycler with its clock in hand --------------------------------------------------------

class FakeChild:
    returncode = None


def fake_supervisor(spec: WorkerSpec, running: bool = True) -> SimpleNamespace:
    """Enough of a Supervisor for the Recycler and replace(): one STARTED worker w.0 (pid 4242,
    spawned at t=100), a bridge that records commands, a log."""
    fleet = Fleet([spec])
    w = fleet["w.0"]
    w.child, w.pid, w.since, w.state = FakeChild(), 4242, 100.0, WorkerState.STARTED
    sent: list = []
    sup = SimpleNamespace(
        specs={spec.name: spec}, fleet=fleet, logs=[], sent=sent,
        keeper=SimpleNamespace(cond=threading.RLock(), running=running),
        bridge=SimpleNamespace(command=lambda *a, **kw: sent.append((a, kw))))
    sup.log = lambda msg, level=20: sup.logs.append(msg)
    return sup


def test_max_age_is_due_at_spawn_plus_max_age_plus_its_own_jitter_and_not_while_stopped():
    spec = WorkerSpec(name="w", target="m:f", max_age=60, max_age_jitter=30)
    sup = fake_supervisor(spec, running=False)
    draws: list[tuple[float, float]] = []
    rec = Recycler(sup, jitter=lambda a, b: draws.append((a, b)) or 12.5, clock=lambda: 0.0,
                   interval=1000)
    asked: list[tuple] = []
    rec.request = lambda *a: asked.append(a)
    assert rec.needed
    # stopped (or stopping, or exiting): past its age, it is left alone
    rec.check(500.0)
    assert asked == [] and sup.logs == []
    sup.keeper.running = True
    assert rec.check(150.0) == 100.0 + 60 + 12.5  # the next pass: at its deadline
    assert draws == [(0.0, 30)] and asked == []
    rec.check(172.5)
    assert asked == [("w.0", 4242, "max_age")]
    rec.check(173.0)  # asked again while not done (a queued op coalesces), said once
    assert len(asked) == 2 and len(sup.logs) == 1 and draws == [(0.0, 30)]
    assert "worker w.0 (pid 4242): 72.5s old, past its max_age 60s" in sup.logs[0]


def test_replace_does_nothing_unless_the_fleet_runs():
    sup = fake_supervisor(WorkerSpec(name="w", target="m:f", max_age=1), running=False)
    sup.recycler = Recycler(sup)
    assert replace(sup, "w.0", 4242, "max_age") == ("w.0 not replaced: the fleet is not "
                                                     "running")
    assert sup.sent == [] and sup.recycler.replaced["w"] == {"max_memory": 0, "max_age": 0}
    sup.keeper.running = True
    assert replace(sup, "w.0", 999, "max_age") == "w.0 not replaced: no such process any more"
    assert sup.sent == []
