"""One group or one worker at a time, through the CLI (issue 16, item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
from test_cli import mb, running, status, unique, wait_for

from multibus.opqueue import OpQueue

TESTS = Path(__file__).resolve().parent


def fleet_file(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[supervisor]\nname = "{name}"\npythonpath = ["{TESTS}"]\n' + body)
    return str(path)


def group_of(st: dict, name: str) -> dict:
    return next(g for g in st["groups"] if g["name"] == name)


def workers_of(st: dict, group: str) -> dict[str, dict]:
    return {w["name"]: w for w in st["workers"] if w["group"] == group}


def started(name: str, *groups: str) -> dict | None:
    st = status(name)
    if st and all(group_of(st, g)["state"] == "STARTED" for g in groups):
        return st
    return None


TWO_GROUPS = """
[groups.job]
target = "targets.jobs:job"
count = 2

[groups.web]
target = "targets.jobs:job"
count = 2
"""


@pytest.mark.timeout(120)
def test_stop_and_start_one_group_and_one_worker(tmp_path):
    name = unique("tg")
    with running(fleet_file(tmp_path, name, TWO_GROUPS)) as (proc, log):
        st = wait_for(lambda: started(name, "job", "web"), 30, "both groups STARTED")
        web_pids = {w["pid"] for w in workers_of(st, "web").values()}

        r = mb("stop", "job", "--name", name)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"{name}: stop job done in ")
        st = status(name)
        assert st["state"] == "STARTED"  # the supervisor's bus: the other group runs on
        assert group_of(st, "job")["state"] == "STOPPED"
        assert [w["state"] for w in workers_of(st, "job").values()] == ["STOPPED", "STOPPED"]
        assert all(w["pid"] for w in workers_of(st, "job").values())  # processes stay
        assert group_of(st, "web")["state"] == "STARTED"
        assert {w["pid"] for w in workers_of(st, "web").values()} == web_pids

        # a stopped group stays stopped: a worker of it that dies is not restarted, and
        # starting another group does not start it
        job0 = workers_of(st, "job")["job.0"]["pid"]
        psutil.Process(job0).kill()
        wait_for(lambda: workers_of(status(name), "job")["job.0"]["pid"] is None, 10,
                 "job.0 gone")
        assert mb("start", "web", "--name", name).returncode == 0
        st = status(name)
        assert workers_of(st, "job")["job.0"]["state"] == "EXITED"
        assert group_of(st, "job")["state"] == "STOPPED"

        table = mb("status", "--name", name).stdout
        assert "group job: STOPPED" in table

        r = mb("start", "job", "--name", name)
        assert r.returncode == 0, r.stderr
        st = status(name)
        assert group_of(st, "job")["state"] == "STARTED"
        assert all(w["state"] == "STARTED" and w["pid"] for w in workers_of(st, "job").values())

        # one worker: its bus stops, its process stays, the rest of its group runs on
        r = mb("stop", "web.1", "--name", name)
        assert r.returncode == 0, r.stderr
        web = workers_of(status(name), "web")
        assert (web["web.0"]["state"], web["web.1"]["state"]) == ("STARTED", "STOPPED")
        assert web["web.1"]["pid"] in web_pids
        r = mb("restart", "web.1", "--name", name)
        assert r.returncode == 0, r.stderr
        web = workers_of(status(name), "web")
        assert web["web.1"]["state"] == "STARTED" and web["web.1"]["pid"] in web_pids

        # status TARGET...
        r = mb("status", "--json", "web.1", "job", "--name", name)
        assert r.returncode == 0, r.stderr
        only = json.loads(r.stdout)
        assert [w["name"] for w in only["workers"]] == ["job.0", "job.1", "web.1"]
        assert [g["name"] for g in only["groups"]] == ["job", "web"]

        # graceful one group
        r = mb("graceful", "web", "--name", name)
        assert r.returncode == 0, r.stderr

        # `start` with no target starts every group, those stopped by a command too
        assert mb("stop", "job", "web.0", "--name", name).returncode == 0
        r = mb("start", "--name", name)
        assert r.returncode == 0, r.stderr
        assert "started job, web.0" in r.stdout
        st = status(name)
        assert all(w["state"] == "STARTED" for w in st["workers"])
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(20) == 0


@pytest.mark.timeout(90)
def test_unknown_targets_fail_like_scale_and_signal_reaches_the_process_group(tmp_path):
    name = unique("tu")
    with running(fleet_file(tmp_path, name, TWO_GROUPS)) as (proc, log):
        st = wait_for(lambda: started(name, "job", "web"), 30, "both groups STARTED")
        for args in (["stop", "nosuch"], ["start", "nosuch"], ["restart", "job", "nosuch"],
                     ["graceful", "nosuch"], ["signal", "nosuch", "HUP"],
                     ["status", "nosuch"]):
            r = mb(*args, "--name", name)
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            assert r.stderr == "multibus: no group 'nosuch'; groups: job, web\n", args
        r = mb("stop", "job.5", "--name", name)
        assert r.returncode == 1
        assert r.stderr == "multibus: no worker 'job.5'; workers of job: job.0, job.1\n"
        r = mb("signal", "job", "NOSIG", "--name", name)
        assert r.returncode == 2 and "unknown signal 'NOSIG'" in r.stderr
        r = mb("exit", "job", "--name", name)
        assert r.returncode == 2  # exit takes no target: a usage error

        # SIGTERM to one worker's process group: it dies, and is restarted (permanent)
        pid = workers_of(st, "job")["job.1"]["pid"]
        r = mb("signal", "job.1", "TERM", "--name", name)
        assert r.returncode == 0, r.stderr
        assert "sent to job.1" in r.stdout
        st = wait_for(lambda: (st := started(name, "job"))
                      and workers_of(st, "job")["job.1"]["pid"] != pid and st, 20,
                      "job.1 restarted")
        w = workers_of(st, "job")["job.1"]
        assert w["pid"] != pid and w["restarts"] == 1
        assert workers_of(st, "job")["job.0"]["restarts"] == 0


STUCK = """
[groups.stuck]
target = "targets.jobs:stubborn"
stop_timeout = 1.0

[groups.web]
target = "targets.jobs:job"
"""


@pytest.mark.timeout(90)
def test_a_queued_group_op_shows_its_targets_and_kills_are_reported(tmp_path):
    name = unique("tq")
    with running(fleet_file(tmp_path, name, STUCK), "--name", name) as (proc, log):
        wait_for(lambda: started(name, "stuck", "web"), 30, "STARTED")
        r = mb("stop", "stuck", "--no-wait", "--name", name)
        assert r.returncode == 0 and "queued" in r.stdout
        queue = status(name)["queue"]
        entry = next(q for q in queue if q["action"] == "stop")
        assert entry["args"] == {"targets": ["stuck"]}
        # it does not stop within its stop_timeout, ignores SIGTERM: SIGKILL, and the op
        # fails naming it
        wait_for(lambda: "stop failed: 1 worker had to be killed" in Path(log).read_text(),
                 30, "the stop to fail")
        assert "stuck.0 (did not stop within 1s: SIGTERM, then SIGKILL)" in Path(log).read_text()
        st = status(name)
        assert workers_of(st, "stuck")["stuck.0"]["pid"] is None
        assert group_of(st, "stuck")["state"] == "STOPPED"  # not restarted: it was stopped
        assert group_of(st, "web")["state"] == "STARTED"
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(20) == 1  # a worker had to be killed


def test_ops_on_other_targets_do_not_coalesce():
    ran: list[tuple[str, dict]] = []
    q = OpQueue(lambda op: ran.append((op.action, op.args)), defer=lambda f, first: None,
                log=lambda *a: None)
    a = q.queue("stop", targets=["job"])
    assert q.queue("stop", targets=["job"]) is a
    assert q.queue("stop", targets=["web"]) is not a
    assert q.queue("stop") is not a
