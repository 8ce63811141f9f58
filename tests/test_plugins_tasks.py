"""SimplePlugin, PerpetualTimer, BackgroundTask, Monitor, ThreadManager, LogBridge, Autoreloader."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
from progs.procio import wait_for

from multibus.bus import Bus
from multibus.plugins import (
    Autoreloader,
    BackgroundTask,
    LogBridge,
    Monitor,
    PerpetualTimer,
    SimplePlugin,
    ThreadManager,
)

pytestmark = pytest.mark.timeout(20)



# -- SimplePlugin -----------------------------------------------------------------------------

class Recorder(SimplePlugin):
    def __init__(self, bus):
        super().__init__(bus)
        self.calls = []

    def start(self):
        self.calls.append("start")

    def stop(self):
        self.calls.append("stop")

    def custom(self):
        self.calls.append("custom")


def test_simpleplugin_subscribes_existing_channels_only(bus):
    p = Recorder(bus).subscribe()
    bus.listeners.setdefault("custom", set())  # created after subscribe(): not picked up
    bus.publish("custom")
    bus.start()
    bus.stop()
    assert p.calls == ["start", "stop"]
    p.unsubscribe()
    bus.start()
    assert p.calls == ["start", "stop"]


def test_simpleplugin_explicit_channels_include_late_ones(bus):
    class Late(Recorder):
        channels = ("start", "custom")

    p = Late(bus).subscribe()
    bus.publish("custom")
    bus.start()
    bus.stop()  # 'stop' not in channels
    assert p.calls == ["custom", "start"]
    p.unsubscribe()
    bus.publish("custom")
    assert p.calls == ["custom", "start"]
    assert not bus.listeners["custom"]


def test_simpleplugin_priority_attribute_and_idempotent_subscribe(bus):
    order = []

    class A(SimplePlugin):
        def start(self):
            order.append("A")
        start.priority = 80

    class B(SimplePlugin):
        def start(self):
            order.append("B")
        start.priority = 10

    a = A(bus).subscribe()
    a.subscribe()
    B(bus).subscribe()
    bus.start()
    assert order == ["B", "A"]


# -- timers and tasks --------------------------------------------------------------------------

def test_perpetual_timer_repeats_and_cancels_promptly():
    ticks = threading.Semaphore(0)
    t = PerpetualTimer(0.01, ticks.release)
    t.start()
    try:
        for _ in range(3):
            assert ticks.acquire(timeout=2)
    finally:
        t.cancel()
        t.join(2)
    assert not t.is_alive() and t.daemon


def test_background_task_cancel_is_immediate_with_long_interval():
    task = BackgroundTask(3600, lambda: None)
    task.start()
    assert task.running
    t0 = time.monotonic()
    task.cancel()
    task.join(2)
    assert not task.is_alive()
    assert time.monotonic() - t0 < 0.5  # CherryPy's sleep loop would take an hour
    assert task.daemon


def test_background_task_logs_first_error_and_stops(bus):
    logs = []
    bus.subscribe("log", lambda msg, level: logs.append((level, msg)))

    def boom():
        raise RuntimeError("task failed")

    task = BackgroundTask(0.01, boom, bus=bus)
    task.start()
    task.join(5)
    assert not task.is_alive()
    errors = [m for lvl, m in logs if lvl == 40]
    assert len(errors) == 1 and "RuntimeError: task failed" in errors[0]


def test_monitor_runs_while_started_and_no_callback_after_stop(bus):
    ran = threading.Event()
    count = []
    m = Monitor(bus, lambda: (count.append(1), ran.set()), frequency=0.01, name="beat")
    m.subscribe()
    bus.start()
    assert ran.wait(2)
    assert m.thread is not None and m.thread.name == "beat" and m.thread.daemon
    thread = m.thread
    bus.stop()
    assert not thread.is_alive() and m.thread is None
    n = len(count)  # the thread is joined: no callback can run until the next start
    bus.start()
    assert wait_for(lambda: len(count) > n, 2)


def test_monitor_graceful_restarts_thread(bus):
    m = Monitor(bus, lambda: None, frequency=60)
    m.subscribe()
    bus.start()
    first = m.thread
    bus.graceful()
    assert m.thread is not None and m.thread is not first and not first.is_alive()


def test_monitor_frequency_zero_does_nothing(bus):
    m = Monitor(bus, lambda: None, frequency=0)
    m.subscribe()
    bus.start()
    assert m.thread is None


def test_thread_manager(bus):
    tm = ThreadManager(bus)
    tm.subscribe()
    assert {"acquire_thread", "start_thread", "release_thread", "stop_thread"} <= set(bus.listeners)
    started, stopped = [], []
    bus.subscribe("start_thread", started.append)
    bus.subscribe("stop_thread", stopped.append)

    def worker(release):
        bus.publish("acquire_thread")
        bus.publish("acquire_thread")  # once per thread
        if release:
            bus.publish("release_thread")

    for release in (True, False, False):
        t = threading.Thread(target=worker, args=(release,))
        t.start()
        t.join(5)
    assert started == [1, 2, 3]  # unique numbers, never reused
    assert stopped == [1]
    bus.start()
    bus.stop()
    assert sorted(stopped) == [1, 2, 3] and tm.threads == {}


# -- LogBridge -----------------------------------------------------------------------------------

def test_logbridge_keeps_level_and_traceback(bus, caplog):
    LogBridge(bus).subscribe()
    caplog.set_level(logging.DEBUG, logger="multibus")
    bus.log("hello", 30)
    try:
        raise KeyError("k")
    except KeyError:
        bus.log("failed", level=40, traceback=True)
    recs = [(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.name == "multibus"]
    assert recs[0] == ("multibus", 30, "hello")
    assert recs[1][1] == 40 and recs[1][2].startswith("failed\n") and "KeyError: 'k'" in recs[1][2]


def test_logbridge_custom_logger_and_no_recursion(bus):
    logger = logging.getLogger("multibus.test.custom")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    seen = []

    class Echo(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())
            bus.log("echo from handler")  # would recurse without the guard

    handler = Echo()
    logger.addHandler(handler)
    try:
        LogBridge(bus, logger).subscribe()
        bus.log("once", 20)
        assert seen == ["once"]
    finally:
        logger.removeHandler(handler)


# -- Autoreloader ----------------------------------------------------------------------------

def test_autoreloader_restarts_on_change(bus, tmp_path):
    watched = tmp_path / "conf.ini"
    watched.write_text("a=1\n")
    restarted = threading.Event()
    bus.restart = restarted.set  # don't re-exec the test runner
    reloader = Autoreloader(bus, frequency=0.01, match=r"^$")  # only our file
    reloader.files.add(str(watched))
    reloader.subscribe()
    bus.start()
    assert str(watched) in reloader.mtimes  # baseline taken at start
    st = os.stat(watched)
    os.utime(watched, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))  # older counts as a change
    assert restarted.wait(3)
    assert wait_for(lambda: reloader.thread is None or not reloader.thread.is_alive(), 3)


def test_autoreloader_sysfiles_match():
    reloader = Autoreloader(Bus(), match=r"^multibus\.plugins\.autoreload$")
    files = reloader.sysfiles()
    assert len(files) == 1 and next(iter(files)).endswith("autoreload.py")
