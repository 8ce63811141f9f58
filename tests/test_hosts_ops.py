"""Several hosts through the CLI, over tcp on loopback (no namespaces, no root): a
fleet-wide graceful is a lifecycle command that reaches a host that was away when it was
given, once it is back; `reload HOST:GROUP` and `signal HOST:GROUP.N SIGNAL` reach that
host's workers only; a child joins while its own fleet is still starting and then
converges to the parent's state."""

from __future__ import annotations

import os
import signal
from contextlib import ExitStack
from pathlib import Path

import pytest
from netns import multibus, supervisor
from test_cli import mb, wait_for
from test_hosts import fleet, fleet_state, hosts_in, status

from multibus.bus import Bus
from multibus.downstream import Downstream, Host


def lines_with(name: str, text: str) -> list[str]:
    """The log lines of supervisor ``name`` (a parent shows its hosts' too) with ``text``."""
    logs = mb("logs", "--name", name, "-n", "1000").stdout
    return [ln for ln in logs.splitlines() if text in ln]


def pids(name: str) -> dict[str, int]:
    st = status(name)
    assert st is not None, name
    return {w["name"]: w["pid"] for w in st["workers"]}


def children(tmp_path: Path, n: int, workers: int, policies: list[str] | None = None):
    """The parent (started) and ``n`` hosts joined to it over loopback, all STARTED."""
    name, parent, hosts, (port, *files) = fleet(tmp_path, n, workers, policies)
    return name, parent, hosts, files, f"tcp://127.0.0.1:{port}"


@pytest.mark.timeout(150)
def test_graceful_reaches_every_host_and_one_away_once_it_is_back(tmp_path):
    name, parent, (h0, h1), files, join = children(tmp_path, 2, 2, ["keep", "keep"])
    with ExitStack() as stack:
        stack.enter_context(supervisor(multibus("run", parent)))
        p0, _ = stack.enter_context(supervisor(multibus("run", files[0], "--join", join)))
        stack.enter_context(supervisor(multibus("run", files[1], "--join", join)))
        wait_for(lambda: hosts_in(name, {h0: "STARTED", h1: "STARTED"}), 60, "both STARTED")

        r = mb("graceful", "--name", name)
        assert r.returncode == 0, r.stderr
        for h in (h0, h1):
            wait_for(lambda h=h: len(lines_with(h, f"graceful on {h}")) == 2 or None, 20,
                     f"both workers of {h} reloaded")

        # h0's supervisor stops answering (its workers run on): LOST on the parent
        os.kill(p0.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: hosts_in(name, {h0: "LOST"}), 20, f"{h0} LOST")
            r = mb("graceful", "--name", name)  # h0 is away: it gets it once back
            assert r.returncode == 0, r.stderr
            wait_for(lambda: len(lines_with(h1, f"graceful on {h1}")) == 4 or None, 20,
                     f"{h1} reloaded again")
        finally:
            os.kill(p0.pid, signal.SIGCONT)
        wait_for(lambda: hosts_in(name, {h0: "STARTED"}), 30, f"{h0} back")
        wait_for(lambda: len(lines_with(h0, f"graceful on {h0}")) == 4 or None, 20,
                 f"{h0} reloaded once back")
        assert len(lines_with(h1, f"graceful on {h1}")) == 4  # once each, not again


def test_a_graceful_that_failed_on_a_host_is_logged():
    bus = Bus()
    said: list[tuple[str, int]] = []
    bus.subscribe("log", lambda msg, level=20, *a: said.append((msg, level)))
    hosts = Downstream(bus, cfg=None, name="par")  # never subscribed: no bridge
    hosts.hosts["host-b"] = Host("host-b", connected=True)
    hosts._failed("host-b", None, "RuntimeError: graceful failed on host host-b: queue full")
    assert said == [("downstream: graceful failed on host-b: RuntimeError: graceful failed "
                     "on host host-b: queue full", 40)]
    assert hosts.hosts["host-b"].failed.startswith("graceful failed: RuntimeError")
    hosts._failed("host-b", "STARTED", "RuntimeError: no")  # said by the waiting command
    assert len(said) == 1


def test_a_host_may_report_only_its_own_status_and_answers():
    """The parent takes a host's 'hosts.status' and 'hosts.done' only from that host's own
    connection (Bridge.origin()); one host cannot pass off another's status or end a
    request made of another."""

    class Bridge:
        sender: str | None = None

        def origin(self) -> str | None:
            return self.sender

        def peers(self) -> dict:
            return {"host-a": {}, "host-b": {}}

    hosts = Downstream(Bus(), cfg=None, name="par")
    hosts.bridge = bridge = Bridge()  # type: ignore[assignment]
    doc = {"state": "STARTED", "groups": [], "workers": []}
    bridge.sender = "host-a"
    hosts._status("host-b", doc)  # host-a posing as host-b
    assert "host-b" not in hosts.hosts
    bridge.sender = "host-b"
    hosts._status("host-b", doc)
    assert hosts.hosts["host-b"].doc == doc
    hosts._asked[7] = "host-b"
    bridge.sender = "host-a"
    hosts._op_done("host-b", 7, "done")
    assert 7 not in hosts._done
    bridge.sender = "host-b"
    hosts._op_done("host-b", 7, "done")
    assert hosts._done[7] == ("done", None, None)


@pytest.mark.timeout(150)
def test_reload_and_signal_reach_the_named_hosts_workers_only(tmp_path):
    name, parent, (h0, h1), files, join = children(tmp_path, 2, 2)
    with ExitStack() as stack:
        stack.enter_context(supervisor(multibus("run", parent)))
        for f in files:
            stack.enter_context(supervisor(multibus("run", f, "--join", join)))
        wait_for(lambda: hosts_in(name, {h0: "STARTED", h1: "STARTED"}), 60, "both STARTED")
        before0, before1 = pids(h0), pids(h1)

        r = mb("reload", "--name", name, f"{h0}:job")
        assert r.returncode == 0, r.stderr
        after0 = wait_for(lambda: fleet_state(h0, "STARTED"), 30, f"{h0} STARTED")
        after0 = {w["name"]: w["pid"] for w in after0["workers"]}
        assert len(after0) == len(before0)  # new workers (new names: job.2, job.3)
        assert not set(after0.values()) & set(before0.values()), (before0, after0)
        assert pids(h1) == before1  # the other host's workers were not replaced

        r = mb("signal", "--name", name, f"{h1}:job.1", "USR1")
        assert r.returncode == 0, r.stderr
        got = wait_for(lambda: lines_with(h1, "SIGUSR1 on") or None, 20, "job.1 signalled")
        assert len(got) == 1 and "job.1|SIGUSR1on" in got[0].replace(" ", ""), got
        r = mb("signal", "--name", name, f"{h0}:job", "USR1")  # a group: each worker
        assert r.returncode == 0, r.stderr
        wait_for(lambda: len(lines_with(h0, "SIGUSR1 on")) == 2 or None, 20,
                 f"both workers of {h0} signalled")
        assert len(lines_with(h1, "SIGUSR1 on")) == 1
        shown = lines_with(name, "SIGUSR1 on")  # the parent shows them as its hosts'
        assert sum(f"{h1}|job.1|SIGUSR1on{h1}" in ln.replace(" ", "") for ln in shown) == 1, \
            shown
        assert pids(h0) == after0 and pids(h1) == before1  # signalled, not killed

        for argv, said in ((("signal", f"{h1}:job.7", "USR1"), "no worker"),
                           (("reload", f"{h1}:nope"), "no group 'nope'"),
                           (("signal", "nosuch:job", "USR1"), "no host 'nosuch'")):
            r = mb(*argv, "--name", name)
            assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
            assert said in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.timeout(150)
def test_a_child_joins_while_it_starts_then_converges_to_the_parent(tmp_path):
    joins_while_starting_then_converges(tmp_path)


@pytest.mark.soak  # (-m soak) a first start of 33 s
@pytest.mark.timeout(150)
def test_a_child_whose_first_start_is_long_joins_again_and_converges(tmp_path):
    """The bridge's applier gives up waiting for a STARTING bus after 30 s (a command it
    took meanwhile comes to nothing): a child whose first start takes longer than HOLD_LIMIT
    joins again, so the parent's state (STOPPED) still applies."""
    joins_while_starting_then_converges(tmp_path, slow=33.0)


def joins_while_starting_then_converges(tmp_path: Path, slow: float | None = None) -> None:
    """A child joins a STOPPED parent while its workers start (they wait for a gate, or
    for ``slow`` s): it shows STARTING there; once started, it converges to STOPPED, then
    starts with the parent."""
    name, parent, (h0,), files, join = children(tmp_path, 1, 2)
    gate = tmp_path / "gate"
    text = Path(files[0]).read_text()
    if slow is None:
        gate.touch()  # its workers wait (STARTING) until gate.open exists
        text = text.replace("targets.hostjobs:job", "targets.jobs:gated").replace(
            "env = {", f'env = {{ MB_GATE = "{gate}", ')
    else:
        text = text.replace('"targets.hostjobs:job"\n',
                            '"targets.jobs:slow_start"\nstart_timeout = 120\n').replace(
            "env = {", f'env = {{ MB_START_SECONDS = "{slow}", ')
    Path(files[0]).write_text(text)
    with ExitStack() as stack:
        stack.enter_context(supervisor(multibus("run", parent)))
        wait_for(lambda: status(name), 30, "the parent up")
        r = mb("stop", "--name", name)  # the fleet's desired state: STOPPED
        assert r.returncode == 0, r.stderr
        stack.enter_context(supervisor(multibus("run", files[0], "--join", join)))

        def joined_starting() -> dict | None:
            st = status(name)
            hosts = {h["name"]: h for h in st["hosts"]} if st else {}
            return st if hosts.get(h0, {}).get("state") == "STARTING" else None

        wait_for(joined_starting, 30, f"{h0} joined while its fleet is STARTING")
        assert fleet_state(h0, "STARTED") is None
        (tmp_path / "gate.open").touch()
        # its start ends, then the parent's desired state applies
        wait_for(lambda: hosts_in(name, {h0: "STOPPED"}), 30 + (slow or 0), f"{h0} STOPPED")
        assert fleet_state(h0, "STOPPED")
        r = mb("start", "--name", name)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: hosts_in(name, {h0: "STARTED"}), 30 + (slow or 0), f"{h0} STARTED")
