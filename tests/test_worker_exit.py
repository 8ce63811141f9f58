"""A connected worker's ways out when its parent goes: signals, deadlines, no deadlock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from multibus.bus import Bus
from multibus.transport.bridge import Bridge

HERE = Path(__file__).resolve().parent
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))


@pytest.fixture
def hub():
    bus = Bus()
    started = threading.Event()
    bus.subscribe("peer.state", lambda name, state: state == "STARTED" and started.set())
    bridge = Bridge(bus, role="hub", name=f"t{uuid.uuid4().hex[:8]}", heartbeat=None)
    bridge.subscribe()
    bus.start()
    bridge.command("start")
    try:
        yield bridge, started
    finally:
        bus.exit()


@pytest.mark.timeout(30)
def test_sigterm_storm_while_exiting_ends_the_worker(hub):
    """PDEATHSIG, the supervisor's escalation and a user's kill can all arrive while the worker
    is already exiting. Its SIGTERM handler takes no lock (a handler interrupting its own
    thread inside Event.set() deadlocked it: 1 in ~60 supervisor SIGKILLs), so it ends."""
    bridge, started = hub
    proc = subprocess.Popen(
        [sys.executable, "-m", "multibus.worker", "--parent-pid", str(os.getpid()),
         "--name", "w.0", "--target", "targets.jobs:job", "--heartbeat", "none",
         "--endpoints", bridge.endpoints.to_string()],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert started.wait(20), "the worker never reported STARTED"
        deadline = time.monotonic() + 3.0
        sent = 0
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                break
            sent += 1
        assert sent >= 1
        assert proc.wait(5) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
