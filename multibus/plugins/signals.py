"""SignalHandler: turn OS signals into bus transitions, run by the main loop, not the handler.

Default actions: SIGTERM -> exit, SIGINT -> exit, SIGUSR1 -> graceful, SIGHUP -> graceful when
detached (parent is init or stdin is not a tty: a daemon, a service), else exit (a closed
terminal sends SIGHUP), as CherryPy's ``handle_SIGHUP`` (see ``is_detached``). ``multibus
run`` (``run_fleet``) sets its own ``handlers``: SIGUSR1 there reopens the fleet's log files
(for logrotate) instead, as nginx does; a reload is SIGHUP's.

Why not act inside the handler (as CherryPy does): a Python signal handler runs in the main
thread between two bytecodes of whatever it was doing, possibly in the middle of a publish or
holding a lock, so running ``bus.exit()`` there can deadlock or re-enter a half-done transition.
Here the handler only records the signal and wakes the bus; the thread in ``bus.block()`` /
``bus.wait()`` then publishes the signal's channel (e.g. 'SIGTERM') whose listener performs the
transition. On a multibus Bus that is ``bus.defer()``; on other buses (cherrypy.engine) a 'main'
listener drains the queue at block()'s next tick.

Wake-up robustness: a signal that lands just before the main thread blocks on the bus's
condition variable would only run its Python handler when that wait ends. To close that window
we set ``signal.set_wakeup_fd`` (when nobody else uses it) and a daemon thread reading that
pipe wakes the bus from outside the main thread.

SIGINT and SIGHUP that are already ignored when we subscribe (a background job of a shell
script, ``nohup``) stay ignored: someone chose that on purpose. See ``keep_ignored``.

A second SIGINT while the first is still waiting for the main loop raises KeyboardInterrupt in
the main thread (like a default Ctrl-C), so a stuck start() can still be interrupted.

This is THE place where "Ctrl-C" is decided (``multibus run``, ``run_fleet``): two options say
what an interrupt means beyond "publish the channel".

- ``abort_start``: these signals, while the bus is STARTING, raise KeyboardInterrupt in the main
  thread, which is inside ``bus.start()`` waiting for workers; ``Bus.start`` then exits the bus.
  The deferred transition would otherwise wait up to ``start_timeout`` behind the start.
- ``interrupt_op``: called inside the handler by the ``abort_start`` signals when the bus is
  past STARTING, so that a long operation on the main thread (a rolling reload) stops at its
  next step instead of delaying the deferred stop by its whole length. Handler rules apply:
  set a flag and wake a loop (e.g. ``CallQueue.call_soon``), take no lock, do not log.
- ``interrupt_again``: called by a SIGINT that arrives while the bus is already exiting (the
  second Ctrl-C), e.g. ``Supervisor.kill_all``. It runs inside the handler, so it must not log
  (a log listener holding a lock in this thread would deadlock); ``interrupt_again_message``
  is logged once afterwards, by the wake-up thread or at ``unsubscribe()``.

``subscribe()`` must run in the main thread (``signal.signal`` only works there); elsewhere it
raises instead of silently installing nothing as CherryPy does.
"""

from __future__ import annotations

import collections
import os
import select
import signal as _signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from multibus.wakeup import Wakeup

SignalSpec = int | str


def _signum(signal: SignalSpec) -> int:
    if isinstance(signal, str):
        signum = getattr(_signal, signal, None)
        if not isinstance(signum, int):
            raise ValueError(f"No such signal: {signal!r}")
        return signum
    return int(signal)


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and os.isatty(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):
        return False  # closed or replaced stdin: not a terminal


class SignalHandler:
    """Map signals to bus channels and listeners (CherryPy-compatible ``handlers`` dict)."""

    signals: dict[int, str] = {int(s): s.name for s in _signal.Signals}
    """Signal numbers to (canonical) names."""

    keep_ignored: frozenset[str] = frozenset({"SIGINT", "SIGHUP"})
    """Signals left alone when their disposition is SIG_IGN at subscribe() time."""

    interrupt_again_message = "interrupted again: killed every worker"

    def __init__(self, bus: Any, *, abort_start: Iterable[SignalSpec] = (),
                 interrupt_again: Callable[[], Any] | None = None,
                 interrupt_op: Callable[[str], Any] | None = None) -> None:
        self.bus = bus
        self.abort_start = frozenset(_signum(s) for s in abort_start)
        self.interrupt_again = interrupt_again
        self.interrupt_op = interrupt_op
        self.handlers: dict[str, Callable[[], Any]] = {
            "SIGTERM": bus.exit,
            "SIGHUP": self.handle_SIGHUP,
            "SIGUSR1": bus.graceful,
            "SIGINT": bus.exit,
        }
        # signal name -> listener subscribed to the channel of that name; edit before subscribe()
        self._previous_handlers: dict[int, Any] = {}
        self._listeners: list[tuple[str, Callable[[], Any]]] = []
        self._pending: collections.deque[int] = collections.deque()
        self._defer = getattr(bus, "defer", None)
        self._main_listener = False
        self._wakeup: Wakeup | None = None
        self._watcher: threading.Thread | None = None
        self._closing = False
        self._again = False  # interrupt_again ran (in the handler): say so, once, outside it
        self._again_said = threading.Lock()

    # -- installing ----------------------------------------------------------------------

    @staticmethod
    def _require_main_thread(what: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                f"SignalHandler.{what}() called from thread "
                f"{threading.current_thread().name!r}: signal handlers can only be set in the "
                "main thread; call it from the main thread before starting the bus")

    def subscribe(self) -> SignalHandler:
        """Install handlers for every signal in ``handlers``; raise outside the main thread."""
        self._require_main_thread("subscribe")
        if self._defer is None and not self._main_listener:
            self.bus.subscribe("main", self._dispatch)
            self._main_listener = True
        elif self._defer is not None:
            self._start_wakeup_watcher()
        for sig, func in self.handlers.items():
            try:
                self.set_handler(sig, func)
            except ValueError:
                pass  # not available on this platform (CherryPy ignores these too)
        return self

    def set_handler(self, signal: SignalSpec, listener: Callable[[], Any] | None = None) -> None:
        """Handle ``signal`` (number or name); subscribe ``listener`` to its channel if given.

        Raises ValueError for a signal this platform does not have.
        """
        self._require_main_thread("set_handler")
        signum = _signum(signal)
        if signum not in self.signals:
            raise ValueError(f"No such signal: {signal!r}")
        signame = signal if isinstance(signal, str) else self.signals[signum]
        if signame in self.keep_ignored and _signal.getsignal(signum) is _signal.SIG_IGN:
            self.bus.log(f"{signame} is ignored by this process (nohup or background job); "
                         "leaving it ignored.")
            return
        prev = _signal.signal(signum, self._handle_signal)
        if prev != self._handle_signal:  # bound methods compare equal, never identical
            self._previous_handlers.setdefault(signum, prev)
        if listener is not None and (signame, listener) not in self._listeners:
            self.bus.log(f"Listening for {signame}.", 10)
            self.bus.subscribe(signame, listener)
            self._listeners.append((signame, listener))

    def unsubscribe(self) -> None:
        """Restore the previous handlers and remove this plugin's listeners."""
        self._require_main_thread("unsubscribe")
        for signum, handler in self._previous_handlers.items():
            signame = self.signals.get(signum, str(signum))
            if handler is None:
                handler = _signal.SIG_DFL  # set outside Python: best we can do
            self.bus.log(f"Restoring {signame} handler {handler!r}.", 10)
            _signal.signal(signum, handler)
        self._previous_handlers.clear()
        for signame, listener in self._listeners:
            self.bus.unsubscribe(signame, listener)
        self._listeners.clear()
        if self._main_listener:
            self.bus.unsubscribe("main", self._dispatch)
            self._main_listener = False
        self._stop_wakeup_watcher()
        self._say_again()

    # -- wake-up pipe --------------------------------------------------------------------

    def _start_wakeup_watcher(self) -> None:
        if self._watcher is not None:
            return
        wakeup = Wakeup()
        try:
            previous = _signal.set_wakeup_fd(wakeup.write_fd, warn_on_full_buffer=False)
        except ValueError:
            wakeup.close()
            return
        if previous != -1:  # someone (asyncio?) owns it: leave theirs, do without
            _signal.set_wakeup_fd(previous)
            wakeup.close()
            return
        self._wakeup = wakeup
        self._spawn_watcher()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (h := ref()) and h._after_fork_in_child())

    def _spawn_watcher(self) -> None:
        self._closing = False
        self._watcher = threading.Thread(target=self._watch, args=(self._wakeup,),
                                         name="SignalHandler wakeup", daemon=True)
        self._watcher._multibus_fork_safe = True  # type: ignore[attr-defined]  # see Daemonizer
        self._watcher.start()

    def _after_fork_in_child(self) -> None:
        """The watcher thread did not survive fork() and the pipe is shared with the parent:
        give the child its own pipe and watcher (Daemonizer forks after we subscribed)."""
        if self._watcher is None or self._wakeup is None:
            return
        self._watcher = None
        try:
            wakeup = Wakeup()
        except OSError:
            return
        try:
            _signal.set_wakeup_fd(wakeup.write_fd, warn_on_full_buffer=False)
        except ValueError:  # forked from a non-main thread: keep the shared pipe, no watcher
            wakeup.close()
            return
        self._wakeup.close()
        self._wakeup = wakeup
        self._spawn_watcher()

    def _watch(self, wakeup: Wakeup) -> None:
        poller = select.poll()
        poller.register(wakeup.fileno(), select.POLLIN)
        while not self._closing:
            try:
                poller.poll()
            except OSError:
                return
            wakeup.drain()
            if self._closing:
                return
            self._say_again()
            self._defer(self._dispatch, True)  # a notify from here always wakes the waiter

    def _stop_wakeup_watcher(self) -> None:
        if self._watcher is None or self._wakeup is None:
            return
        if _signal.set_wakeup_fd(-1) != self._wakeup.write_fd:
            self.bus.log("signal wakeup fd was replaced by someone else; not restoring it", 30)
        self._closing = True
        self._wakeup.wake()
        self._watcher.join(5)
        self._wakeup.close()
        self._watcher = self._wakeup = None

    # -- handling ------------------------------------------------------------------------

    def _handle_signal(self, signum: int, frame: Any = None) -> None:
        """The Python-level handler: record and wake; never touch bus state or log here.

        Exceptions: an ``abort_start`` signal while STARTING raises KeyboardInterrupt; a
        SIGINT while exiting calls ``interrupt_again`` (see the module docstring)."""
        state = self.bus.state
        states = getattr(self.bus, "states", None)
        if signum in self.abort_start and states is not None and state is states.STARTING:
            raise KeyboardInterrupt(f"{self.signals.get(signum, signum)} while starting")
        if signum in self.abort_start and self.interrupt_op is not None:
            self.interrupt_op(self.signals.get(signum, str(signum)))
        if signum == _signal.SIGINT:
            exiting = getattr(self.bus, "exiting", False) or (
                states is not None and state is states.EXITING)
            if self.interrupt_again is not None and exiting:
                self.interrupt_again()
                self._again = True
                if self._wakeup is not None:
                    self._wakeup.wake()  # the watcher says so (os.write: safe here)
                return
            if _signal.SIGINT in self._pending:
                raise KeyboardInterrupt("second SIGINT before the bus handled the first")
        self._pending.append(signum)
        if self._defer is not None:
            self._defer(self._dispatch, True)  # ahead of queued work (control ops, ...)
        if self._wakeup is not None:
            # and the watcher thread notifies again: the notify above is lost when this
            # handler runs in the main thread between bus.wait()'s check for deferred calls
            # and its cond.wait() (it holds the reentrant lock itself then)
            self._wakeup.wake()

    def _say_again(self) -> None:
        """Log ``interrupt_again_message`` once, after ``interrupt_again`` ran (never from
        the handler itself)."""
        if self._again and self._again_said.acquire(blocking=False):
            self.bus.log(self.interrupt_again_message, 30)

    def _dispatch(self) -> None:
        """Main loop side: publish each recorded signal's channel, in arrival order."""
        while self._pending:
            try:
                signum = self._pending.popleft()
            except IndexError:
                return
            signame = self.signals.get(signum, str(signum))
            self.bus.log(f"Caught signal {signame}.")
            self.bus.publish(signame)

    @staticmethod
    def is_detached() -> bool:
        """True when no terminal can hang up on us: re-parented to init, or stdin is not a
        terminal (a daemon, a systemd service, ``nohup``, ``< /dev/null``). CherryPy's
        ``_is_daemonized`` also wants the pid to have changed since construction (a
        Daemonizer fork); we do not, so a service that never forks (systemd's ``ExecReload=
        kill -HUP``) reloads instead of exiting."""
        return os.getppid() == 1 or not _stdin_is_tty()

    def _is_daemonized(self) -> bool:
        """CherryPy's name for :meth:`is_detached` (subclasses may override it)."""
        return self.is_detached()

    def handle_SIGHUP(self) -> None:
        """Graceful if daemonized (no terminal to lose), else exit (the terminal closed)."""
        if self._is_daemonized():
            self.bus.log("SIGHUP caught while daemonized (no tty). Graceful reload.")
            self.bus.graceful()
        else:
            self.bus.log("SIGHUP caught with a controlling tty. Exiting.")
            self.bus.exit()
