"""RestartPolicy: backoff per worker and intensity across the fleet, on a fake clock."""

from __future__ import annotations

from multibus.restart import GiveUp, RestartPolicy
from multibus.specs import Intensity


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(max_restarts: int = 100, period: float = 10.0, backoff=(0.1, 1.0)):
    clock = FakeClock()
    return RestartPolicy(Intensity(max_restarts, period), backoff, clock=clock), clock


def test_first_quick_failure_restarts_at_once_then_backoff_doubles_up_to_the_cap():
    p, clock = policy()
    delays = []
    for _ in range(7):
        delays.append(p.decide("w.0", uptime=0.5))
        clock.now += 5.0  # stay well inside the intensity (100 per 10 s)
    assert delays == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_a_worker_that_ran_a_whole_period_starts_afresh():
    p, _ = policy()
    assert [p.decide("w.0", 0.1) for _ in range(3)] == [0.0, 0.1, 0.2]
    assert p.decide("w.0", uptime=10.0) == 0.0  # ran long enough: not a quick failure
    assert p.decide("w.0", uptime=0.1) == 0.0  # the first quick one again
    assert p.decide("w.0", uptime=0.1) == 0.1


def test_backoff_is_per_worker_and_forget_starts_a_name_afresh():
    p, _ = policy()
    assert [p.decide("w.0", 0.1) for _ in range(3)] == [0.0, 0.1, 0.2]
    assert p.decide("w.1", 0.1) == 0.0
    p.forget("w.0")
    assert p.decide("w.0", 0.1) == 0.0


def test_intensity_gives_up_on_one_restart_too_many_within_the_period():
    p, clock = policy(max_restarts=3, period=10.0, backoff=(0.0, 0.0))
    for name in ("a.0", "b.0", "c.0"):
        assert p.decide(name, uptime=60.0) == 0.0
        clock.now += 1.0
    verdict = p.decide("d.0", uptime=60.0)
    assert verdict == GiveUp(restarts=4, period=10.0, max_restarts=3)
    assert str(verdict) == "restart intensity reached: 4 restarts within 10s (max 3)"


def test_restarts_older_than_the_period_no_longer_count():
    p, clock = policy(max_restarts=2, period=10.0)
    assert p.decide("w.0", 60.0) == 0.0
    clock.now += 6.0
    assert p.decide("w.0", 60.0) == 0.0
    clock.now += 5.0  # the first restart is now 11 s old
    assert p.decide("w.0", 60.0) == 0.0
    assert isinstance(p.decide("w.0", 60.0), GiveUp)  # two within the last 5 s, max 2


def test_reset_clears_the_count_but_a_give_up_is_not_counted():
    p, _ = policy(max_restarts=1)
    assert p.decide("w.0", 60.0) == 0.0
    assert isinstance(p.decide("w.0", 60.0), GiveUp)
    assert isinstance(p.decide("w.0", 60.0), GiveUp)  # still 1 counted, not 2
    p.reset()
    assert p.decide("w.0", 60.0) == 0.0
