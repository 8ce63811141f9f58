"""examples/quickstart.py: heartbeat, PID file, Ctrl-C exits 0 and removes the PID file."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from progs.procio import Child, wait_for

from multibus.plugins import read_pidfile

EXAMPLE = str(Path(__file__).resolve().parent.parent / "examples" / "quickstart.py")


@pytest.mark.timeout(30)
def test_quickstart_heartbeat_then_ctrl_c(tmp_path):
    pidfile = tmp_path / "quickstart.pid"
    with Child(EXAMPLE, "--pidfile", str(pidfile), "--interval", "0.2") as child:
        assert child.expect("PID file:") == f"PID file: {pidfile}"
        assert wait_for(lambda: any(ln.endswith("quickstart: heartbeat") for ln in child.stderr),
                        timeout=10), child.stderr
        assert read_pidfile(pidfile) == child.pid
        with Child(EXAMPLE, "--pidfile", str(pidfile)) as second:
            assert second.wait() == 1
            assert any(f"pid {child.pid}" in ln for ln in second.stderr), second.stderr
            # the expected refusal is one line, no traceback (issue 15)
            assert len(second.stderr) == 1, second.stderr
            assert second.stderr[0].startswith("quickstart: PID file "), second.stderr
        child.signal(signal.SIGINT)
        assert child.wait() == 0
        assert not any("Traceback" in ln for ln in child.stderr), child.stderr
    assert not pidfile.exists()
