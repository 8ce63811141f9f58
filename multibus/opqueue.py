"""The operation queue: transitions asked for over the control socket, run one at a time.

Each op runs on the thread in ``bus.block()`` (through ``defer``), in arrival order, so ops never
overlap each other or a signal's transition. The queue is bounded (``MAX_QUEUED`` waiting: one
more is refused), an op identical to one still waiting *is* that op (a relative scale,
``delta``, never is: each SIGTTIN is one more worker), and an 'exit' cancels every waiting op
and runs before them, as SIGTERM/SIGINT do through :meth:`OpQueue.cancel_waiting`. Finished ops
are remembered (the last ``MAX_OPS_KEPT``) so ``op_status`` can answer for them; pruning is O(1).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from multibus.commands import ControlError

__all__ = ["CANCELLED", "MAX_OPS_KEPT", "MAX_QUEUED", "Op", "OpQueue"]

MAX_OPS_KEPT = 256  # finished ops remembered for op_status
MAX_QUEUED = 100  # ops waiting to run; one more is refused
CANCELLED = "cancelled: the supervisor is exiting"


@dataclass(eq=False)
class Op:
    """One queued transition."""

    id: int
    action: str
    args: dict[str, Any]
    state: str = "queued"  # queued | running | done | failed
    error: str | None = None
    note: str | None = None
    queued_at: float = 0.0
    ended_at: float | None = None
    #: set once it is done, failed or cancelled: for a thread that waits for it
    ended: threading.Event = field(default_factory=threading.Event, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.id, "action": self.action, "args": self.args, "state": self.state,
                "error": self.error, "note": self.note}


class OpQueue:
    """Ops for ``perform(op) -> note``, run through ``defer(func, first)`` (a multibus Bus's
    ``defer``); without it (cherrypy.engine) each op runs on a thread of its own, one at a
    time. A failed op is logged through ``log(msg, level)`` and answered with its error."""

    def __init__(self, perform: Callable[[Op], str | None],
                 defer: Callable[..., Any] | None, log: Callable[..., Any],
                 interrupt: Callable[[str], Any] | None = None,
                 ended: Callable[[Op], Any] | None = None) -> None:
        # interrupt(why): an 'exit' was queued or the waiting ops cancelled: a long op that
        # is running (a rolling reload) stops at its next step instead of finishing first
        self._interrupt = interrupt
        self._ended = ended  # ended(op), on the thread that ended it: e.g. wake a waiting client
        self._perform = perform
        self._defer = defer
        self._log = log
        self._ops: dict[int, Op] = {}  # op_status answers these: waiting, running, finished
        self._waiting: dict[int, Op] = {}  # queued, not started yet (bounded)
        self._done: collections.deque[int] = collections.deque()  # finished, oldest first
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._serial = threading.Lock()

    def queue(self, action: str, **args: Any) -> Op:
        """Queue ``action`` with ``args``; ControlError when ``MAX_QUEUED`` already wait."""
        with self._lock:
            same = (None if "delta" in args else
                    next((o for o in self._waiting.values()
                          if o.action == action and o.args == args), None))
            if same is not None:
                return same
            if action == "exit":
                cancelled = self._cancel_waiting(CANCELLED)
            elif len(self._waiting) >= MAX_QUEUED:
                raise ControlError(
                    f"the operation queue is full ({MAX_QUEUED} waiting); wait for them to run "
                    "(multibus status lists them) and try again")
            op = Op(next(self._ids), action, args, queued_at=time.monotonic())
            if action == "exit" and cancelled:
                op.note = f"cancelled {cancelled} queued operation{'s' if cancelled != 1 else ''}"
            self._ops[op.id] = op
            self._waiting[op.id] = op
        if action == "exit" and self._interrupt is not None:
            self._interrupt(CANCELLED)
        if self._defer is not None:
            self._defer(lambda: self._run(op), action == "exit")
        else:
            threading.Thread(target=self._run_serial, args=(op,), daemon=True).start()
        return op

    def cancel_waiting(self, reason: str = CANCELLED) -> int:
        """Fail every op still waiting with ``reason`` (SIGTERM/SIGINT/exit); how many."""
        if self._interrupt is not None:
            self._interrupt(reason)
        with self._lock:
            return self._cancel_waiting(reason)

    def get(self, op_id: int) -> Op | None:
        return self._ops.get(op_id)

    def pending(self) -> list[Op]:
        """The running op (if any) and those waiting, in order: at most MAX_QUEUED + 1."""
        with self._lock:
            return [o for o in self._ops.values() if o.state in ("queued", "running")]

    def _cancel_waiting(self, reason: str) -> int:
        ops = list(self._waiting.values())
        self._waiting.clear()
        for op in ops:
            op.state, op.error, op.ended_at = "failed", reason, time.monotonic()
            self._finished(op)
            self._end(op)
        return len(ops)

    def _finished(self, op: Op) -> None:
        """Remember ``op`` among the last ``MAX_OPS_KEPT`` finished ones (lock held)."""
        self._done.append(op.id)
        while len(self._done) > MAX_OPS_KEPT:
            self._ops.pop(self._done.popleft(), None)

    def _run_serial(self, op: Op) -> None:
        with self._serial:
            self._run(op)

    def _run(self, op: Op) -> None:
        with self._lock:
            if self._waiting.pop(op.id, None) is None:
                return  # cancelled while it waited
            op.state = "running"
        try:
            op.note = self._perform(op) or op.note
            op.state = "done"
        except (KeyboardInterrupt, SystemExit):
            op.state, op.error = "failed", "interrupted"
            raise
        except BaseException as e:  # noqa: BLE001 - reported to the client
            op.state = "failed"
            op.error = str(e) or type(e).__name__
            self._log(f"{op.action} failed: {op.error}", 40)
        finally:
            op.ended_at = time.monotonic()
            with self._lock:
                self._finished(op)
            self._end(op)

    def _end(self, op: Op) -> None:
        op.ended.set()
        if self._ended is not None:
            self._ended(op)
