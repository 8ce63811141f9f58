"""Workers forked from a zygote: started, reaped, restarted, killed with the supervisor,
stopped by Ctrl-C; exec fallback when the zygote is gone or cannot serve a spec."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from test_supervisor import HERE, Fleet, alive, started

from multibus.zygote import can_fork


@pytest.fixture
def fleets():
    made: list[Fleet] = []

    def make(*args: str, **kw) -> Fleet:
        f = Fleet("--zygote", *args, **kw)
        made.append(f)
        return f

    try:
        yield made, make
    finally:
        for f in made:
            zyg = [p.pid for p in _zygotes(f)]
            f.close()
            for pid in zyg:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _zygotes(f: Fleet) -> list[psutil.Process]:
    """The supervisor's zygote (forked workers share its command line: not in the table)."""
    with f.cond:
        workers = set(f.pids)
    try:
        kids = psutil.Process(f.proc.pid).children()
    except psutil.Error:
        return []
    out = []
    for p in kids:
        try:
            if p.pid not in workers and "multibus.zygote" in p.cmdline():
                out.append(p)
        except psutil.Error:
            pass
    return out


def _is_forked(row: dict) -> bool:
    """The supervisor forked it (workers retitle themselves: the command line cannot tell)."""
    return row["launch"] == "fork"


@pytest.mark.timeout(60)
def test_forked_workers_are_supervisor_children_in_own_groups_and_ctrl_c_stops_all(fleets):
    _, make = fleets
    f = make(n=10)
    f.wait_line("^FLEET STARTED", 30)
    t = f.table()
    assert started(t) and len(t) == 10
    zyg = _zygotes(f)
    assert len(zyg) == 1
    assert zyg[0].num_threads() == 1  # single-threaded: no zmq Context (its I/O thread)
    for row in t:
        p = psutil.Process(row["pid"])
        assert _is_forked(row), p.cmdline()  # forked, not exec'd
        assert p.ppid() == f.proc.pid  # re-parented to the supervisor: it owns the wait
        assert os.getpgid(row["pid"]) == row["pid"]  # own process group: ^C is not theirs
    f.ctrl_c()
    assert f.wait() == 0, "\n".join(f.lines[-20:])
    f.wait_line("^CHILDREN 0$", 1)
    f.assert_all_gone()
    assert not zyg[0].is_running() or zyg[0].status() == psutil.STATUS_ZOMBIE


@pytest.mark.timeout(60)
def test_ctrl_c_while_starting_forked_fleet_exit_0(fleets):
    _, make = fleets
    f = make(n=10)
    f.wait_line(r"^WORKERS .*SPAWNING", 20)
    f.ctrl_c()
    assert f.wait() == 0, "\n".join(f.lines[-20:])
    f.wait_line("^CHILDREN 0$", 1)
    f.assert_all_gone()


@pytest.mark.timeout(60)
def test_sigkill_of_supervisor_takes_forked_workers_and_zygote_within_1s(fleets):
    _, make = fleets
    f = make(n=10)
    f.wait_line("^FLEET STARTED", 30)
    pids = set(f.pids) | {p.pid for p in _zygotes(f)}
    assert len(pids) == 11
    f.sigkill_supervisor(pids, within=1.0)


@pytest.mark.timeout(60)
def test_killed_forked_worker_is_reaped_and_replaced(fleets):
    _, make = fleets
    f = make("--intensity", "1000,1", n=3)
    f.wait_line("^FLEET STARTED", 30)
    for i in (1, 2):
        victim = f.table()[1]
        os.kill(victim["pid"], signal.SIGKILL)
        t = f.wait_table(lambda t, i=i: t[1]["restarts"] == i and t[1]["state"] == "STARTED",
                         10)
        assert t[1]["exit_code"] == -signal.SIGKILL  # our own wait saw the real status
        assert t[1]["pid"] != victim["pid"] and _is_forked(t[1])
        assert not alive(victim["pid"])
    f.ctrl_c()
    assert f.wait() == 0
    f.assert_all_gone()


@pytest.mark.timeout(60)
def test_workers_are_execd_once_the_zygote_is_gone(fleets):
    _, make = fleets
    f = make("--intensity", "1000,1", n=2)
    f.wait_line("^FLEET STARTED", 30)
    (zyg,) = _zygotes(f)
    zyg.kill()
    zyg.wait(5)
    victim = f.table()[0]
    assert alive(victim["pid"])  # workers do not depend on the zygote
    os.kill(victim["pid"], signal.SIGKILL)
    t = f.wait_table(lambda t: t[0]["restarts"] == 1 and t[0]["state"] == "STARTED", 15)
    assert not _is_forked(t[0])  # exec'd instead
    f.wait_line("zygote unavailable", 1)
    f.ctrl_c()
    assert f.wait() == 0
    f.wait_line("^CHILDREN 0$", 1)
    f.assert_all_gone()


@pytest.mark.timeout(60)
def test_bad_target_fails_the_same_way_when_forked(fleets):
    _, make = fleets
    f = make("--target", "targets.jobs:failing", "--intensity", "3,30", n=2)
    err = f.wait_line("^FLEET ERROR", 30)
    assert "restart intensity reached" in err and "database unreachable" in err
    assert f.wait() == 1
    f.wait_line("^CHILDREN 0$", 1)
    f.assert_all_gone()


@pytest.mark.timeout(60)
def test_spec_env_with_interpreter_settings_is_execd(fleets):
    _, make = fleets
    f = make("--env", "PYTHONHASHSEED=7", n=1)
    f.wait_line("^FLEET STARTED", 30)
    assert not _is_forked(f.table()[0])
    f.ctrl_c()
    assert f.wait() == 0
    f.assert_all_gone()


@pytest.mark.timeout(60)
def test_preloaded_target_module_serves_forked_workers(fleets):
    _, make = fleets
    f = make("--zygote-preload", "targets.jobs", n=2)
    f.wait_line("^FLEET STARTED", 30)
    assert all(_is_forked(r) for r in f.table())
    f.ctrl_c()
    assert f.wait() == 0
    f.assert_all_gone()


@pytest.mark.timeout(60)
def test_preload_that_cannot_be_imported_is_named_and_workers_still_fork(fleets):
    _, make = fleets
    f = make("--zygote-preload", "no_such_module_here", n=1)
    f.wait_line("^FLEET STARTED", 30)
    f.wait_line("cannot preload no_such_module_here: No module named 'no_such_module_here'; "
                "workers are forked without it", 1)
    assert _is_forked(f.table()[0])
    f.ctrl_c()
    assert f.wait() == 0
    f.assert_all_gone()


@pytest.mark.timeout(60)
def test_zygote_that_is_not_single_threaded_refuses_and_workers_are_execd(fleets):
    _, make = fleets
    f = make("--zygote-preload", "targets.threaded_preload", n=2)
    f.wait_line("^FLEET STARTED", 30)
    assert not any(_is_forked(r) for r in f.table())
    f.wait_line("zygote unavailable.*not single-threaded", 1)
    f.ctrl_c()
    assert f.wait() == 0
    f.wait_line("^CHILDREN 0$", 1)
    f.assert_all_gone()


@pytest.mark.timeout(60)
def test_forked_worker_imports_its_target_from_the_spec_cwd_like_python_m(fleets, tmp_path):
    (tmp_path / "cwd_only_mod.py").write_text(
        "import os\n\ndef job(bus):\n    print('cwd', os.getcwd(), flush=True)\n")
    _, make = fleets
    f = make("--target", "cwd_only_mod:job", "--cwd", str(tmp_path), n=1)
    f.wait_line("^FLEET STARTED", 30)
    assert _is_forked(f.table()[0])
    f.wait_line(f"w.0 \\| cwd {tmp_path}$", 5)
    f.ctrl_c()
    assert f.wait() == 0
    f.assert_all_gone()


def test_can_fork_only_without_interpreter_settings():
    base = {"PATH": "/bin", "PYTHONPATH": "/a", "PYTHONUNBUFFERED": "1"}
    assert can_fork(dict(base, PYTHONPATH="/a:/b", FOO="x"), base)
    assert not can_fork(dict(base, PYTHONHASHSEED="0"), base)
    assert not can_fork(dict(base, LD_PRELOAD="/x.so"), base)
    assert not can_fork({k: v for k, v in base.items() if k != "PYTHONUNBUFFERED"}, base)


# -- exec semantics (issue 18): a forked worker sees what an exec'd one of its spec sees -------

def _stop_ok(f: Fleet) -> None:
    """Ctrl-C: a clean stop (exit status 0), no worker left."""
    f.ctrl_c()
    assert f.wait() == 0
    f.assert_all_gone()


def _title(pid: int) -> tuple[str, str]:
    """(command line, name) as ps and top show them."""
    with open(f"/proc/{pid}/cmdline") as f:
        cmdline = f.read().split("\0")[0]
    with open(f"/proc/{pid}/comm") as f:
        return cmdline, f.read().strip()


def _wait_file(path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.02)
    return json.loads(path.read_text())


@pytest.mark.timeout(90)
def test_forked_worker_has_the_exec_semantics_of_an_execd_worker(fleets, tmp_path):
    """env (os.environ, sys.path through a relative and an absolute PYTHONPATH entry), cwd,
    umask and rlimits the supervisor set after starting its zygote, signal state, threads,
    ids, interpreter flags, process title: each the same as an exec'd worker's."""
    _, make = fleets
    (tmp_path / "rel").mkdir()
    made = {}
    for how in ("fork", "exec"):
        (tmp_path / how).mkdir()
        made[how] = make(
            "--target", "targets.probe:report", "--cwd", str(tmp_path),
            "--env", f"MB_PROBE_DIR={tmp_path / how}", "--env", "MB_PARITY=\u00e9 x=y",
            "--env", f"PYTHONPATH=rel{os.pathsep}{HERE}", "--umask", "027", "--nofile", "999",
            *(["--exec"] if how == "exec" else []), n=1)
    seen, rows = {}, {}
    for how, f in made.items():
        f.wait_line("^FLEET STARTED", 30)
        seen[how] = _wait_file(tmp_path / how / "w.0.json", 10)
        rows[how] = f.table()[0]
        cmdline, comm = _title(rows[how]["pid"])
        assert cmdline == f"multibus: w.0 [{f.name}]"  # ps
        assert comm == "multibus: w.0 ["[:15]  # top: the kernel keeps 15 characters
    assert rows["fork"]["launch"] == "fork"
    assert rows["exec"]["launch"] == "exec (zygote disabled)"
    fork, execd = seen["fork"], seen["exec"]
    for d in (fork, execd):
        d["environ"].pop("MB_PROBE_DIR")
    assert fork["environ"]["MB_PARITY"] == "\u00e9 x=y"
    assert fork["sys_path"][:3] == [str(tmp_path), str(tmp_path / "rel"), str(HERE)]
    assert fork["umask"] == "0027" and fork["rlimits"]["RLIMIT_NOFILE"][0] == 999
    assert fork["sigmask"] == [] and fork["signals"]["SIGINT"] == "default_int_handler"
    assert fork["threads"] == 1
    for key in execd:
        assert fork[key] == execd[key], key
    for f in made.values():
        _stop_ok(f)


@pytest.mark.timeout(60)
def test_a_module_written_after_the_zygote_listed_its_directory_is_found(fleets, tmp_path):
    """As by a fresh exec: a worker forked after a module was added sees it, even where the
    directory's mtime does not tell (the zygote drops its import caches before it forks)."""
    code, out = tmp_path / "code", tmp_path / "out"
    code.mkdir()
    out.mkdir()
    (code / "lateprobe.py").write_text(
        "import os\n"
        "def run(bus):\n"
        "    try:\n"
        "        import late_mod  # noqa: F401\n"
        "        seen = 'found'\n"
        "    except ImportError:\n"
        "        seen = 'missing'\n"
        "    path = os.path.join(os.environ['MB_PROBE_DIR'], f'{os.getpid()}.txt')\n"
        "    with open(path + '.tmp', 'w') as f:\n"
        "        f.write(seen)\n"
        "    os.rename(path + '.tmp', path)\n")
    f = fleets[1]("--target", "lateprobe:run", "--zygote-preload", "lateprobe",
                  "--env", f"PYTHONPATH={code}", "--env", f"MB_PROBE_DIR={out}", n=1)
    f.wait_line("^FLEET STARTED", 30)
    first = f.table()[0]["pid"]
    assert (_wait_file_text(out / f"{first}.txt")) == "missing"
    listed = os.stat(code).st_mtime_ns
    (code / "late_mod.py").write_text("")
    os.utime(code, ns=(listed, listed))  # as if written within the same clock tick
    os.kill(first, signal.SIGKILL)  # its replacement is forked now
    deadline = time.monotonic() + 20
    while (pid := f.table()[0]["pid"]) in (first, None) or not (out / f"{pid}.txt").exists():
        assert time.monotonic() < deadline, "no replacement worker reported"
        time.sleep(0.02)
    assert (out / f"{pid}.txt").read_text() == "found"
    _stop_ok(f)


def _wait_file_text(path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.02)
    return path.read_text()


@pytest.mark.timeout(60)
def test_group_whose_env_changes_the_interpreter_is_execd_and_status_says_why(fleets):
    from multibus.commands import format_status
    from multibus.control import ControlClient, resolve_name

    _, make = fleets
    f = make("--env", "PYTHONHASHSEED=7", "--env", "LD_PRELOAD=libc.so.6", n=2)
    f.wait_line("^FLEET STARTED", 30)
    st = ControlClient(resolve_name(f.name), timeout=5).status()
    why = "exec (LD_PRELOAD set, PYTHONHASHSEED set)"
    assert [w["launch"] for w in st["workers"]] == [why, why]
    text = format_status(st).splitlines()
    assert text[1].split()[-1] == "LAUNCH" and text[2].endswith(why)
    _stop_ok(f)


def test_what_a_preload_did_to_signals_is_undone_in_a_worker_and_only_that():
    """The zygote notes once, after its preloads, which dispositions and whether the mask
    changed; a worker restores exactly those."""
    script = """
import signal, json
from multibus import zygote
zygote._record_inherited()
signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # what a preload might do
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
zygote._note_signal_changes()
noted = [int(s) for s, _ in zygote.INHERITED["restore"]], zygote.INHERITED["restore_mask"]
zygote._restore_signals()
print(json.dumps([noted, signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL,
                  sorted(map(int, signal.pthread_sigmask(signal.SIG_BLOCK, [])))]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert json.loads(out) == [[[int(signal.SIGUSR1)], True], True, []]


def test_exec_reason_names_the_start_up_variables():
    from multibus.zygote import exec_reason

    base = {"PATH": "/bin", "PYTHONPATH": "/a", "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"}
    assert exec_reason(dict(base, PYTHONPATH="/b", TZ="UTC", PYTHONBREAKPOINT="0"), base) is None
    assert exec_reason(dict(base, PYTHONOPTIMIZE="2"), base) == "PYTHONOPTIMIZE set"
    assert exec_reason(dict(base, LANG="fr_FR.UTF-8"), base) == "LANG changed"
    assert exec_reason(dict(base, MALLOC_ARENA_MAX="2", LC_ALL="C", PYTHONMALLOC="malloc",
                            PYTHONWARNINGS="error"), base) == \
        "LC_ALL set, MALLOC_ARENA_MAX set, PYTHONMALLOC set and 1 more"


def test_a_changed_home_forks_unless_either_home_has_user_site_packages(tmp_path):
    """A group run as another user gets that user's HOME; Python reads HOME at start-up only
    for the user site-packages, so the worker is forked unless either HOME has them."""
    import site

    from multibus.zygote import exec_reason

    old, new = tmp_path / "old", tmp_path / "new"
    base = {"PATH": "/bin", "HOME": str(old)}
    assert exec_reason(dict(base, HOME=str(new)), base) is None
    ver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    (new / ".local" / "lib" / ver / "site-packages").mkdir(parents=True)
    expected = "HOME changed" if site.ENABLE_USER_SITE else None
    assert exec_reason(dict(base, HOME=str(new)), base) == expected


@pytest.mark.timeout(60)
def test_start_timeout_counts_from_each_workers_own_spawn(fleets, tmp_path):
    """w.0's first process is slow and crashes: its replacement starts after the fleet's
    start_timeout (from the start) but within its own (from its spawn)."""
    _, make = fleets
    f = make("--target", "targets.probe:slow_then_crash_once", "--start-timeout", "3",
             "--env", f"MB_MARK={tmp_path / 'mark'}", "--env", "MB_SLOW=2",
             "--env", "MB_SLOW2=1.5", n=1)
    t0 = time.monotonic()
    f.wait_line("^FLEET STARTED", 30)
    assert time.monotonic() - t0 > 3  # longer than start_timeout in all
    assert f.table()[0]["restarts"] == 1
    _stop_ok(f)
