"""One fleet across hosts (issue 19): each host a network namespace, driven through the CLI.

A parent supervisor runs here with ``[downstream]``; each child supervisor runs in its own
namespace and joins it with ``--join`` over its own veth link (tcp + CURVE). Root only
(``tests/netns.py`` says why it skips otherwise).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from netns import Hosts, free_port, multibus, skip_reason, supervisor
from test_cli import mb, unique, wait_for

TESTS = Path(__file__).resolve().parent
TIMEOUT = 2.0  # upstream.timeout and downstream.timeout of these fleets

_why = skip_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")


@pytest.fixture
def hosts(request):
    made: list[Hosts] = []

    def make(n: int) -> Hosts:
        made.append(Hosts(n))
        return made[-1]

    yield make
    for h in made:  # even when the test failed
        h.close()


def keygen(keys: Path, name: str) -> None:
    r = mb("keygen", name, "--dir", str(keys))
    assert r.returncode == 0, r.stderr


def fleet(tmp_path: Path, n_hosts: int, workers: int, policies: list[str] | None = None,
          allow: int | None = None) -> tuple[str, str, list[str], list[str]]:
    """Keys, the parent's file and one file per host; returns (parent name, parent file,
    host names, host files). ``allow``: how many of the hosts' keys the parent lists."""
    keys = tmp_path / "keys"
    name = unique("par")
    keygen(keys, "parent")
    hosts = [f"{name}h{i}" for i in range(n_hosts)]
    for h in hosts:
        keygen(keys, h)
    allowed = ", ".join(f'"keys/{h}.key"' for h in hosts[:allow])
    port = free_port()
    parent = tmp_path / "parent.toml"
    parent.write_text(f'[supervisor]\nname = "{name}"\n[downstream]\n'
                      f'listen = "tcp://0.0.0.0:{port}"\nkey = "keys/parent.key_secret"\n'
                      f"allow = [{allowed}]\ntimeout = {TIMEOUT}\n")
    files = []
    for i, h in enumerate(hosts):
        f = tmp_path / f"{h}.toml"
        policy = (policies or ["stop"] * n_hosts)[i]
        f.write_text(f'[supervisor]\nname = "{h}"\npythonpath = ["{TESTS}"]\n'
                     f'[upstream]\nkey = "keys/{h}.key_secret"\nserver_key = "keys/parent.key"\n'
                     f'timeout = {TIMEOUT}\non_upstream_lost = "{policy}"\n'
                     f'[groups.job]\ntarget = "targets.hostjobs:job"\ncount = {workers}\n'
                     f'env = {{ MB_HOST = "{h}" }}\n')
        files.append(str(f))
    return name, str(parent), hosts, [f"{port}", *files]


def status(name: str) -> dict | None:
    r = mb("status", "--json", "--name", name, timeout=30)
    return json.loads(r.stdout) if r.returncode == 0 else None


def hosts_in(name: str, want: dict[str, str]) -> dict | None:
    """The parent's status once each host in ``want`` is in that state (and, unless LOST,
    all its workers too)."""
    st = status(name)
    if st is None:
        return None
    got = {h["name"]: h["state"] for h in st.get("hosts", ())}
    for host, state in want.items():
        if got.get(host) != state:
            return None
        rows = [w for w in st["workers"] if w.get("host") == host]
        if state != "LOST" and (not rows or any(w["state"] != state for w in rows)):
            return None
    return st


def fleet_state(name: str, state: str) -> dict | None:
    """A supervisor's own status (asked directly) once it and its workers are ``state``."""
    st = status(name)
    if st and st["state"] == state and all(w["state"] == state for w in st["workers"]):
        return st
    return None


class Fleet:
    """The parent and its hosts, started; stopped (and reaped) on exit."""

    def __init__(self, ns: Hosts, parent: str, files: list[str], stack) -> None:
        port, *hfiles = files
        self.parent, self.plog = stack.enter_context(supervisor(multibus("run", parent)))
        self.children = []
        for i, f in enumerate(hfiles):
            join = f"tcp://{ns.parent_ip(i)}:{port}"
            proc, log = stack.enter_context(supervisor(ns.argv(i, multibus("run", f,
                                                                           "--join", join))))
            self.children.append((proc, log))


@pytest.mark.timeout(120)
def test_three_hosts_one_fleet_status_graceful_and_ctrl_c(tmp_path, hosts):
    from contextlib import ExitStack

    ns = hosts(3)
    name, parent, names, files = fleet(tmp_path, 3, 5)
    with ExitStack() as stack:
        f = Fleet(ns, parent, files, stack)
        st = wait_for(lambda: hosts_in(name, dict.fromkeys(names, "STARTED")), 60,
                      "3 hosts x 5 workers STARTED on the parent")
        assert len([w for w in st["workers"] if w.get("host")]) == 15
        table = mb("status", "--name", name).stdout
        assert table.splitlines()[4].split()[0] == "HOST", table
        for h in names:
            assert f"host {h}: STARTED, 5 workers" in table

        r = mb("graceful", "--name", name)
        assert r.returncode == 0, r.stderr

        def graceful_lines() -> list[str] | None:
            logs = mb("logs", "--name", name, "-n", "1000").stdout
            lines = [ln for ln in logs.splitlines() if "graceful on" in ln]
            return lines if len(lines) == 15 else None

        lines = wait_for(graceful_lines, 20, "15 workers say graceful in the parent's logs")
        for h in names:
            assert sum(f"{h} | job." in ln and f"graceful on {h}" in ln for ln in lines) == 5

        # HOST:GROUP and HOST:WORKER targets
        r = mb("stop", "--name", name, f"{names[0]}:job.1")
        assert r.returncode == 0, r.stderr
        st = status(names[0])
        assert {w["name"]: w["state"] for w in st["workers"]}["job.1"] == "STOPPED"
        r = mb("start", "--name", name, f"{names[0]}:job")
        assert r.returncode == 0, r.stderr
        r = mb("stop", "--name", name, f"{names[0]}:nope")
        assert r.returncode == 1 and f"host {names[0]}: no group 'nope'" in r.stderr

        # Ctrl-C on the parent: every host's workers stop, every supervisor exits, exit 0
        f.parent.send_signal(signal.SIGINT)
        assert f.parent.wait(60) == 0, f.plog.read_text()
        for proc, log in f.children:
            assert proc.wait(30) == 0, log.read_text()


@pytest.mark.timeout(120)
def test_cut_links_lost_policies_and_convergence(tmp_path, hosts):
    from contextlib import ExitStack

    ns = hosts(2)
    name, parent, names, files = fleet(tmp_path, 2, 2, policies=["stop", "keep"])
    stopper, keeper = names
    with ExitStack() as stack:
        f = Fleet(ns, parent, files, stack)
        wait_for(lambda: hosts_in(name, dict.fromkeys(names, "STARTED")), 60, "both STARTED")
        ns.cut(0)
        ns.cut(1)
        # LOST on the parent within the timeout (plus a heartbeat and the status's poll)
        st = wait_for(lambda: hosts_in(name, dict.fromkeys(names, "LOST")), TIMEOUT + 3,
                      "both hosts LOST")
        assert "LOST (last seen" in mb("status", "--name", name).stdout
        assert st["hosts"][0]["last_seen"] >= 0
        # stop: its workers stop by themselves; keep: they run on
        wait_for(lambda: fleet_state(stopper, "STOPPED"), TIMEOUT + 5, "stopper STOPPED")
        assert fleet_state(keeper, "STARTED")
        # the parent's desired state changes while they are away
        r = mb("stop", "--name", name)
        assert r.returncode == 0, r.stderr
        ns.restore(0)
        ns.restore(1)
        # both rejoin and converge to it: STOPPED
        wait_for(lambda: hosts_in(name, dict.fromkeys(names, "STOPPED")), 30,
                 "both rejoined and STOPPED")
        assert fleet_state(keeper, "STOPPED")
        r = mb("start", "--name", name)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: hosts_in(name, dict.fromkeys(names, "STARTED")), 30, "both STARTED")
        assert "rejoined" in f.plog.read_text()


@pytest.mark.timeout(60)
def test_a_host_with_an_unknown_key_never_joins(tmp_path, hosts):
    from contextlib import ExitStack

    ns = hosts(1)
    name, parent, names, files = fleet(tmp_path, 1, 1, allow=0)
    # the parent needs an allow-list: list a key nobody uses
    keygen(tmp_path / "keys", "other")
    text = Path(parent).read_text().replace("allow = []", 'allow = ["keys/other.key"]')
    Path(parent).write_text(text)
    with ExitStack() as stack:
        Fleet(ns, parent, files, stack)

        def refused() -> dict | None:
            st = status(name)
            return st if st and st["counters"]["bridge"].get("zap_refused", 0) >= 2 else None

        st = wait_for(refused, 30, "the parent refused the unknown key (twice)")
        assert st["hosts"] == [] and not [w for w in st["workers"] if w.get("host")]
        assert "refused CURVE key" in mb("status", "--name", name).stdout
        assert fleet_state(names[0], "STARTED")  # it runs on its own, unjoined
