"""The bank/broker pair of ``bank_broker.py`` as worker targets, for ``multibus run``.

    python -m multibus run examples/bank_broker.toml

Both are ordinary workers under one supervisor; the 'order' channel is mirrored (see the
toml), so an order the bank publishes on its own bus goes up to the supervisor's hub and down
to every broker, which logs ``BUY order placed for 20 DXBZ``. Neither knows about the other's
process: the Bridge in each worker does the crossing.
"""

from __future__ import annotations

import os
import random
from typing import Any

SYMBOLS = ("DXBZ", "ACME", "QQQX")


def bank(bus: Any) -> None:
    """Target ``bank_workers:bank``: place a random order every ``ORDER_TICK`` seconds."""
    from multibus.plugins import Monitor

    def place_order() -> None:
        side = random.choice(("BUY", "SELL"))
        quantity = random.randrange(10, 110, 10)
        symbol = random.choice(SYMBOLS)
        bus.log(f"placing {side} {quantity} {symbol}")
        bus.publish("order", side, quantity, symbol)

    tick = float(os.environ.get("ORDER_TICK", "1.0"))
    Monitor(bus, place_order, frequency=tick, name="orders").subscribe()


def broker(bus: Any) -> None:
    """Target ``bank_workers:broker``: log every order that reaches this bus."""

    def on_order(side: str, quantity: int, symbol: str) -> None:
        bus.log(f"{side} order placed for {quantity} {symbol}")

    bus.subscribe("order", on_order)
