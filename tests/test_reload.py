"""Rolling reload (issue 17), black-box through the CLI: ``multibus run`` of a copy of
``examples/web.toml`` (4 CherryPy workers on one shared socket) under load while
``multibus reload`` deploys new code, bad code, or is interrupted by ``multibus exit``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_cli import EXAMPLES, ROOT, all_started, mb, output, running, status, unique, wait_for

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_reload import Load, get  # noqa: E402 - the bench's load generator, reused

pytest.importorskip("cherrypy")


@dataclass
class Site:
    """A copy of the example site in a temporary directory, running under ``name``."""

    dir: Path
    name: str
    port: int
    log: Path
    proc: subprocess.Popen

    def write_code(self, version: str, extra: str = "") -> None:
        """Deploy: the page says ``version``; ``extra`` lines run at import."""
        src = (EXAMPLES / "web.py").read_text()
        src = src.replace('VERSION = "1"', f'VERSION = "{version}"\n{extra}')
        (self.dir / "web.py").write_text(src)
        shutil.rmtree(self.dir / "__pycache__", ignore_errors=True)  # same size, same second

    def reload(self, *args: str) -> object:
        return mb("reload", "--name", self.name, *args, timeout=120)

    def pids(self) -> set[int]:
        return {w["pid"] for w in status(self.name)["workers"]}


@contextlib.contextmanager
def site(tmp_path: Path, stop_timeout: float = 10.0) -> Iterator[Site]:
    shutil.copy(EXAMPLES / "web.py", tmp_path / "web.py")
    name = unique("rl")
    toml = (EXAMPLES / "web.toml").read_text()
    toml = toml.replace('"127.0.0.1:8080"', '"127.0.0.1:0"').replace('name = "web"',
                                                                        f'name = "{name}"')
    toml = toml.replace("stop_timeout = 10.0", f"stop_timeout = {stop_timeout}")
    (tmp_path / "web.toml").write_text(toml)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with running(str(tmp_path / "web.toml"), env=env) as (proc, log):
        st = wait_for(lambda: all_started(name, 4), 60, "4 workers STARTED")
        port = int(st["sockets"][0]["address"].rpartition(":")[2])
        yield Site(tmp_path, name, port, log, proc)
        if proc.poll() is None:
            r = mb("exit", "--name", name, timeout=60)
            assert r.returncode == 0, r.stderr
            proc.wait(30)


@pytest.mark.timeout(180)
def test_three_rolling_reloads_under_load_fail_no_request(tmp_path):
    with site(tmp_path) as s:
        first = s.pids()
        with Load(s.port, clients=4) as load:
            load.wait(20)
            for version in ("2", "3"):
                s.write_code(version)
                r = s.reload()
                assert r.returncode == 0, r.stderr
                assert f"on generation {int(version) - 1}" in r.stdout
            # then SIGUSR2 and a command: one is queued behind the other, which runs first
            s.write_code("4")
            os.kill(status(s.name)["pid"], signal.SIGUSR2)
            r = s.reload("site")
            assert r.returncode == 0, r.stderr
            st = wait_for(lambda: (x := status(s.name))["groups"][0]["generation"] == 4
                          and not x["queue"] and x, 60, "both reloads done")
            done = time.monotonic()  # no old process is left after this
            after = load.wait(40, since=done)
        assert load.failures() == {}, load.failures()
        assert {a.version for a in after} == {"4"}
        assert (st["groups"][0]["new"], st["groups"][0]["old"]) == (4, 0)
        assert not s.pids() & first and len(st["workers"]) == 4
        assert "SIGUSR2" in output(s.log)
        assert all(w["state"] == "STARTED" for w in st["workers"])


@pytest.mark.timeout(120)
def test_a_reload_onto_failing_code_keeps_the_old_version_serving(tmp_path):
    with site(tmp_path) as s:
        first = s.pids()
        s.write_code("2", 'raise RuntimeError("broken deploy 17")')
        with Load(s.port, clients=4) as load:
            load.wait(20)
            r = s.reload()
            after = load.wait(20, since=time.monotonic())
        assert r.returncode == 1
        assert "reload failed" in r.stderr and "RuntimeError: broken deploy 17" in r.stderr
        assert "the old workers keep serving" in r.stderr
        assert load.failures() == {}, load.failures()
        assert {a.version for a in load.answers()} == {"1"} and after
        st = status(s.name)
        assert s.pids() == first and all(w["state"] == "STARTED" for w in st["workers"])
        assert (st["groups"][0]["new"], st["groups"][0]["old"]) == (0, 4)
        text = mb("status", "--name", s.name).stdout
        assert "site: code generation 1, 0 workers on it, 4 on older" in text
        assert "broken deploy 17" in output(s.log)


@pytest.mark.timeout(120)
def test_exit_during_a_reload_stops_everything(tmp_path):
    with site(tmp_path, stop_timeout=2.0) as s:
        s.write_code("2", "import time\ntime.sleep(60)")  # a replacement that never starts
        r = s.reload("--no-wait")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: len(status(s.name)["workers"]) == 5, 30, "a replacement")
        r = mb("exit", "--name", s.name, timeout=60)
        assert r.returncode == 0, r.stderr
        text = output(s.log)
        assert "reload interrupted" in text
        assert get("127.0.0.1", s.port, timeout=2)[0] == "refused"  # the socket is closed


@pytest.mark.timeout(90)
def test_sigterm_during_a_reload_interrupts_it(tmp_path):
    """A stop signal does not wait behind a reload: the reload stops at its next step (here
    it would otherwise wait for a replacement that never starts, up to start_timeout)."""
    with site(tmp_path, stop_timeout=2.0) as s:
        s.write_code("2", "import time\ntime.sleep(60)")  # a replacement that never starts
        assert s.reload("--no-wait").returncode == 0
        wait_for(lambda: len(status(s.name)["workers"]) == 5, 30, "a replacement")
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(60)
        text = output(s.log)
        assert "reload interrupted: SIGTERM" in text, text[-3000:]
        assert "not STARTED within its start_timeout" not in text
        assert get("127.0.0.1", s.port, timeout=2)[0] == "refused"  # the socket is closed


@pytest.mark.timeout(90)
def test_max_surge_and_names_and_a_stopped_fleet(tmp_path):
    """3 workers, 2 at a time: the replacements take the lowest free indices; a stopped
    fleet has nothing to reload; an unknown group is refused."""
    name = unique("rs")
    (tmp_path / "f.toml").write_text(
        f'[supervisor]\nname = "{name}"\npythonpath = ["{ROOT / "tests"}"]\n'
        '[groups.job]\ntarget = "targets.jobs:job"\ncount = 3\nmax_surge = 2\n')
    with running(str(tmp_path / "f.toml"), env=dict(os.environ, PYTHONPATH=str(ROOT))) as (
            proc, log):
        wait_for(lambda: all_started(name, 3), 60, "3 workers STARTED")
        r = mb("reload", "--name", name, "job")
        assert r.returncode == 0 and "job: 3 workers on generation 1" in r.stdout, r.stderr
        st = status(name)
        # 3 and 4 replace 0 and 1 (together), then one more replaces 2 (0, or 5 if the old
        # job.0 is still leaving: a name is reused only once the hub forgot its last process)
        assert len(st["workers"]) == 3
        assert (st["groups"][0]["generation"], st["groups"][0]["new"]) == (1, 3)
        assert "job.3, job.4 STARTED (generation 1); stopping job.0, job.1" in output(log)
        assert "STARTED (generation 1); stopping job.2" in output(log)
        r = mb("reload", "--name", name, "jbo")
        assert r.returncode == 1 and "no group 'jbo'; groups: job" in r.stderr
        assert mb("stop", "--name", name).returncode == 0
        r = mb("reload", "--name", name)
        assert r.returncode == 0 and "nothing to reload: the fleet is STOPPED" in r.stdout
        assert mb("exit", "--name", name).returncode == 0
        proc.wait(30)
