"""The bank/broker pair of ``bank_broker.py`` as worker targets, for ``multibus run``.

    python -m multibus run examples/bank_broker.toml

Both are ordinary workers under one supervisor; the 'order' channel is mirrored (see the
toml), so an order the bank publishes on its own bus goes up to the supervisor's hub and down
to every broker, which logs ``BUY order placed for 20 DXBZ``. Neither knows about the other's
process: the Bridge in each worker does the crossing.
"""

from __future__ import annotations

import os
from typing import Any


def bank(bus: Any) -> None:
    """Target ``bank_workers:bank``: place a random order every ``ORDER_TICK`` seconds."""
    from bank_broker import place_random_order

    from multibus.plugins import Monitor

    tick = float(os.environ.get("ORDER_TICK", "1.0"))
    Monitor(bus, lambda: place_random_order(bus), frequency=tick, name="orders").subscribe()


def broker(bus: Any) -> None:
    """Target ``bank_workers:broker``: log every order that reaches this bus."""

    def on_order(side: str, quantity: int, symbol: str) -> None:
        bus.log(f"{side} order placed for {quantity} {symbol}")

    bus.subscribe("order", on_order)
