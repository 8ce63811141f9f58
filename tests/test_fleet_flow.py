"""Issue 14, part 2, in a real fleet: bank, broker and a third worker mirror 'order'; the third's
listener blocks forever. The broker keeps receiving, scale works, a killed worker's
replacement joins, and the stuck one shows as such (or is restarted: slow_peer='restart')."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path

import pytest
from progs.procio import wait_for

from multibus.bus import Bus
from multibus.specs import WorkerSpec
from multibus.supervisor import Supervisor

HERE = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}


@pytest.fixture
def orders_fleet(request):
    """A started in-process supervisor of bank, broker and stuck, whose groups have the
    ``slow_peer`` policy given as the (indirect) parameter."""
    bus = Bus()
    logs: list[str] = []
    bus.subscribe("log", lambda msg, level=20: logs.append(msg))
    specs = [WorkerSpec(name=name, target=f"targets.jobs:order_{name}", env=ENV,
                        channels=("order",), stop_timeout=2.0, slow_peer=request.param)
             for name in ("bank", "broker", "stuck")]
    sup = Supervisor(bus, specs, name=f"t{uuid.uuid4().hex[:8]}", pidfile=False,
                     subreaper=False, term_timeout=1.0).subscribe()
    try:
        bus.start()
        yield sup, logs
    finally:
        try:
            bus.exit()
        finally:
            sup.kill_all()  # whatever did not exit (none expected)


def broker_count(logs: list[str], name: str = "broker.0") -> int:
    counts = [int(m.group(1)) for line in list(logs)
              if (m := re.match(rf"{re.escape(name)} \| orders (\d+)$", line))]
    return max(counts, default=0)


def row(sup: Supervisor, name: str) -> dict:
    return next(r for r in sup.table() if r["name"] == name)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("orders_fleet", ["drop"], indirect=True)
def test_stuck_worker_blocks_nobody_and_shows_as_stuck(orders_fleet):
    sup, logs = orders_fleet
    # the stuck one fills its pipes, then stays 5 s (send_timeout) without progress
    assert wait_for(lambda: "stuck" in row(sup, "stuck.0"), 40), sup.table()
    assert "not reading" in row(sup, "stuck.0")["stuck"]
    assert row(sup, "stuck.0")["state"] == "STARTED"  # still running: its policy is drop
    # the healthy broker keeps receiving orders at the bank's rate (4000/s)
    n0, t0 = broker_count(logs), time.monotonic()
    assert wait_for(lambda: broker_count(logs) >= n0 + 4000, 10), (n0, broker_count(logs))
    rate = (broker_count(logs) - n0) / (time.monotonic() - t0)
    print(f"healthy broker with a stuck peer: {rate:.0f} orders/s")
    # scale works, and a SIGKILLed worker's replacement joins
    sup.scale("broker", 2)
    assert row(sup, "broker.1")["state"] == "STARTED"
    old = row(sup, "broker.0")["pid"]
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: row(sup, "broker.0")["pid"] not in (None, old)
                    and row(sup, "broker.0")["state"] == "STARTED", 15), sup.table()
    assert wait_for(lambda: broker_count(logs, "broker.1") >= 1000, 10)
    assert "stuck" not in row(sup, "broker.1")
    assert sum("'stuck.0' is slow" in line for line in logs) == 1  # once per episode


@pytest.mark.timeout(90)
@pytest.mark.parametrize("orders_fleet", ["restart"], indirect=True)
def test_slow_peer_restart_policy_restarts_the_stuck_worker(orders_fleet):
    sup, logs = orders_fleet
    first = row(sup, "stuck.0")["pid"]
    assert wait_for(lambda: row(sup, "stuck.0")["restarts"] >= 1, 40), sup.table()
    assert any("worker stuck.0 is stuck" in line for line in logs), logs
    assert wait_for(lambda: row(sup, "stuck.0")["pid"] not in (None, first), 15)
    assert row(sup, "broker.0")["restarts"] == 0 and broker_count(logs) > 0


def test_slow_peer_is_a_group_setting_checked_up_front():
    from multibus.config import ConfigError, from_mapping
    from multibus.specs import SpecError

    cfg = from_mapping({"groups": {"a": {"target": "m:f", "slow_peer": "restart"},
                                   "b": {"target": "m:f"}}})
    assert [s.slow_peer for s in cfg.specs] == ["restart", "drop"]
    with pytest.raises(ConfigError, match=r"^<config>: groups\.a\.slow_peer: .*drop.*restart"):
        from_mapping({"groups": {"a": {"target": "m:f", "slow_peer": "kill"}}})
    with pytest.raises(SpecError, match="slow_peer 'kill' must be one of drop, restart"):
        WorkerSpec(name="a", target="m:f", slow_peer="kill")
