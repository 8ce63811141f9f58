"""Several hosts on the parent's control socket, in-process (issue 19): `multibus logs HOST`,
`logs HOST:GROUP` and `logs HOST:GROUP.N` show only that host's lines, and an unknown host
fails with one line, exit 1. The hosts are a Downstream whose records are set by hand, and
their log records come as the hub's dispatch thread publishes them (``Bus.log_lines(host,
["job.0 | text"])``)."""

from __future__ import annotations

import pytest
from test_cli_control import served  # noqa: F401 - the fixture

from multibus.actions import ControlError
from multibus.cli import main
from multibus.downstream import Downstream, Host


def host_doc(workers: int) -> dict:
    return {"state": "STARTED", "pid": 1, "uptime": 1.0,
            "groups": [{"name": "job", "count": workers, "state": "STARTED"}],
            "workers": [{"name": f"job.{i}", "group": "job", "pid": 1, "state": "STARTED",
                         "restarts": 0, "uptime": 1.0, "cpu_percent": None,
                         "memory_rss": None} for i in range(workers)]}


@pytest.fixture
def parent(served):  # noqa: F811 - the fixture imported above
    """The served control socket of a parent that two hosts joined (host-c is LOST now)."""
    bus, sup, control, client = served
    hosts = Downstream(bus, cfg=None, name=client.name)  # never subscribed: no bridge
    hosts.hosts["host-b"] = Host("host-b", doc=host_doc(2), connected=True)
    hosts.hosts["host-c"] = Host("host-c", doc=host_doc(1), connected=False, lost="timeout")
    control.hosts = hosts
    bus.log("job.0 | local zero")
    bus.log_lines("host-b", ["job.0 | b zero", "job.1 | b one", "upstream: b itself"])
    bus.log_lines("host-c", ["job.0 | c zero"])
    return bus, client


def lines(capsys, *argv: str, name: str) -> list[str]:
    assert main(["logs", *argv, "--name", name]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert err == ""
    return [ln.split(" | ", 1)[1] for ln in out.splitlines()]


def test_logs_of_a_host_its_group_or_its_worker(parent, capsys):
    bus, client = parent
    name = client.name
    assert {"local zero", "job.0 | b zero", "job.0 | c zero"} <= set(lines(capsys, name=name))
    assert lines(capsys, "host-b", name=name) == [
        "job.0 | b zero", "job.1 | b one", "upstream: b itself"]
    assert lines(capsys, "host-b:job", name=name) == ["job.0 | b zero", "job.1 | b one"]
    assert lines(capsys, "host-b:job.1", name=name) == ["job.1 | b one"]
    assert lines(capsys, "host-b:supervisor", name=name) == ["upstream: b itself"]
    assert lines(capsys, "host-c", name=name) == ["job.0 | c zero"]  # LOST: its lines stay
    assert lines(capsys, "job", name=name) == ["local zero"]  # a local group: not the hosts'


def test_following_a_host_worker_gets_only_its_new_lines(parent):
    bus, client = parent
    followed = client.follow("host-b:job.1", backlog=10)
    assert next(followed)[3:] == ("host-b", "job.1 | b one")
    bus.log_lines("host-c", ["job.1 | c one"])
    bus.log_lines("host-b", ["job.0 | b zero again", "job.1 | b one again"])
    assert next(followed)[3:] == ("host-b", "job.1 | b one again")


def test_logs_of_an_unknown_host_fail_with_one_line(parent, capsys):
    bus, client = parent
    for target, said in (
        ("nosuch:job", "no host 'nosuch'; hosts: host-b, host-c"),
        ("nosuch", "no group 'nosuch'; groups: job; hosts: host-b, host-c"),
        ("host-b:nope", "host host-b: no group 'nope'; groups: job"),
        ("host-b:job.7", "host host-b: no worker 'job.7'; workers of job: job.0, job.1"),
    ):
        for follow in ((), ("-f",)):
            assert main(["logs", target, *follow, "--name", client.name]) == 1, target
            out, err = capsys.readouterr()
            assert out == "" and err == f"multibus: {said}\n", (target, err)


def test_a_host_target_on_a_supervisor_without_hosts(served, capsys):  # noqa: F811
    bus, sup, control, client = served
    assert main(["logs", "host-b:job", "--name", client.name]) == 1
    err = capsys.readouterr().err
    assert err == (f"multibus: no host 'host-b': supervisor {client.name!r} takes no hosts "
                   "(no [downstream] table)\n")


def test_exit_host_is_for_a_parent_of_hosts(served, capsys):  # noqa: F811
    bus, sup, control, client = served
    assert main(["exit", "host-b", "--name", client.name]) == 2  # a usage error here
    assert "takes no hosts (no [downstream] table)" in capsys.readouterr().err
    with pytest.raises(ControlError, match="takes no hosts"):
        client.request("op", action="exit", hosts=["host-b"])
    with pytest.raises(ControlError, match="stop takes TARGETs"):
        client.request("op", action="stop", hosts=["host-b"])
    assert bus.state.name == "STARTED"  # nothing was queued
