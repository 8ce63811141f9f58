"""A worker module that records every import of itself: one "<pid>" line in $MB_STAMP each."""

import os

if os.environ.get("MB_STAMP"):
    with open(os.environ["MB_STAMP"], "a") as f:
        f.write(f"{os.getpid()}\n")


def worker(bus) -> None:
    """Nothing to do: the bus is enough."""
