"""A bank and its broker: two processes, two buses, one mirrored 'order' channel.

    python examples/bank_broker.py            # the bank; it starts the broker itself

The bank (this process, the hub) places a random BUY/SELL order every tick by publishing on its
own bus; the Bridge mirrors the 'order' channel to the broker, a child process with its own bus
(``python examples/bank_broker.py --broker ENDPOINTS --parent PID``), which logs
"BUY order placed for 20 DXBZ". The broker's log lines travel back over the bridge and are
printed here, prefixed with its name. Ctrl-C reaches only the bank (the broker runs in its own
process group); the bank commands the broker to exit, waits for it, then exits itself.

If the bank dies without a word, the broker still goes: PR_SET_PDEATHSIG (+ a getppid check for
a parent that died before prctl ran), and the bridge's 'hub.lost' event.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from multibus.bus import Bus  # noqa: E402
from multibus.plugins import Monitor, SignalHandler  # noqa: E402
from multibus.transport.bridge import Bridge  # noqa: E402

BROKER = "broker"
SYMBOLS = ("DXBZ", "ACME", "QQQX")
PR_SET_PDEATHSIG = 1


def place_random_order(bus: Bus) -> None:
    """Publish one random order on the mirrored 'order' channel."""
    side = random.choice(("BUY", "SELL"))
    quantity = random.randrange(10, 110, 10)
    symbol = random.choice(SYMBOLS)
    bus.log(f"placing {side} {quantity} {symbol}")
    bus.publish("order", side, quantity, symbol)


_out = threading.Lock()


def show(line: str) -> None:
    """Print one whole line in one write: the bank prints from several threads (and the broker
    shares its terminal), and print()'s separate newline let two lines run into one."""
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def say(who: str, msg: str) -> None:
    show(f"{who:<6} | {msg}")


# -- the broker (child) ---------------------------------------------------------------------


def die_with_parent(parent: int) -> None:
    """SIGTERM us when the bank dies; if it already died, go now."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        say(BROKER, f"the bank (pid {parent}) is already gone; exiting")
        sys.exit(1)


def broker(endpoints: str, parent: int) -> int:
    die_with_parent(parent)
    bus = Bus()
    SignalHandler(bus).subscribe()

    def on_order(side: str, quantity: int, symbol: str) -> None:
        bus.log(f"{side} order placed for {quantity} {symbol}")

    def on_hub_lost(reason: str) -> None:
        bus.log(f"lost the bank ({reason}); exiting", 30)
        bus.exit()

    bus.subscribe("order", on_order)
    bus.subscribe("hub.lost", on_hub_lost)
    # Our log lines go to the bank over the bridge; nothing is printed here until it closes.
    Bridge(bus, role="peer", name=BROKER, endpoints=endpoints, channels=["order"]).subscribe()
    bus.block()  # the bank commands start/exit
    say(BROKER, "Bus EXITED")  # the bridge is closed by now: say it ourselves
    return 0


# -- the bank (parent) ----------------------------------------------------------------------


def bank(tick: float) -> int:
    bus = Bus()
    bus.subscribe("log", lambda msg, level=20: show(msg)
                  if msg.startswith(f"{BROKER} | ") else say("bank", msg))
    SignalHandler(bus).subscribe()
    bridge = Bridge(bus, role="hub", name=f"bank-{os.getpid()}", channels=["order"]).subscribe()
    bus.subscribe("peer.joined", lambda name, pid: bus.log(f"{name} joined (pid {pid})"))
    bus.subscribe("peer.lost", lambda name, reason: bus.log(f"{name} gone: {reason}"))

    # Spawned from the main thread, which lives as long as the bank: PDEATHSIG fires when the
    # spawning *thread* ends. Own process group, so Ctrl-C reaches the bank only.
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--broker", bridge.endpoints.to_string(),
         "--parent", str(os.getpid())],
        process_group=0,
    )

    def stop_broker() -> None:
        """Before our bridge closes (it listens at priority 95): ask, wait, then insist."""
        bridge.command("exit", [BROKER])
        try:
            code = child.wait(5)
        except subprocess.TimeoutExpired:
            bus.log("broker did not exit in 5s; terminating its process group", 30)
            os.killpg(child.pid, signal.SIGTERM)
            try:
                code = child.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                code = child.wait()
        bus.log(f"broker exited with code {code}")

    bus.subscribe("exit", stop_broker, priority=40)
    Monitor(bus, lambda: place_random_order(bus), frequency=tick, name="orders").subscribe()
    bridge.command("start")  # the broker starts when it joins, whenever that is
    bus.start()
    bus.block()  # our own "Bus EXITED" is logged (and printed) by the bus itself
    return 0 if child.returncode == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", metavar="ENDPOINTS", help=argparse.SUPPRESS)
    parser.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tick", type=float, default=1.0, help="seconds between orders")
    args = parser.parse_args()
    if args.broker:
        return broker(args.broker, args.parent)
    return bank(args.tick)


if __name__ == "__main__":
    sys.exit(main())
