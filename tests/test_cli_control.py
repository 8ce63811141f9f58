"""The control socket in-process: validation, queued transitions, answers while busy."""

from __future__ import annotations

import os
import threading
import time

import msgpack
import pytest
import zmq
from progs.procio import wait_for

from multibus.bus import Bus, states
from multibus.commands import format_status
from multibus.control import (
    Control,
    ControlClient,
    ControlError,
    NotRunning,
    control_path,
    decode_request,
    resolve_name,
    running_supervisors,
)
from multibus.logview import format_json, format_text, split_source
from multibus.opqueue import CANCELLED, MAX_QUEUED
from multibus.specs import WorkerSpec
from multibus.systemd import sd_notify
from multibus.transport.endpoints import private_ipc, remove_ipc


class FakeGroups:
    """Enough of a GroupOps: no group stopped on its own, no per-group status."""

    def down(self) -> list[str]:
        return []

    def release_all(self) -> None:
        pass


class FakeReloader:
    """No reload ever runs: nothing to interrupt."""

    def interrupt(self, why: str) -> None:
        pass


class FakeSupervisor:
    """Enough of a Supervisor for the Control plugin; its 'stop' can be held."""

    def __init__(self, bus: Bus, name: str) -> None:
        self.bus = bus
        self.name = name
        self.specs = {"job": WorkerSpec(name="job", target="m:f", count=2)}
        self.rows = [{"name": f"job.{i}", "group": "job", "pid": os.getpid(), "state": "STARTED",
                      "restarts": 0, "exit_code": None, "uptime": 1.0} for i in range(2)]
        self.hold = threading.Event()
        self.hold.set()
        self.stopping = threading.Event()
        self.scaled: list[tuple[str, int]] = []
        self.kills: list[tuple[str, str]] = []  # (worker, why) per kill, as the Supervisor's
        self.bridge = None  # no hub: no bridge counters
        self.groupops = FakeGroups()  # every group runs with the fleet (issue 16)
        self.config = None  # not run from a fleet file
        self.listening: dict = {}  # no [sockets.NAME] (issue 17)
        self.reloader = FakeReloader()
        bus.subscribe("stop", self.stop)

    def stop(self) -> None:
        self.stopping.set()
        assert self.hold.wait(10)

    def table(self):
        return list(self.rows)

    def scale(self, group: str, count: int) -> None:
        self.scaled.append((group, count))

    def group_status(self, group: str) -> dict:
        return {}


@pytest.fixture
def served():
    name = f"ctl{os.getpid()}x{time.monotonic_ns() % 100000}"
    endpoints = private_ipc(name)  # the hub name is ours, as after Supervisor.subscribe()
    bus = Bus()
    sup = FakeSupervisor(bus, name)
    control = Control(bus, sup, name=name).subscribe()
    bus.start()
    waiter = threading.Thread(target=bus.wait, args=(states.EXITING,), daemon=True)
    waiter.start()  # runs the queued transitions, like the main thread in block()
    try:
        yield bus, sup, control, ControlClient(name, timeout=5)
    finally:
        sup.hold.set()
        bus.defer(bus.exit)
        waiter.join(10)
        if bus.state is not states.EXITING:
            bus.exit()
        control.unsubscribe()
        remove_ipc(endpoints)


def test_status_and_queued_transitions(served):
    bus, sup, control, client = served
    st = client.status()
    assert st["name"] == client.name and st["state"] == "STARTED" and st["pid"] == os.getpid()
    assert [w["name"] for w in st["workers"]] == ["job.0", "job.1"]
    assert st["workers"][0]["memory_rss"] > 0
    assert client.name in running_supervisors()
    assert resolve_name(client.name) == client.name

    sup.hold.clear()
    stop = client.op("stop")
    assert sup.stopping.wait(5)
    # the fleet is busy stopping: every command is still answered at once
    t0 = time.monotonic()
    assert client.status()["state"] == "STOPPING"
    start = client.op("start")
    scale = client.scale("job", 5)
    assert client.request("op_status", op=start["op"])["state"] == "queued"
    queue = client.status()["queue"]
    assert [q["action"] for q in queue] == ["stop", "start", "scale"]
    assert queue[0]["state"] == "running"
    assert time.monotonic() - t0 < 2
    sup.hold.set()
    assert client.wait_op(stop["op"], 10)["state"] == "done"
    assert client.wait_op(start["op"], 10)["state"] == "done"
    assert client.wait_op(scale["op"], 10)["note"] == "job: 5 workers"
    assert sup.scaled == [("job", 5)] and bus.state is states.STARTED
    assert client.status()["groups"][0]["count"] == 5

    again = client.wait_op(client.op("start")["op"], 10)
    assert (again["state"], again["note"]) == ("done", "already STARTED")
    with pytest.raises(ControlError, match="no group 'web'; groups: job"):
        client.scale("web", 1)
    with pytest.raises(ControlError, match="no operation 99999"):
        client.request("op_status", op=99999)


def test_the_queue_is_bounded_and_status_stays_small(served):
    bus, sup, control, client = served
    sup.hold.clear()
    stop = client.op("stop")  # running, held: everything after it waits
    assert sup.stopping.wait(5)
    for count in range(MAX_QUEUED):
        client.scale("job", count)
    with pytest.raises(ControlError, match=rf"queue is full \({MAX_QUEUED} waiting\)"):
        client.scale("job", MAX_QUEUED)
    t0 = time.monotonic()
    st = client.status()
    assert time.monotonic() - t0 < 2
    assert len(st["queue"]) == MAX_QUEUED + 1  # the running stop and the waiting ops
    assert len(msgpack.packb(st)) < 64 * 1024
    sup.hold.set()
    assert client.wait_op(stop["op"], 10)["state"] == "done"


def test_identical_waiting_ops_coalesce_but_relative_scales_do_not(served):
    bus, sup, control, client = served
    sup.hold.clear()
    client.op("stop")
    assert sup.stopping.wait(5)
    assert client.op("start")["op"] == client.op("start")["op"]
    assert client.scale("job", 3)["op"] == client.scale("job", 3)["op"]
    assert client.scale("job", 3)["op"] != client.scale("job", 4)["op"]
    ttin = [control.queue("scale", group="job", delta=1) for _ in range(2)]
    assert ttin[0] is not ttin[1]  # two SIGTTINs are two more workers
    sup.hold.set()
    assert client.wait_op(ttin[1].id, 10)["state"] == "done"


def test_exit_cancels_the_waiting_ops_and_says_so(served):
    bus, sup, control, client = served
    sup.hold.clear()
    stop = client.op("stop")
    assert sup.stopping.wait(5)
    waiting = [client.op("start"), client.op("restart"), client.scale("job", 1)]
    leave = client.op("exit")
    assert leave["note"] == "cancelled 3 queued operations"
    for op in waiting:
        answer = client.request("op_status", op=op["op"])
        assert (answer["state"], answer["error"]) == ("failed", CANCELLED)
    exited = threading.Event()
    bus.subscribe("exit", exited.set)
    sup.hold.set()  # the stop ends; the exit runs next, nothing cancelled runs
    assert exited.wait(10)
    assert control.op(stop["op"]).state == "done"  # the exit itself is running now
    assert sup.scaled == [] and all(control.op(op["op"]).state == "failed" for op in waiting)


def test_logs_buffer_and_long_poll(served):
    bus, sup, control, client = served
    bus.log("job.0 | first")
    bus.log("job.1 | second", 30)
    bus.log("web.3 | other")
    recs, nxt = client.logs(0, "job")
    assert [(r[3], r[4], r[2]) for r in recs][-2:] == [("job.0", "first", 20),
                                                       ("job.1", "second", 30)]
    assert [r[4] for r in client.logs(0, "job.1")[0]] == ["second"]
    assert all(r[3] == "supervisor" for r in client.logs(0, "supervisor")[0])

    # a long poll returns as soon as a record arrives (not at the end of its wait)
    threading.Timer(0.2, lambda: bus.log("job.0 | late")).start()
    t0 = time.monotonic()
    recs, nxt2 = client.logs(nxt, "job", wait=5.0)
    assert [r[4] for r in recs] == ["late"] and nxt2 > nxt
    assert time.monotonic() - t0 < 2.5
    recs, _ = client.logs(nxt2, "job", wait=0.2)  # nothing new: empty after the wait
    assert recs == []


def test_an_ops_end_is_answered_when_it_ends_not_at_the_next_poll(served, monkeypatch):
    """'op_status' with 'wait' is held until the op ends, so `multibus stop` returns as
    soon as the stop is done; a client of an older supervisor (no 'wait') polls."""
    bus, sup, control, client = served
    sup.hold.clear()
    stop = client.op("stop")
    assert sup.stopping.wait(5)
    held = client.request("op_status", op=stop["op"], wait=0.2)  # not ended: after the wait
    assert held["state"] == "running"
    ended = []
    waiter = threading.Thread(target=lambda: ended.append(
        (client.wait_op(stop["op"], 10), time.monotonic())))
    waiter.start()
    try:
        assert wait_for(lambda: control.counters()["control"]["followers"] == 1, 5)
        released = time.monotonic()
        sup.hold.set()
    finally:
        sup.hold.set()
        waiter.join(10)
    (reply, at), = ended
    assert reply["state"] == "done"
    assert at - released < 1.0  # not the 5 s the request may be held
    assert control.counters()["control"]["followers"] == 0
    # an ended op is answered at once, waiting or not
    assert client.request("op_status", op=stop["op"], wait=5)["state"] == "done"

    from multibus import commands

    monkeypatch.setattr(commands.OpStatus, "optional", {})  # a supervisor from before 'wait'
    old = ControlClient(client.name, timeout=5)
    assert old.wait_op(client.op("start")["op"], 10)["state"] == "done"
    assert not old._holds


def test_logs_of_an_unknown_name_fail_as_scale_does(served, capsys):
    """`multibus logs nosuch` and `logs job.9` fail (one line, exit 1) as `scale nosuch 3`
    does, instead of printing nothing with exit 0 (issue 15)."""
    from multibus.cli import main

    bus, sup, control, client = served
    for argv in (["scale", "nosuch", "3"], ["logs", "nosuch"], ["logs", "nosuch.1", "-f"],
                 ["logs", "job.9"], ["logs", "job.9", "-n", "0"]):
        assert main([*argv, "--name", client.name]) == 1, argv
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1, (argv, err)
        expected = ("multibus: no worker 'job.9'; workers of job: job.0, job.1"
                    if "job.9" in argv else "multibus: no group 'nosuch'; groups: job")
        assert err.strip() == expected, argv
    # known names: a group, a running worker, one that has left but logged, the supervisor
    bus.log("job.7 | scaled away")
    for source in ("job", "job.1", "job.7", "supervisor"):
        assert main(["logs", source, "--name", client.name]) == 0, source
    assert any(ln.split()[1:] == ["job.7", "|", "scaled", "away"]
               for ln in capsys.readouterr().out.splitlines())


def test_status_lists_groups_in_fleet_file_order(served):
    """Groups as the fleet file orders them (web before api), not alphabetically (issue 15)."""
    bus, sup, control, client = served
    sup.specs = {g: WorkerSpec(name=g, target="m:f", count=2) for g in ("web", "api")}
    sup.rows = [{"name": f"{g}.{i}", "group": g, "pid": os.getpid(), "state": "STARTED",
                 "restarts": 0, "exit_code": None, "uptime": 1.0}
                for g in ("api", "web") for i in (1, 0)]
    st = client.status()
    assert [w["name"] for w in st["workers"]] == ["web.0", "web.1", "api.0", "api.1"]
    assert [g["name"] for g in st["groups"]] == ["web", "api"]
    assert [ln.split()[1] for ln in format_status(st).splitlines()[2:]] == [
        "web.0", "web.1", "api.0", "api.1"]


def test_invalid_requests_are_answered_and_counted(served):
    bus, sup, control, client = served
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{control_path(client.name)}")
    try:
        bad = [
            b"\xc1garbage",
            msgpack.packb([1, 2, 3]),
            msgpack.packb({"v": 2, "id": 1, "cmd": "status"}),
            msgpack.packb({"v": 1, "id": -1, "cmd": "status"}),
            msgpack.packb({"v": 1, "id": 1, "cmd": "shutdown"}),
            msgpack.packb({"v": 1, "id": 1, "cmd": "status", "extra": 1}),
            msgpack.packb({"v": 1, "id": 1, "cmd": "op", "action": "reboot"}),
            msgpack.packb({"v": 1, "id": 1, "cmd": "scale", "group": "job", "count": "3"}),
            msgpack.packb({"v": 1, "id": 1, "cmd": "logs", "since": 0, "group": None,
                           "limit": 10**6, "wait": 0}),
            msgpack.packb({"v": 1, "id": 1, "cmd": "status", "x": msgpack.ExtType(1, b"")}),
        ]
        for frame in bad:
            sock.send(frame)
            assert sock.poll(5000), frame
            reply = msgpack.unpackb(sock.recv())
            assert reply["ok"] is False and reply["error"].startswith("invalid request: ")
        sock.send(b"x" * (70 * 1024))  # over MAXMSGSIZE: the connection is dropped, no reply
    finally:
        sock.close(0)
    assert control.invalid >= len(bad)
    assert client.status()["state"] == "STARTED"  # the server survived all of it


def test_decode_request_accepts_each_command():
    for req in ({"cmd": "status"}, {"cmd": "op", "action": "graceful"},
                {"cmd": "scale", "group": "job", "count": 0}, {"cmd": "op_status", "op": 3},
                {"cmd": "op_status", "op": 3, "wait": 2.5},
                {"cmd": "logs", "since": 5, "group": "job.1", "limit": 1, "wait": 1.5}):
        assert decode_request(msgpack.packb({"v": 1, "id": 7, **req}))["cmd"] == req["cmd"]


def test_not_running_and_name_resolution():
    client = ControlClient("nobody-here-xyz", timeout=1)
    with pytest.raises(NotRunning, match="no supervisor named 'nobody-here-xyz' is running"):
        client.status()
    assert resolve_name("given") == "given"


def test_log_formats():
    assert split_source("job.12 | hello | world") == ("job.12", "hello | world")
    assert split_source("Bus STARTED") == ("supervisor", "Bus STARTED")
    rec = (1, 0.0, 40, "job.1", "boom\nline two")
    text = format_text(rec, colour=False, width=8)
    assert text.splitlines()[0].endswith("  job.1    | ERROR boom")
    assert text.splitlines()[1].endswith("  job.1    | ERROR line two")
    assert "\x1b[" in format_text(rec, colour=True) and "\x1b[" not in text
    import json

    obj = json.loads(format_json(rec))
    assert (obj["level"], obj["source"], obj["group"], obj["index"], obj["message"]) == (
        "ERROR", "job.1", "job", 1, "boom\nline two")
    assert json.loads(format_json((1, 0.0, 20, "supervisor", "x")))["group"] is None


def test_format_status_table():
    st = {"name": "f", "pid": 1, "state": "STARTED", "uptime": 75.0, "queue": [
        {"op": 1, "action": "stop", "args": {}, "state": "running"}], "workers": [
        {"group": "job", "name": "job.0", "index": 0, "pid": 42, "state": "STARTED",
         "restarts": 2, "exit_code": None, "uptime": 3725.0, "cpu_percent": 1.25,
         "memory_rss": 20 * 1024 * 1024},
        {"group": "job", "name": "job.1", "index": 1, "pid": None, "state": "EXITED",
         "restarts": 0, "exit_code": 3, "uptime": 0.0, "cpu_percent": None,
         "memory_rss": None}]}
    lines = format_status(st).splitlines()
    assert lines[0] == "f (pid 1): STARTED, 2 workers, up 1m15s"
    assert lines[1] == "  running: stop"
    assert lines[2].split() == ["GROUP", "WORKER", "PID", "STATE", "RESTARTS", "UPTIME", "CPU%",
                                "MEM"]
    assert lines[3].split() == ["job", "job.0", "42", "STARTED", "2", "1h02m", "1.2", "20.0M"]
    assert lines[4].split() == ["job", "job.1", "-", "EXITED", "(3)", "0", "-", "-", "-"]


def test_sd_notify(tmp_path):
    import socket

    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert s.recv(100) == b"READY=1"
    assert not sd_notify("READY=1", {})
    assert not sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")})
    name = f"mbtest{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        assert sd_notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(100) == b"STOPPING=1"


def test_log_printer_never_blocks_the_caller():
    from multibus.logprinter import LogPrinter

    class Stuck:
        def __init__(self) -> None:
            self.gate = threading.Event()
            self.lines: list[str] = []

        def write(self, text: str) -> None:
            assert self.gate.wait(10)
            self.lines.append(text)

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return False

    stream = Stuck()
    printer = LogPrinter(20, "text", stream, max_queue=100).start()
    t0 = time.monotonic()
    for i in range(1000):
        printer(f"job.0 | line {i}", 20)
    printer("debug line", 10)  # below the level: filtered
    assert time.monotonic() - t0 < 1  # the terminal is stuck; the listener is not
    assert printer.dropped >= 800
    stream.gate.set()
    printer.close()
    text = "".join(stream.lines)
    assert "line 0\n" in text and "debug line" not in text
    assert f"{printer.dropped} log lines dropped (output too slow)" in text


@pytest.mark.timeout(60)
def test_stop_that_had_to_kill_says_which_and_why_and_exits_1(capsys):
    """`multibus stop` when a worker ignores its stop: the op fails naming it, exit 1."""
    import argparse
    import uuid
    from pathlib import Path

    from multibus.commands import _finish
    from multibus.supervisor import Supervisor

    here = Path(__file__).resolve().parent
    bus = Bus()
    spec = WorkerSpec(name="w", target="targets.jobs:stubborn", count=1, stop_timeout=0.3,
                      env={"PYTHONPATH": os.pathsep.join([str(here), str(here.parent)])})
    sup = Supervisor(bus, [spec], name=f"t{uuid.uuid4().hex[:8]}", pidfile=False,
                     subreaper=False, term_timeout=0.3).subscribe()
    Control(bus, sup).subscribe()  # unsubscribes itself at the bus's exit
    waiter = threading.Thread(target=bus.wait, args=(states.EXITING,), daemon=True)
    try:
        bus.start()
        waiter.start()  # runs the queued transitions, like the main thread in block()
        client = ControlClient(sup.name, timeout=5)
        code = _finish(client, client.op("stop"), "stop",
                       argparse.Namespace(no_wait=False, timeout=30))
    finally:
        bus.defer(bus.exit)
        waiter.join(20)
        if bus.state is not states.EXITING:
            bus.exit()
    assert code == 1
    err = capsys.readouterr().err
    assert f"{sup.name}: stop failed: 1 worker had to be killed" in err
    assert "w.0 (did not stop within 0.3s: SIGTERM, then SIGKILL)" in err


def _long_poll(client: ControlClient, sock: zmq.Socket, rid: int) -> None:
    """Send a 'logs' request that waits (nothing new after the last seq) on ``sock``."""
    since = client.logs(0)[1]
    sock.send(msgpack.packb({"v": 1, "id": rid, "cmd": "logs", "since": since,
                             "group": None, "limit": 10, "wait": 5}))


def test_followers_past_the_limit_are_refused_not_answered_at_once(served, monkeypatch,
                                                                   capsys):
    """A 65th `logs -f` used to get an empty answer at once, and asked again at once: both
    processes spun. Now it is refused in one line naming the limit (issue 14, part 6)."""
    from multibus import commands
    from multibus.cli import main

    bus, sup, control, client = served
    monkeypatch.setattr(commands, "MAX_FOLLOWERS", 2)
    ctx = zmq.Context.instance()
    socks = [ctx.socket(zmq.DEALER) for _ in range(2)]
    try:
        for i, sock in enumerate(socks):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"ipc://{control_path(client.name)}")
            _long_poll(client, sock, 100 + i)
        assert wait_for(lambda: control.counters()["control"]["followers"] == 2, 5)
        with pytest.raises(ControlError, match="2 `multibus logs -f` are following already"):
            next(iter(client.follow(backlog=0)))
        assert main(["logs", "-f", "--name", client.name]) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "stop one of them" in err
        assert not any(sock.poll(0) for sock in socks)  # the two still wait
        bus.log("job.0 | news")  # and are answered when a record comes
        for sock in socks:
            assert sock.poll(5000)
            assert [r[4] for r in msgpack.unpackb(sock.recv())["records"]] == ["news"]
    finally:
        for sock in socks:
            sock.close(0)
    assert control.counters()["control"]["refused"] == 2


def test_counters_are_in_status_json_and_summarised(served, capsys):
    """Invalid and refused control requests and the hub bridge's trouble counters are in
    `status --json` and summarised in one line by `multibus status` (issue 14, part 6)."""
    import json
    import types

    from multibus.cli import main

    bus, sup, control, client = served
    st = client.status()
    assert st["counters"] == {"control": {"invalid": 0, "refused": 0, "followers": 0,
                                          "paused": 0, "listening": 1}, "bridge": {}}
    assert not any("counters:" in ln for ln in format_status(st).splitlines())
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{control_path(client.name)}")
    try:
        for _ in range(3):
            sock.send(b"\xc1garbage")
            assert sock.poll(5000)
            sock.recv()
    finally:
        sock.close(0)
    with pytest.raises(ControlError, match="no group"):
        client.scale("nosuch", 1)
    sup.bridge = types.SimpleNamespace(stats=lambda: {
        "sent": 7, "invalid": 2, "gaps": 1, "lost": 4, "dropped": 0, "zap_refused": 5})
    assert main(["status", "--json", "--name", client.name]) == 0
    counters = json.loads(capsys.readouterr().out)["counters"]
    assert counters == {"control": {"invalid": 3, "refused": 1, "followers": 0, "paused": 0,
                                    "listening": 1},
                        "bridge": {"invalid": 2, "gaps": 1, "lost": 4, "dropped": 0,
                                   "zap_refused": 5}}
    assert main(["status", "--name", client.name]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == ("  counters: 3 invalid control requests, 1 refused control request, "
                      "2 invalid frames, 1 gap, 4 lost messages, 5 refused CURVE keys")
    # and the invalid requests left a trace in the log (rate-limited)
    assert sum("invalid request" in r[4] for r in control.records()[0]) == 3


def test_a_scale_past_the_descriptor_budget_is_refused_naming_the_limit(served, monkeypatch):
    """`scale job N` that would not fit in RLIMIT_NOFILE is refused at once, naming the limit
    and how to raise it; the fleet is untouched (issue 14, part 3)."""
    from multibus import fdbudget

    bus, sup, control, client = served
    monkeypatch.setattr(fdbudget, "limit", lambda: 1024)
    with pytest.raises(ControlError) as err:
        client.scale("job", 200)
    msg = str(err.value)
    assert msg.startswith("scale job 200: 200 workers need about ") and "\n" not in msg
    assert "limit of 1024" in msg and "ulimit -n" in msg and "LimitNOFILE=" in msg
    assert sup.scaled == [] and client.status()["queue"] == []
    done = client.wait_op(client.scale("job", 179)["op"], 10)  # what fits is queued and run
    assert done["state"] == "done" and sup.scaled == [("job", 179)]


def test_worker_usage_is_read_once_per_refresh_interval(monkeypatch):
    """Status asked again within USAGE_REFRESH shows the same reading without reading
    /proc again (status polled while 1,000 workers start); after it, a fresh one."""
    import types

    import multibus.control as control

    clock = [1000.0]
    monkeypatch.setattr(control, "time", types.SimpleNamespace(
        monotonic=lambda: clock[0], clock_gettime=time.clock_gettime,
        CLOCK_BOOTTIME=time.CLOCK_BOOTTIME))
    reads = []
    monkeypatch.setattr(control, "os", types.SimpleNamespace(
        open=lambda path, *a: (reads.append(path), os.open(path, *a))[1],
        read=os.read, close=os.close, O_RDONLY=os.O_RDONLY))
    ctl = types.SimpleNamespace(_procs={})
    cpu, rss = Control._usage(ctl, os.getpid())
    assert rss > 1_000_000 and cpu is not None and cpu >= 0
    clock[0] += control.USAGE_REFRESH / 2
    assert Control._usage(ctl, os.getpid()) == (cpu, rss)
    assert len(reads) == 1
    clock[0] += control.USAGE_REFRESH
    Control._usage(ctl, os.getpid())
    assert len(reads) == 2
    assert Control._usage(ctl, 0) == (None, None)
