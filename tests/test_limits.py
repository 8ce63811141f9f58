"""Per-group user, group, umask and rlimits (issue 16, item 5, launch time): applied in every
launch path (a forked bus worker, an exec'd one, a cmd program), shown in ``status --json``."""

from __future__ import annotations

import os
import pwd
import re
import stat
import subprocess
import sys

import pytest
import reachable
from test_cli import mb, output, running, status, supervised, unique, wait_for
from test_cmd_groups import assert_refused, started, toml_cmd, write_fleet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def proc_limit(pid: int, what: str) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith(what))
    soft, hard = re.split(r"\s{2,}", line.strip())[1:3]
    return soft, hard


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")
def test_a_program_runs_as_another_user_with_its_limits(tmp_path):
    nobody = pwd.getpwnam("nobody")
    name = unique("un")
    fleet = write_fleet(tmp_path, name, f"""
[groups.low]
cmd = {toml_cmd("sleep", "60")}
user = "nobody"
umask = 0o027
rlimits = {{ nofile = 1024, core = 0, stack = [8388608, "unlimited"] }}
""")
    with running(fleet) as (proc, log):
        pid = wait_for(lambda: started(name, "low"), 30, "STARTED")[0]["pid"]
        st = proc_status(pid)
        assert st["Name"] == "sleep"  # the launcher exec'd it: same pid
        assert st["Uid"].split() == [str(nobody.pw_uid)] * 4
        assert st["Gid"].split() == [str(nobody.pw_gid)] * 4
        assert "0" not in st["Groups"].split()  # root's groups are dropped
        assert st["Umask"] == "0027"
        assert proc_limit(pid, "Max open files") == ("1024", "1024")
        assert proc_limit(pid, "Max core file size") == ("0", "0")
        assert proc_limit(pid, "Max stack size") == ("8388608", "unlimited")
        limits = status(name)["groups"][0]["limits"]
        assert limits == {"user": "nobody", "group": None, "umask": "0027",
                          "rlimits": {"nofile": [1024, 1024], "core": [0, 0],
                                      "stack": [8388608, "unlimited"]}}
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(30) == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("zygote", [True, False], ids=["forked", "exec"])
def test_bus_workers_get_their_groups_umask_and_rlimits(tmp_path, zygote):
    name = unique("bl")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f"""[supervisor]
name = "{name}"
zygote = {str(zygote).lower()}
[groups.probe]
target = "targets.limits_probe:probe"
pythonpath = [{TESTS!r}]
umask = 0o077
rlimits = {{ nofile = 2048, core = 0 }}
[groups.plain]
target = "targets.limits_probe:probe"
pythonpath = [{TESTS!r}]
""")
    old = os.umask(0o022)
    try:
        with running(str(fleet)) as (proc, log):
            wait_for(lambda: output(log).count("LIMITS ") >= 2, 30, "both workers' lines")
            text = output(log)
            rows = status(name)["workers"]
            assert mb("exit", "--name", name).returncode == 0
            assert proc.wait(30) == 0
    finally:
        os.umask(old)
    launch = {w["group"]: w["launch"] for w in rows}
    assert launch["probe"] == ("fork" if zygote else "exec (zygote disabled)")
    assert "LIMITS probe.0 nofile=2048:2048 core=0:0 umask=0077" in text
    plain = re.search(r"LIMITS plain\.0 nofile=(\d+):(\d+) core=\S+ umask=(\d+)", text)
    assert plain and plain.group(1) != "2048" and plain.group(3) == "0022"


@pytest.mark.parametrize("body, expected", [
    ('[groups.x]\ncmd = ["sleep", "1"]\nuser = "no-such-user-xyz"\n',
     "no user 'no-such-user-xyz'"),
    ('[groups.x]\ncmd = ["sleep", "1"]\ngroup = "no-such-group-xyz"\n',
     "no group 'no-such-group-xyz'"),
    ('[groups.x]\ncmd = ["sleep", "1"]\nrlimits = { nofiles = 10 }\n',
     "rlimits.nofiles: unknown limit; expected one of"),
    ('[groups.x]\ncmd = ["sleep", "1"]\nrlimits = { nofile = -1 }\n',
     "rlimits.nofile: -1 must be an integer >= 0"),
    ('[groups.x]\ncmd = ["sleep", "1"]\nrlimits = { nofile = [10, 5] }\n',
     "soft 10 is above hard 5"),
    ('[groups.x]\ncmd = ["sleep", "1"]\numask = 0o1777\n', "groups.x.umask: expected an octal"),
    ('[groups.x]\ncmd = ["sleep", "1"]\numask = "8"\n', "groups.x.umask: expected an octal"),
])
def test_bad_limits_exit_2_with_one_line(tmp_path, body, expected):
    assert_refused(tmp_path, body, expected)


def test_changing_user_needs_root():
    """As another user, the supervisor refuses a group with a user (checked as nobody)."""
    if os.geteuid() != 0:
        from multibus.specs import SpecError, WorkerSpec

        with pytest.raises(SpecError, match="must be root"):
            WorkerSpec(name="x", cmd=("sleep", "1"), user="root")
        return
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from multibus.specs import "
            "WorkerSpec\ntry:\n    WorkerSpec(name='x', cmd=('sleep', '1'), user='root')\n"
            "except ValueError as e:\n    print(e)")
    import subprocess

    if not os.access(sys.executable, os.X_OK) or "/root/" in sys.executable:
        python = "/usr/bin/python3"
        if not os.path.exists(python):
            pytest.skip("no interpreter that user 'nobody' may run")
    else:
        python = sys.executable
    r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                        python, "-c", code, ROOT], capture_output=True, text=True, timeout=30,
                       cwd="/")
    if "Permission denied" in r.stderr or "No module named" in r.stderr:
        pytest.skip(f"user 'nobody' cannot import multibus here: {r.stderr.strip()[-200:]}")
    assert "the supervisor must be root to run a group as another user" in r.stdout, r


@pytest.mark.timeout(90)
@pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")
@pytest.mark.parametrize("zygote", [True, False], ids=["forked", "exec"])
def test_a_bus_worker_runs_as_another_user_and_still_reaches_its_hub(tmp_path, zygote):
    """A target group with ``user``: the worker switches before its code runs and connects
    to the hub's sockets in the shared dir, which only that user may open; lifecycle comes
    down (graceful) and its bus log goes up; the shared sockets are gone after exit."""
    from multibus.rundir import shared_dir

    nobody = pwd.getpwnam("nobody")
    name = unique("bu")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f"""[supervisor]
name = "{name}"
zygote = {str(zygote).lower()}
[groups.low]
target = "targets.limits_probe:identity"
pythonpath = [{TESTS!r}]
user = "nobody"
count = 2
""")
    shared = [shared_dir() / f"{name}.u{nobody.pw_uid}.{s}" for s in ("control", "down", "up")]
    argv = reachable.argv_for([sys.executable, "-m", "multibus", "run", str(fleet)])
    with supervised(argv) as (proc, log):
        rows = wait_for(lambda: started(name, "low", 2), 30, "both workers STARTED")
        for row in rows:
            st = proc_status(row["pid"])
            assert st["Uid"].split() == [str(nobody.pw_uid)] * 4
            assert st["Gid"].split() == [str(nobody.pw_gid)] * 4
            assert "0" not in st["Groups"].split()
            assert row["launch"] == ("fork" if zygote else "exec (zygote disabled)")
        assert stat.S_IMODE(os.stat(shared_dir()).st_mode) == 0o711
        for path in shared:
            st = os.stat(path)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, 0o600), path
        wait_for(lambda: output(log).count("started as uid 65534") >= 2, 30, "bus logs")
        assert (f"IDENTITY low.0 uid={nobody.pw_uid} gid={nobody.pw_gid} "
                f"groups=[{nobody.pw_gid}] home={nobody.pw_dir} user=nobody") in output(log)
        assert mb("graceful", "low", "--name", name).returncode == 0
        wait_for(lambda: output(log).count("graceful as uid 65534") >= 2, 30, "graceful")
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(30) == 0
    assert not [p for p in shared if os.path.lexists(p)]


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")
def test_a_target_the_user_cannot_read_is_refused_up_front(tmp_path):
    """The import check runs as the group's user: code only root can read is a config error
    (exit 2, one line naming the group, the user and the fix), and nothing starts."""
    private = tmp_path / "private"  # under pytest's 0700 temp dir: root's alone
    private.mkdir()
    (private / "secretjob.py").write_text("def job(bus):\n    pass\n")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f"""[supervisor]
name = "{unique("bur")}"
[groups.low]
target = "secretjob:job"
pythonpath = [{str(private)!r}]
user = "nobody"
""")
    argv = reachable.argv_for([sys.executable, "-m", "multibus", "run", str(fleet)])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert ("groups.low.target: as user 'nobody': cannot import target 'secretjob:job': "
            "ModuleNotFoundError: No module named 'secretjob'") in r.stderr
    assert "that user must be able to read the code" in r.stderr
