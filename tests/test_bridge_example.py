"""examples/bank_broker.py end to end: orders mirrored, broker logs relayed, Ctrl-C clean."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "bank_broker.py"


@pytest.mark.timeout(40)
def test_bank_broker_orders_logs_and_ctrl_c():
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--tick", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines: list[str] = []
    placed = threading.Event()
    joined = threading.Event()
    broker_pids: list[int] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if re.fullmatch(r"broker \| (BUY|SELL) order placed for \d+ [A-Z]+", lines[-1]):
                placed.set()
            m = re.fullmatch(r"bank +\| broker joined \(pid (\d+)\)", lines[-1])
            if m:
                broker_pids.append(int(m.group(1)))
                joined.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    broker_pid = None
    try:
        # (an order may be placed before the hub has seen the broker's sync reply: wait for both)
        assert placed.wait(20) and joined.wait(5), "\n".join(lines)
        broker_pid = broker_pids[0]
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does to the bank's process group
        assert proc.wait(15) == 0
        reader.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if broker_pid is not None and psutil.pid_exists(broker_pid):
            try:
                psutil.Process(broker_pid).kill()
            except psutil.Error:
                pass
    text = "\n".join(lines)
    assert "bank   | Bus EXITED" in text
    assert "broker | Bus EXITED" in text
    assert "bank   | broker exited with code 0" in text
    # one record per line, never two run together (`broker gone: exitedbroker | Bus EXITED`)
    assert all(re.match(r"(bank  |broker) \| ", ln) for ln in lines), text
    assert not any(re.search(r"(bank  |broker) \| .*(bank  |broker) \| ", ln) for ln in lines), text
    assert wait_gone(broker_pid, 3), "the broker outlived the bank"


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
