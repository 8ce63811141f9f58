"""The command applier: a peer's bus follows the desired state the hub sends.

A command is the full desired state (STARTED, STOPPED or EXITING, and a graceful generation),
not an action, so applying one twice or late is harmless. The I/O thread never applies one
(transitions can block): it hands each to :class:`Applier`, which runs them in order either
through ``apply_via`` (a worker passes ``bus.defer``: its main thread idles in ``block()``
anyway) or on its own non-daemon thread, started at the first command and ended after
``APPLIER_IDLE`` s without one (non-daemon, so ``block()`` waits for an exit applied there).
A command that fails (a start listener raised) is reported to the hub (``on_failed``).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

from multibus.bus import state_name
from multibus.transport.stats import BridgeStats
from multibus.transport.wire import MAX_ERROR

__all__ = ["APPLIER_IDLE", "Applier", "wire_state"]

APPLIER_IDLE = 1.0  # seconds the command thread waits for the next command before ending


def wire_state(state: object) -> str:
    """The wire name of a bus state (any bus: ours, CherryPy's, or a name); STOPPED when it is
    not one of the five."""
    return state_name(state) or "STOPPED"


class Applier:
    """Applies lifecycle commands to ``bus`` in order, once each (see the module docstring).

    :meth:`welcome` and :meth:`apply` are called by the I/O thread; the commands run in the
    applier's thread or through ``apply_via``. Counts go to ``stats`` as reports.
    """

    def __init__(
        self,
        bus: Any,
        name: str,
        stats: BridgeStats,
        apply_via: Callable[[Callable[[], None]], None] | None = None,
        on_failed: Callable[[str | None, str], None] | None = None,
    ) -> None:
        self.bus = bus
        self.name = name
        self.stats = stats
        self.apply_via = apply_via
        self.on_failed = on_failed  # (desired state or None, "ExcType: message")
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._wants: collections.deque[tuple[int, str | None, int]] = collections.deque()
        self._applied_graceful: dict[int, int] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    def welcome(self, epoch: int, graceful: int, new_hub: bool) -> None:
        """(I/O thread) A hub welcomed us: a fresh hub's graceful generation is our baseline
        (graceful reaches the peers that exist when commanded)."""
        with self._lock:
            if new_hub or epoch not in self._applied_graceful:
                self._applied_graceful = {epoch: graceful}

    def apply(self, epoch: int, desired: str | None, graceful: int) -> None:
        """(I/O thread) Queue one command and make sure something runs it."""
        with self._lock:
            self._wants.append((epoch, desired, graceful))
            if self.apply_via is None:
                if self._thread is not None:
                    self._cond.notify()
                else:
                    self._thread = threading.Thread(
                        target=self._main, name=f"bridge-apply-{self.name}", daemon=False
                    )
                    self._thread.start()
                return
        self.apply_via(self._apply_queued)

    def stop(self) -> None:
        """(any thread) The bridge is closing: an idle command thread ends now."""
        with self._lock:
            self._stopping = True
            self._cond.notify_all()

    def _apply_queued(self) -> None:
        """(``apply_via``) Apply the commands received so far, in order."""
        while self._apply_next():
            pass

    def _main(self) -> None:
        while True:
            with self._lock:
                if not self._wants and not self._stopping:
                    # stay a moment for the next command: a thread start costs ~100 us
                    self._cond.wait(APPLIER_IDLE)
                if not self._wants:
                    self._thread = None
                    return
            try:
                self._apply_next()
            except (KeyboardInterrupt, SystemExit):
                pass  # logged by _apply_next; this thread goes on with the next command

    def _apply_next(self) -> bool:
        """Apply the oldest command received; False if there was none. A graceful (generation
        above the one applied) runs first, then the transition to the desired state, if any
        is needed. A failing transition is counted and logged; KeyboardInterrupt and
        SystemExit are re-raised as well."""
        bus = self.bus
        with self._lock:
            if not self._wants:
                return False
            epoch, desired, graceful = self._wants.popleft()
            base = self._applied_graceful.get(epoch)
            run_graceful = base is not None and graceful > base
            if run_graceful or base is None:
                self._applied_graceful = {epoch: graceful}
        try:
            if run_graceful and desired != "EXITING":
                bus.graceful()
            state = self._settled_state()
            if desired == "STARTED" and state == "STOPPED":
                bus.start()
            elif desired == "STOPPED" and state == "STARTED":
                bus.stop()
            elif desired == "EXITING" and state != "EXITING":
                bus.exit()
            self.stats.report("cmd_applied")
        except BaseException as exc:
            self.stats.report("cmd_failed")
            error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR]
            if self.on_failed is not None:
                self.on_failed(desired, error)
            # A listener's failure was logged by the bus with its traceback, and on_failed
            # reports it: say it again only in the debug log.
            level = 10 if isinstance(exc, Exception) else 40
            try:
                bus.log(f"multibus bridge {self.name!r}: applying {desired or 'graceful'} "
                        f"failed: {error}", level)
            except Exception:  # noqa: BLE001 - a failing log listener
                pass
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
        return True

    def _settled_state(self, timeout: float = 30.0) -> str:
        """The bus state once it is not STARTING/STOPPING (another thread may be moving it);
        bounded, since a stuck start listener must not freeze the applier forever."""
        deadline = time.monotonic() + timeout
        while True:
            state = wire_state(self.bus.state)
            if state not in ("STARTING", "STOPPING") or time.monotonic() > deadline:
                return state
            time.sleep(0.02)
