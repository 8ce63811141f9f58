"""Log files (issue 16, item 6): `log_file` under [supervisor] and per group, rotation at
`log_max_bytes` keeping `log_backups`, SIGUSR1 reopens (logrotate), text or JSON lines.

Black-box: `multibus run FLEET.toml` in the background (tests/test_cli.py's harness), the
files read as a user would."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from test_cli import ROOT, all_started, mb, output, running, status, unique, wait_for

from multibus.logfiles import LogFile, LogFiles

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  (\S+) *\| (.*)$")


def fleet_file(tmp_path: Path, name: str, supervisor: str = "", groups: str = "") -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(f'[supervisor]\nname = "{name}"\npythonpath = ["{ROOT / "tests"}"]\n'
                    f"{supervisor}\n{groups}")
    return path


def chatty(group: str, count: int, lines: int, extra: str = "") -> str:
    return (f'[groups.{group}]\ntarget = "targets.chatty:lines"\ncount = {count}\n'
            f'env = {{ MB_LINES = "{lines}" }}\n{extra}\n')


def text_records(path: Path) -> list[tuple[str, str]]:
    """(source, message) of each line; every line must be a text record."""
    out = []
    for line in path.read_text().splitlines():
        m = TEXT_LINE.match(line)
        assert m, f"not a text record: {line!r}"
        out.append((m.group(1), m.group(2)))
    return out


def has(path: Path, *texts: str) -> bool:
    return path.exists() and all(t in path.read_text() for t in texts)


def numbered(records: list[tuple[str, str]], worker: str) -> list[str]:
    """``worker``'s own output lines ('line N' and 'done'), in file order."""
    return [m.removeprefix(f"{worker} ") for s, m in records
            if s == worker and m.startswith(f"{worker} ")]


@pytest.mark.timeout(90)
def test_each_group_file_takes_its_workers_in_order_and_the_fleet_file_takes_all(tmp_path):
    name = unique("lf")
    (tmp_path / "logs").mkdir()
    path = fleet_file(tmp_path, name, 'log_file = "logs/fleet.log"',  # relative to the file
                      chatty("a", 2, 200, 'log_file = "a.log"')
                      + chatty("b", 1, 200, 'log_file = "b.log"'))
    fleet_log, a_log, b_log = tmp_path / "logs/fleet.log", tmp_path / "a.log", tmp_path / "b.log"
    with running(str(path)) as (proc, log):
        wait_for(lambda: all_started(name, 3), 30, "3 workers STARTED")
        wait_for(lambda: has(fleet_log, "a.0 done", "a.1 done", "b.0 done"), 20,
                 "every worker's lines in the fleet file")
        terminal = output(log)
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(20) == 0
    expected = [f"line {i}" for i in range(200)] + ["done"]
    every, a, b = text_records(fleet_log), text_records(a_log), text_records(b_log)
    assert {s for s, _ in a} == {"a.0", "a.1"} and {s for s, _ in b} == {"b.0"}
    for records, workers in ((every, ("a.0", "a.1", "b.0")), (a, ("a.0", "a.1")), (b, ("b.0",))):
        for worker in workers:
            assert numbered(records, worker) == expected, worker
    assert ("supervisor", "Bus STARTED") in every and ("supervisor", "Bus EXITED") in every
    assert ("a.0", "Bus STARTED") in a and ("b.0", "Bus STARTED") not in a
    # the terminal output is as it was: HH:MM:SS.mmm, no date
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3}  a\.0 +\| a\.0 line 0$", terminal, re.M)


@pytest.mark.timeout(90)
def test_rotation_at_log_max_bytes_keeps_log_backups_files(tmp_path):
    name = unique("lr")
    path = fleet_file(tmp_path, name, 'log_file = "fleet.log"\nlog_max_bytes = 4000\n'
                      "log_backups = 2", chatty("w", 1, 600))
    fleet_log = tmp_path / "fleet.log"
    with running(str(path)) as (proc, log):
        wait_for(lambda: has(fleet_log, "w.0 done"), 30, "the last line in fleet.log")
    files = sorted(p.name for p in tmp_path.glob("fleet.log*"))
    assert files == ["fleet.log", "fleet.log.1", "fleet.log.2"]
    for name_ in files:
        assert 0 < (tmp_path / name_).stat().st_size <= 4000, name_
    kept = numbered(text_records(tmp_path / "fleet.log.2") + text_records(tmp_path / "fleet.log.1")
                    + text_records(fleet_log), "w.0")
    assert kept[-1] == "done" and len(kept) > 100
    numbers = [int(k.removeprefix("line ")) for k in kept[:-1]]
    assert numbers == list(range(numbers[0], 600))  # the newest lines, none lost between files


@pytest.mark.timeout(90)
def test_sigusr1_reopens_the_files_after_logrotate_moved_them(tmp_path):
    name = unique("lu")
    path = fleet_file(tmp_path, name, 'log_file = "fleet.log"',
                      chatty("w", 1, 1, 'log_file = "w.log"'))
    fleet_log, w_log = tmp_path / "fleet.log", tmp_path / "w.log"
    with running(str(path)) as (proc, log):
        wait_for(lambda: all_started(name, 1), 30, "the worker STARTED")
        wait_for(lambda: has(fleet_log, "supervisor | Bus STARTED"), 10, "Bus STARTED")
        fleet_log.rename(tmp_path / "fleet.log.old")  # what logrotate does, then postrotate:
        w_log.rename(tmp_path / "w.log.old")
        assert mb("graceful", "--name", name).returncode == 0
        wait_for(lambda: has(tmp_path / "fleet.log.old", "supervisor | Bus graceful"), 10,
                 "records still going to the moved file before the signal")
        wait_for(lambda: has(tmp_path / "w.log.old", "w.0  | Bus graceful"), 10,
                 "the worker's record in its moved file before the signal")
        assert not fleet_log.exists()
        proc.send_signal(signal.SIGUSR1)  # kill -USR1 $(cat fleet.pid)
        wait_for(lambda: has(fleet_log, "log files reopened"), 10, "a new fleet.log")
        assert mb("graceful", "--name", name).returncode == 0
        wait_for(lambda: has(fleet_log, "supervisor | Bus graceful"), 10, "graceful, new file")
        wait_for(lambda: has(w_log, "w.0  | Bus graceful"), 10, "the group's new file")
        assert proc.poll() is None  # SIGUSR1 does not end the supervisor
    old = (tmp_path / "fleet.log.old").read_text()
    assert old.count("supervisor | Bus graceful") == 1 and "log files reopened" not in old
    assert "Caught signal SIGUSR1" in old  # said before the reopen, so in the old file
    assert (tmp_path / "w.log.old").read_text().count("Bus graceful") == 1
    assert fleet_log.read_text().count("supervisor | Bus graceful") == 1


@pytest.mark.timeout(90)
def test_json_lines_parse_with_time_level_source_group_pid(tmp_path):
    name = unique("lj")
    path = fleet_file(tmp_path, name, 'log_format = "json"\nlog_file = "fleet.log"',
                      chatty("a", 2, 5, 'log_file = "a.log"'))
    with running(str(path)) as (proc, log):
        st = wait_for(lambda: all_started(name, 2), 30, "2 workers STARTED")
        wait_for(lambda: has(tmp_path / "a.log", "a.0 done", "a.1 done"), 20, "a's lines")
        pids = {w["name"]: w["pid"] for w in st["workers"]}
        assert mb("exit", "--name", name).returncode == 0
        assert proc.wait(20) == 0
        terminal = output(log)
    keys = ["time", "level", "source", "group", "index", "pid", "message"]
    recs = [json.loads(line) for line in (tmp_path / "fleet.log").read_text().splitlines()]
    assert recs and all(list(r) == keys for r in recs)
    sup = [r for r in recs if r["source"] == "supervisor"]
    assert sup and all(r["pid"] == proc.pid and r["group"] is None for r in sup)
    workers = [r for r in recs if r["source"] != "supervisor"]
    assert {r["source"] for r in workers} == {"a.0", "a.1"}
    assert all(r["pid"] == pids[r["source"]] and r["group"] == "a" for r in workers)
    assert any(r["level"] == "INFO" and r["message"] == "a.1 line 4" and r["index"] == 1
               for r in workers)
    group = [json.loads(line) for line in (tmp_path / "a.log").read_text().splitlines()]
    assert group == workers  # the group's file: the same records
    assert '"pid"' not in terminal  # the terminal's JSON lines are as they were


@pytest.mark.parametrize("supervisor, groups, expected", [
    ('log_file = "nodir/fleet.log"', "", "supervisor.log_file: cannot open log file "),
    ("", 'log_file = "."', "groups.w.log_file: cannot open log file "),
    ('log_max_bytes = "lots"', "", "supervisor.log_max_bytes: expected a size"),
    ('log_max_bytes = "1MB"\nlog_backups = 0', "", "supervisor.log_backups: expected an "
     "integer >= 1 when log_max_bytes is set"),
])
def test_a_bad_log_file_exits_2_with_one_line_and_starts_nothing(tmp_path, supervisor, groups,
                                                                 expected):
    name = unique("lb")
    path = fleet_file(tmp_path, name, supervisor, chatty("w", 1, 1, groups))
    r = mb("run", str(path))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"multibus: {path}: ") and expected in lines[0]
    assert status(name) is None
    assert not (tmp_path / "nodir").exists()


def test_a_write_error_is_said_once_and_lines_go_on(tmp_path):
    said: list[str] = []
    files = LogFiles(20, "text", LogFile(str(tmp_path / "f.log")), {},
                     on_error=said.append)
    try:
        files("supervisor line 1")
        files.fleet.handler.stream.close()
        files.fleet.handler.stream = open("/dev/full", "w")  # noqa: SIM115 - the disk is full
        files("supervisor line 2")
        files("supervisor line 3")
        assert said == [f"cannot write log file {tmp_path / 'f.log'}: No space left on device"]
        files.reopen()
        files("supervisor line 4")
        assert "supervisor line 4" in (tmp_path / "f.log").read_text()
    finally:
        files.close()
