"""Ordering through the CLI (issue 16, item 3): ``after`` on run, start and a whole-fleet
restart; stop and exit in reverse order; bad ``after`` is a config error."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import mb, running, status, unique, wait_for
from test_cli_groups import fleet_file, group_of, started

ORDERED = """
[groups.jobs]
target = "targets.ordered:stamped"
after = ["web"]
env = {{ MB_STAMPS = "{stamps}" }}

[groups.web]
target = "targets.ordered:stamped"
count = 2
after = ["db"]
env = {{ MB_STAMPS = "{stamps}" }}

[groups.db]
target = "targets.ordered:stamped"
env = {{ MB_STAMPS = "{stamps}" }}
"""


def events(stamps: Path) -> list[tuple[str, str]]:
    """(group, what) in the order they happened."""
    out = []
    for line in stamps.read_text().splitlines():
        worker, what = line.split()
        out.append((worker.partition(".")[0], what))
    return out


def in_order(evs: list[tuple[str, str]], first: tuple[str, str],
             then: tuple[str, str]) -> bool:
    """Every ``first`` event comes before every ``then`` event."""
    a = [i for i, e in enumerate(evs) if e == first]
    b = [i for i, e in enumerate(evs) if e == then]
    return bool(a) and bool(b) and max(a) < min(b)


@pytest.mark.timeout(120)
def test_groups_start_after_and_stop_before_what_they_need(tmp_path):
    name = unique("ta")
    stamps = tmp_path / "stamps"
    path = fleet_file(tmp_path, name, ORDERED.format(stamps=stamps))
    with running(path) as (proc, log):
        st = wait_for(lambda: started(name, "db", "web", "jobs"), 30, "every group STARTED")
        assert [g["after"] for g in st["groups"]] == [["web"], ["db"], []]
        evs = events(stamps)
        assert in_order(evs, ("db", "start"), ("web", "spawn"))
        assert in_order(evs, ("web", "start"), ("jobs", "spawn"))

        # a whole-fleet restart (same processes): stop jobs, web, db; start db, web, jobs
        stamps.write_text("")
        r = mb("restart", "--name", name)
        assert r.returncode == 0, r.stderr
        evs = events(stamps)
        assert in_order(evs, ("jobs", "stop"), ("web", "stop"))
        assert in_order(evs, ("web", "stop"), ("db", "stop"))
        assert in_order(evs, ("db", "stop"), ("db", "start"))
        assert in_order(evs, ("db", "start"), ("web", "start"))
        assert in_order(evs, ("web", "start"), ("jobs", "start"))

        # a group whose 'after' group is stopped is refused; started together, in order
        assert mb("stop", "db", "web", "--name", name).returncode == 0
        r = mb("start", "web", "--name", name)
        assert r.returncode == 1
        assert r.stderr == (f"multibus: {name}: start web failed: cannot start web: it runs "
                            "after db, which is STOPPED; start db first (multibus start db "
                            "web)\n")
        stamps.write_text("")
        r = mb("start", "web", "db", "--name", name)
        assert r.returncode == 0, r.stderr
        assert in_order(events(stamps), ("db", "start"), ("web", "start"))
        assert group_of(status(name), "web")["state"] == "STARTED"

        # exit: stop in reverse order
        stamps.write_text("")
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(20) == 0
        evs = events(stamps)
        assert in_order(evs, ("jobs", "stop"), ("web", "stop"))
        assert in_order(evs, ("web", "stop"), ("db", "stop"))


@pytest.mark.timeout(60)
def test_run_with_start_of_a_stopped_fleet_keeps_the_order(tmp_path):
    """`stop` (every group), then `start web db`: the fleet starts with only those, db first."""
    name = unique("tb")
    stamps = tmp_path / "stamps"
    with running(fleet_file(tmp_path, name, ORDERED.format(stamps=stamps))) as (proc, log):
        wait_for(lambda: started(name, "db", "web", "jobs"), 30, "every group STARTED")
        assert mb("stop", "--name", name).returncode == 0
        stamps.write_text("")
        r = mb("start", "db", "web", "--name", name)
        assert r.returncode == 0, r.stderr
        st = status(name)
        assert [g["state"] for g in st["groups"]] == ["STOPPED", "STARTED", "STARTED"]
        assert in_order(events(stamps), ("db", "start"), ("web", "start"))
        assert ("jobs", "start") not in events(stamps)


@pytest.mark.parametrize(("after", "message"), [
    ('["nope"]', "groups.web.after: no group 'nope'; groups: web, db"),
    ('["web"]', "groups.web.after: a cycle: web -> web (a group cannot run after itself); "
                "remove one of these"),
    ('"db"', 'groups.web.after: expected an array of non-empty strings, got \'db\' (string)'),
])
def test_bad_after_is_a_config_error(tmp_path, after, message):
    path = tmp_path / "f.toml"
    path.write_text(f'[groups.web]\ntarget = "m:f"\nafter = {after}\n\n'
                    '[groups.db]\ntarget = "m:f"\n')
    r = mb("run", str(path), "--name", unique("tc"))
    assert r.returncode == 2
    assert r.stderr == f"multibus: {path}: {message}\n"


def test_a_cycle_through_two_groups_is_a_config_error(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('[groups.web]\ntarget = "m:f"\nafter = ["db"]\n\n'
                    '[groups.db]\ntarget = "m:f"\nafter = ["web"]\n')
    r = mb("run", str(path), "--name", unique("tc"))
    assert r.returncode == 2
    assert r.stderr == (f"multibus: {path}: groups.db.after: a cycle: web -> db -> web (a "
                        "group cannot run after itself); remove one of these\n")
