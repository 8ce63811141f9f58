"""`multibus apply [FILE]` through the CLI (issue 16, item 7): change only what differs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_cli import EXAMPLES, ROOT, mb, running, status, unique, wait_for
from test_cli_groups import fleet_file, started, workers_of

from multibus.reconcile import plan
from multibus.specs import WorkerSpec

BEFORE = """
[groups.web]
target = "targets.jobs:job"
count = 2

[groups.db]
target = "targets.jobs:job"

[groups.old]
target = "targets.jobs:job"
"""

AFTER = """
[groups.web]
target = "targets.jobs:job"
count = 3

[groups.db]
target = "targets.jobs:job"
env = { DB_URL = "sqlite://" }

[groups.cache]
target = "targets.jobs:job"
after = ["db"]
"""


def pids(st: dict, group: str) -> dict[str, int]:
    return {n: w["pid"] for n, w in workers_of(st, group).items()}


@pytest.mark.timeout(120)
def test_apply_changes_only_what_differs(tmp_path):
    name = unique("tp")
    path = Path(fleet_file(tmp_path, name, BEFORE))
    with running(str(path)) as (proc, log):
        st = wait_for(lambda: started(name, "web", "db", "old"), 30, "STARTED")
        web, db = pids(st, "web"), pids(st, "db")
        assert st["config"] == str(path)

        path.write_text(path.read_text().replace(BEFORE, AFTER))
        r = mb("apply", "--name", name)  # the file `run` was given
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"{name}: apply {path} done in ")
        assert r.stdout.rstrip().endswith("(added cache; removed old; restarted db; web: 2 -> "
                                          "3 workers)")
        st = started(name, "web", "db", "cache")
        assert st, status(name)
        assert [g["name"] for g in st["groups"]] == ["web", "db", "cache"]
        assert not workers_of(st, "old")
        now = pids(st, "web")
        assert {k: now[k] for k in web} == web and now["web.2"]  # scaled, not restarted
        assert pids(st, "db")["db.0"] != db["db.0"]  # its spec changed: a new process
        assert pids(st, "cache")["cache.0"]

        r = mb("apply", "--name", name)
        assert r.returncode == 0 and "(no change)" in r.stdout

        # a bad file changes nothing: exit 2, one line
        good = path.read_text()
        path.write_text(good.replace('after = ["db"]', 'after = ["nope"]'))
        r = mb("apply", "--name", name)
        assert r.returncode == 2
        assert r.stderr == (f"multibus: {path}: groups.cache.after: no group 'nope'; groups: "
                            "web, db, cache\n")
        other = tmp_path / "other.toml"
        other.write_text(good.replace("targets.jobs:job", "targets.nosuch:job", 1))
        r = mb("apply", str(other), "--name", name)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"multibus: {other}: groups.web.target: ") and \
            r.stderr.count("\n") == 1, r.stderr
        assert pids(status(name), "web") == now

        # another file, named
        other.write_text(good.replace("count = 3", "count = 1"))
        r = mb("apply", str(other), "--name", name)
        assert r.returncode == 0 and "(web: 3 -> 1 worker)" in r.stdout, r.stderr
        assert list(pids(status(name), "web")) == ["web.0"]
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(20) == 0


@pytest.mark.timeout(60)
def test_apply_needs_a_file_when_run_was_given_a_target():
    name = unique("tq")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(EXAMPLES), str(ROOT)]))
    with running("jobs:worker", "--name", name, env=env) as (proc, log):
        wait_for(lambda: started(name, "jobs"), 30, "STARTED")
        r = mb("apply", "--name", name)
        assert r.returncode == 2
        assert r.stderr == (f"multibus: apply: supervisor {name!r} was not run from a fleet "
                            "file; name one: multibus apply FILE\n")


def test_plan():
    a, b = WorkerSpec("a", "m:f", count=2), WorkerSpec("b", "m:f")
    p = plan({"a": a, "b": b}, {"a": 5, "b": 1}, [a, WorkerSpec("c", "m:f")])
    assert p.describe() == "added c; removed b; a: 5 -> 2 workers"  # the file says 2
    assert not plan({"a": a}, {"a": 2}, [a])
    assert plan({"a": a}, {"a": 2}, [WorkerSpec("a", "m:g", count=2)]).describe() == \
        "restarted a"
