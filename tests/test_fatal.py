"""Failure isolation through the CLI (issue 16, item 2): a crash-looping group goes FATAL
alone; `start GROUP` clears it; on_fatal = "stop-fleet" stops everything; `run` exits 1."""

from __future__ import annotations

import pytest
from test_cli import mb, output, running, status, unique, wait_for
from test_cli_groups import fleet_file, group_of, started, workers_of


def body(on_fatal: str = "stop-group") -> str:
    return f"""
[groups.web]
target = "targets.jobs:job"
count = 2

[groups.crash]
target = "targets.jobs:dies_soon"
max_restarts = 2
restart_period = 60
on_fatal = "{on_fatal}"
"""


def fatal(name: str) -> dict | None:
    st = status(name)
    return st if st and group_of(st, "crash")["state"] == "FATAL" else None


@pytest.mark.timeout(120)
def test_a_crash_looping_group_goes_fatal_and_the_others_keep_running(tmp_path):
    name = unique("tf")
    with running(fleet_file(tmp_path, name, body())) as (proc, log):
        st = wait_for(lambda: started(name, "web"), 30, "web STARTED")
        web = {w["pid"] for w in workers_of(st, "web").values()}
        st = wait_for(lambda: fatal(name), 30, "crash FATAL")
        crash = group_of(st, "crash")
        assert crash["error"].startswith("restart intensity reached: 3 restarts within 60s "
                                         "(max 2); last: worker crash.0 exit code 1")
        assert workers_of(st, "crash")["crash.0"]["pid"] is None  # stopped, stays down
        assert st["state"] == "STARTED" and group_of(st, "web")["state"] == "STARTED"
        assert {w["pid"] for w in workers_of(st, "web").values()} == web
        table = mb("status", "--name", name).stdout
        assert "group crash: FATAL: restart intensity reached" in table

        # `start crash` clears FATAL and its restart count: it runs (and crash-loops) again
        r = mb("start", "crash", "--name", name)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: output(log).count("group crash is FATAL") == 2, 30, "FATAL again")
        st = status(name)
        assert {w["pid"] for w in workers_of(st, "web").values()} == web
        assert proc.poll() is None  # the supervisor stays

        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(20) == 1  # a group ended FATAL


@pytest.mark.timeout(90)
def test_on_fatal_stop_fleet_keeps_the_old_behaviour(tmp_path):
    name = unique("ts")
    with running(fleet_file(tmp_path, name, body("stop-fleet"))) as (proc, log):
        assert proc.wait(60) == 1
        text = output(log)
        assert "restart intensity reached: 3 restarts within 60s (max 2)" in text
        assert "group crash is FATAL" not in text
        assert "worker web.0" in text  # stopped with the fleet


@pytest.mark.timeout(90)
def test_a_group_start_that_reaches_its_limit_fails(tmp_path):
    """`start GROUP` of a group that cannot start: the op fails with the FATAL error."""
    name = unique("tg")
    text = body().replace("targets.jobs:dies_soon", "targets.jobs:job") + """
[groups.bad]
target = "targets.jobs:failing"
count = 0
max_restarts = 1
"""
    with running(fleet_file(tmp_path, name, text)) as (proc, log):
        wait_for(lambda: started(name, "web", "crash"), 30, "STARTED")
        r = mb("scale", "bad", "1", "--name", name)
        assert r.returncode == 1 and "group bad is FATAL" in r.stderr
        st = status(name)
        assert group_of(st, "bad")["state"] == "FATAL"
        assert "database unreachable" in group_of(st, "bad")["error"]
        assert group_of(st, "web")["state"] == "STARTED"
        r = mb("start", "bad", "--name", name)
        assert r.returncode == 1
        assert r.stderr.startswith(f"multibus: {name}: start bad failed: group bad is FATAL: "
                                   "restart intensity reached")
