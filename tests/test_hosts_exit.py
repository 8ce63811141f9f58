"""Several hosts through the CLI, over tcp on loopback (no namespaces, no root): `multibus
exit HOST` on the parent exits that host's supervisor only, and a host started again joins
at the fleet's state; a host that claims another host's name with its own (allowed) key is
refused by the parent and never shows in its status."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
from netns import multibus, supervisor
from test_cli import mb, wait_for
from test_hosts import fleet, hosts_in, status


def host_states(name: str) -> dict[str, str] | None:
    st = status(name)
    return None if st is None else {h["name"]: h["state"] for h in st["hosts"]}


@pytest.mark.timeout(150)
def test_exit_one_host_from_the_parent_and_an_impostor_is_refused(tmp_path):
    name, parent, (h0, h1), (port, f0, f1) = fleet(tmp_path, 2, 1)
    join = f"tcp://127.0.0.1:{port}"

    def child(f: str, stack: ExitStack):
        return stack.enter_context(supervisor(multibus("run", f, "--join", join)))

    with ExitStack() as stack:
        pproc, plog = stack.enter_context(supervisor(multibus("run", parent)))
        (p0, log0), (p1, log1) = child(f0, stack), child(f1, stack)
        wait_for(lambda: hosts_in(name, {h0: "STARTED", h1: "STARTED"}), 60, "both STARTED")

        r = mb("exit", "--name", name, h0)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"{name}: exit {h0} done") and f"{h0} exited" in r.stdout
        assert p0.wait(30) == 0, log0.read_text()
        assert host_states(name) == {h0: "EXITED", h1: "STARTED"}
        assert hosts_in(name, {h1: "STARTED"}) and p1.poll() is None and pproc.poll() is None

        for host, said in ((h0, f"host {h0!r} is not connected (exited)"),
                           ("nosuch", f"no host 'nosuch'; hosts: {h0}, {h1}")):
            r = mb("exit", "--name", name, host)
            assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
            assert said in r.stderr and "Traceback" not in r.stderr

        # h1's key under h0's name: refused frame by frame, never joins as h0
        imp = Path(tmp_path / "impostor.toml")
        imp.write_text(Path(f1).read_text()
                       .replace(f'name = "{h1}"', f'name = "{h0}imp"')
                       .replace("[upstream]\n", f'[upstream]\nhost = "{h0}"\n'))
        with ExitStack() as imp_stack:
            child(str(imp), imp_stack)

            def refused() -> dict | None:
                st = status(name)
                return st if st and st["counters"]["bridge"].get("name_refused", 0) >= 2 \
                    else None

            st = wait_for(refused, 30, "the parent refused the impostor's frames")
            assert {h["name"]: h["state"] for h in st["hosts"]} == {h0: "EXITED",
                                                                    h1: "STARTED"}
            assert "refused peer name" in mb("status", "--name", name).stdout
        assert "whose CURVE key was allowed as" in plog.read_text()

        # h0 again: it joins at the fleet's state (STARTED), not at its last command (exit)
        p0, log0 = child(f0, stack)
        wait_for(lambda: hosts_in(name, {h0: "STARTED", h1: "STARTED"}), 60, "h0 back")

        r = mb("exit", "--name", name)  # the parent and every host
        assert r.returncode == 0, r.stderr
        for proc, log in ((p0, log0), (p1, log1), (pproc, plog)):
            assert proc.wait(60) == 0, log.read_text()
