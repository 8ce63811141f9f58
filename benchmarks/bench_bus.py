"""Time multibus.Bus against cherrypy.process.wspbus.Bus in one run; print the ratio per row.

    python benchmarks/bench_bus.py [--repeat 7]

Each row is the best of ``--repeat`` timings (the least disturbed one) of a loop of calls,
reported per call. ratio = multibus / cherrypy: below 1.0 means multibus is faster.
"""

from __future__ import annotations

import argparse
import sys
import timeit
import warnings

from cherrypy.process import wspbus

import multibus


def _listener(*args, **kwargs):
    return None


def publish_case(bus_cls, listeners: int, with_args: bool = False) -> timeit.Timer:
    """``publish`` on a built-in channel ('main') with ``listeners`` listeners.

    Without arguments, as start/stop/graceful/main are published; ``with_args`` passes one
    positional and one keyword argument, as custom channels often are.
    """
    bus = bus_cls()
    for i in range(listeners):
        # distinct callables with mixed priorities, as real plugins are
        bus.subscribe("main", lambda *a, **k: None, priority=i % 5 * 10)
    stmt = "publish('main', 1, key='v')" if with_args else "publish('main')"
    return timeit.Timer(stmt, globals={"publish": bus.publish})


def lifecycle_case(bus_cls, listeners: int = 5) -> timeit.Timer:
    """``start()`` then ``exit()`` of one bus with ``listeners`` listeners on each channel."""
    bus = bus_cls()
    for channel in ("start", "stop", "exit", "log"):
        for _ in range(listeners):
            bus.subscribe(channel, lambda *a, **k: None)
    return timeit.Timer("start(); exit()", globals={"start": bus.start, "exit": bus.exit})


CASES = [
    ("publish, 0 listeners", lambda cls: publish_case(cls, 0), 200_000),
    ("publish, 1 listener", lambda cls: publish_case(cls, 1), 200_000),
    ("publish, 10 listeners", lambda cls: publish_case(cls, 10), 50_000),
    ("publish, 100 listeners", lambda cls: publish_case(cls, 100), 5_000),
    ("publish(1, key=v), 10 listeners", lambda cls: publish_case(cls, 10, True), 50_000),
    ("start()+exit(), 5 listeners/channel", lambda cls: lifecycle_case(cls), 2_000),
]


def best_per_call(timer: timeit.Timer, number: int, repeat: int) -> float:
    return min(timer.repeat(number=number, repeat=repeat)) / number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply loop counts")
    args = parser.parse_args(argv)
    # CherryPy's start() registers an atexit hook per call; keep its warnings out of the table.
    warnings.simplefilter("ignore")

    print(f"Python {sys.version.split()[0]}, best of {args.repeat}; ratio = multibus / cherrypy")
    print(f"{'case':40} {'multibus':>12} {'cherrypy':>12} {'ratio':>7}")
    for name, make, number in CASES:
        number = max(1, int(number * args.scale))
        ours = best_per_call(make(multibus.Bus), number, args.repeat)
        theirs = best_per_call(make(wspbus.Bus), number, args.repeat)
        print(f"{name:40} {ours * 1e6:10.3f}us {theirs * 1e6:10.3f}us {ours / theirs:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
