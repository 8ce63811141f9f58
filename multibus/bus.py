r"""The Web Site Process Bus: a process state machine with publish/subscribe channels.

A drop-in for :class:`cherrypy.process.wspbus.Bus` (CherryPy's own ``test_bus.py`` passes
against it unchanged), with these differences:

- Each channel keeps its listeners pre-sorted by ``(priority, subscription order)``, so
  ``publish`` does no sorting and equal priorities run in the order they were subscribed.
- ``subscribe``/``unsubscribe``/``publish`` are safe from any thread; ``publish`` takes no lock.
- ``wait()``/``block()`` sleep on a condition variable and wake the moment the state changes;
  they only tick (publish ``channel`` every ``interval``) while that channel has listeners, so
  an idle process does not wake up at all.
- A failing 'start' listener stops the bus and the original error reaches the caller of
  ``start()`` (CherryPy calls ``os._exit(70)`` instead). ``exit()`` never kills the process: it
  always reaches EXITING, then raises the listeners' failures to its caller.
- ``block(timeout=...)`` logs each thread it waits for and can stop waiting for them.
- ``defer(func)`` hands work to the thread that sits in ``wait()``/``block()`` (normally the
  main thread); signal handlers use it so bus transitions never run inside a handler.

State machine (``exit`` always passes through STOPPING/STOPPED)::

    STOPPED --> STARTING --> STARTED --> STOPPING --> STOPPED --> EXITING
"""

from __future__ import annotations

import atexit
import bisect
import functools
import itertools
import os
import select
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from multibus.wakeup import CallQueue, Wakeup

__all__ = ["Bus", "ChannelFailures", "STATE_NAMES", "State", "state_name", "states"]

# The working directory at import time: restart() returns to it before re-executing, in case
# the application changed directory (a relative sys.executable would then be lost).
_startup_cwd = os.getcwd()

BUILTIN_CHANNELS = ("start", "stop", "exit", "graceful", "log", "main")


class ChannelFailures(Exception):
    """Raised by :meth:`Bus.publish` after every listener ran, when some of them failed."""

    delimiter = "\n"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._exceptions: list[BaseException] = []

    def handle_exception(self) -> None:
        """Append the exception being handled to this failure."""
        self._exceptions.append(sys.exc_info()[1])

    def get_instances(self) -> list[BaseException]:
        """Return the collected exception instances, in the order they happened."""
        return self._exceptions[:]

    def __str__(self) -> str:
        return self.delimiter.join(map(repr, self._exceptions))

    __repr__ = __str__

    def __bool__(self) -> bool:
        return bool(self._exceptions)


class State:
    """One state of the bus; compared by identity, named for logs and for the wire."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"states.{self.name}"


class _States:
    """The five bus states: ``states.STARTED`` by attribute, ``states['STARTED']`` by name."""

    STOPPED = State("STOPPED")
    STARTING = State("STARTING")
    STARTED = State("STARTED")
    STOPPING = State("STOPPING")
    EXITING = State("EXITING")
    State = State

    def __iter__(self):
        return iter((self.STOPPED, self.STARTING, self.STARTED, self.STOPPING, self.EXITING))

    def __getitem__(self, name: str) -> State:
        state = getattr(self, name, None)
        if not isinstance(state, State):
            raise KeyError(f"no bus state named {name!r}; expected one of {[s.name for s in self]}")
        return state


states = _States()
STATE_NAMES = frozenset(("STOPPED", "STARTING", "STARTED", "STOPPING", "EXITING"))


def state_name(state: object) -> str | None:
    """The name of a bus state ('STARTED'), for our states, CherryPy's (whose repr is
    ``states.STARTED``) or a name; None when ``state`` is none of the five."""
    name = getattr(state, "name", None)
    if not isinstance(name, str):
        name = str(state).rpartition(".")[2]
    return name if name in STATE_NAMES else None


def _as_set(state: State | Iterable[State]) -> frozenset[State]:
    if isinstance(state, State):
        return frozenset((state,))
    return frozenset(state)


class _SignalWaker:
    """A pipe the main thread's unbounded ``wait()`` sleeps on, written by signals and the bus.

    A process-directed signal (Ctrl-C's SIGINT) may be delivered to any thread. CPython then
    only flags it; the Python handler runs when the main thread next executes bytecode, which
    a main thread asleep on a lock never does, so the Ctrl-C would be lost. Registered with
    ``signal.set_wakeup_fd``, this pipe is written by the C handler in whichever thread it
    runs; every notification of the bus's condition writes to it too, so the main thread
    sleeps in ``poll()`` on it instead of on the condition. No thread, and no wake-up while
    nothing arrives. Installed only when nobody else owns the wakeup fd (SignalHandler,
    asyncio): they wake the main thread themselves, and it sleeps on the condition.
    """

    def __init__(self, wakeup: Wakeup) -> None:
        self.wakeup = wakeup
        self.poller = select.poll()
        self.poller.register(wakeup.fileno(), select.POLLIN)

    @classmethod
    def install(cls) -> _SignalWaker | None:
        wakeup = Wakeup()
        try:
            previous = signal.set_wakeup_fd(wakeup.write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main thread of the main interpreter
            previous = None
        if previous != -1:
            if previous is not None:
                signal.set_wakeup_fd(previous)
            wakeup.close()
            return None
        return cls(wakeup)

    def sleep(self) -> None:
        """Until a signal or a notification arrives (or arrived since the last sleep)."""
        self.poller.poll()
        self.wakeup.drain()

    def wake(self) -> None:
        self.wakeup.wake()

    def remove(self) -> None:
        current = signal.set_wakeup_fd(-1)
        if current not in (self.wakeup.write_fd, -1):
            signal.set_wakeup_fd(current)  # replaced by someone meanwhile: theirs stays
        self.wakeup.close()


class Bus:
    """Process state machine and messenger.

    All listeners of a channel are called even if some fail; each failure is logged and they
    are raised together as one :class:`ChannelFailures` after the last listener ran. Only
    ``KeyboardInterrupt`` and ``SystemExit`` stop a publish early.
    """

    states = states
    max_cloexec_files = 0  # kept for CherryPy compatibility; restart() relies on O_CLOEXEC

    def __init__(self) -> None:
        self.execv = False
        self._cond = threading.Condition(threading.RLock())
        self._state: State = states.STOPPED
        self.listeners: dict[str, set[Callable[..., Any]]] = {c: set() for c in BUILTIN_CHANNELS}
        # channel -> tuple of callbacks in call order; replaced (never mutated) on change so
        # publish() can read it without a lock.
        self._sorted: dict[str, tuple[Callable[..., Any], ...]] = {c: () for c in BUILTIN_CHANNELS}
        # (priority, subscription order) per subscription, and per channel the sorted entries
        self._keys: dict[tuple[str, Callable[..., Any]], tuple[int | float, int]] = {}
        self._entries: dict[str, list[tuple[int | float, int, Callable[..., Any]]]] = {}
        self._counter = itertools.count()
        self._deferred = CallQueue(on_error=self._deferred_failed)
        self._main_waiting = 0  # how many wait() calls the main thread is in (0 or 1)
        self._waker: _SignalWaker | None = None  # the main thread's, while it waits
        self._atexit_registered = False
        self._exiting = False

    # -- state ---------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current state; setting it wakes every ``wait()`` at once."""
        return self._state

    @state.setter
    def state(self, value: State) -> None:
        with self._cond:
            self._state = value
            self._notify()

    @property
    def exiting(self) -> bool:
        """True from the moment ``exit()`` begins, so a 'stop' listener can tell the stop
        that opens an exit (and, say, have its children exit in one step) from a plain stop.
        Not in CherryPy's bus: read it with ``getattr(bus, "exiting", False)``."""
        return self._exiting

    # -- subscriptions -------------------------------------------------------------------

    def subscribe(
        self,
        channel: str,
        callback: Callable[..., Any] | None = None,
        priority: int | float | None = None,
    ) -> Any:
        """Add ``callback`` to ``channel`` (once); return it.

        Lower priorities run first (default 50, or the callback's ``priority`` attribute);
        equal priorities run in subscription order. Without a callback, return a decorator.
        Subscribing an existing callback again only changes its priority.
        """
        if callback is None:
            return functools.partial(self.subscribe, channel, priority=priority)
        if priority is None:
            priority = getattr(callback, "priority", 50)
        with self._cond:
            key = (channel, callback)
            old = self._keys.get(key)
            entries = self._entries.setdefault(channel, [])
            if old is not None:
                entries.remove((*old, callback))
            order = old[1] if old is not None else next(self._counter)
            self._keys[key] = (priority, order)
            bisect.insort(entries, (priority, order, callback))
            self.listeners.setdefault(channel, set()).add(callback)
            self._sorted[channel] = tuple([e[2] for e in entries])
            if len(entries) == 1:
                self._notify()  # a wait() may now have a tick channel to publish
        return callback

    def unsubscribe(self, channel: str, callback: Callable[..., Any]) -> None:
        """Remove ``callback`` from ``channel`` if it is there."""
        with self._cond:
            old = self._keys.pop((channel, callback), None)
            if old is None:
                return
            entries = self._entries[channel]
            entries.remove((*old, callback))
            self.listeners[channel].discard(callback)
            self._sorted[channel] = tuple([e[2] for e in entries])

    # -- publishing ----------------------------------------------------------------------

    def publish(self, channel: str | None, *args: Any, **kwargs: Any) -> list[Any]:
        """Call every listener of ``channel`` with ``*args, **kwargs``; return their results."""
        items = self._sorted.get(channel)  # type: ignore[arg-type]
        if not items:
            return []
        output: list[Any] = []
        try:
            if kwargs:
                for listener in items:
                    output.append(listener(*args, **kwargs))
            else:  # a call without ** skips copying an empty dict per listener
                for listener in items:
                    output.append(listener(*args))
            return output
        except Exception:  # noqa: BLE001 - the slow path below collects it
            # Slow path, only once something failed: the failed listener is the one at
            # index len(output); collect its failure and keep calling the rest.
            failures = ChannelFailures()
            failures.handle_exception()
            self._log_failure(channel, items[len(output)])
        for listener in items[len(output) + 1:]:
            try:
                output.append(listener(*args, **kwargs))
            except KeyboardInterrupt:
                raise
            except SystemExit as e:
                if e.code == 0:
                    e.code = 1  # an earlier listener failed: do not exit with success
                raise
            except Exception:  # noqa: BLE001 - collected into ChannelFailures
                failures.handle_exception()
                self._log_failure(channel, listener)
        raise failures

    def _log_failure(self, channel: str | None, listener: Callable[..., Any]) -> None:
        if channel == "log":  # a failing log listener would fail again
            return
        if getattr(sys.exc_info()[1], "reported_by_caller", False):
            return  # raised to whoever published (e.g. FleetError from start()), who reports it
        self.log(f"Error in {channel!r} listener {listener!r}", 40, traceback=True)

    def log(self, msg: str = "", level: int = 20, traceback: bool = False) -> None:
        """Publish ``(msg, level)`` on 'log', with the current traceback appended if asked."""
        if traceback:
            import traceback as tb  # only on an error: a worker starts without it

            msg += "\n" + "".join(tb.format_exception(*sys.exc_info()))
        self.publish("log", msg, level)

    def log_lines(self, source: str, texts: Sequence[str], level: int = 20) -> None:
        """Publish ``(f"{source} | {text}", level)`` on 'log' for each of ``texts`` (a chunk
        of a worker's output), in order. A listener with a ``log_lines(source, texts,
        level)`` method (the printer, the ring, the log files) gets the chunk in one call;
        any other one line at a time. Failures are collected as in :meth:`publish`. Not in
        CherryPy's bus: call it as ``getattr(bus, "log_lines", None)``."""
        failures: ChannelFailures | None = None
        for listener in self._sorted.get("log", ()):
            batch = getattr(listener, "log_lines", None)
            calls = ((batch, (source, texts, level)),) if batch is not None else (
                (listener, (f"{source} | {text}", level)) for text in texts)
            for call, args in calls:
                try:
                    call(*args)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception:  # noqa: BLE001 - collected into ChannelFailures
                    failures = failures or ChannelFailures()
                    failures.handle_exception()
        if failures is not None:
            raise failures

    # -- transitions ---------------------------------------------------------------------

    def start(self) -> None:
        """Start all services: STOPPED -> STARTING -> STARTED.

        If a 'start' listener fails, the bus is stopped again (so what did start is stopped)
        and the original exception is raised here; several failures come as ChannelFailures.
        KeyboardInterrupt or SystemExit during start exits the bus, then propagates.
        """
        if not self._atexit_registered:
            atexit.register(self._clean_exit)
            self._atexit_registered = True
        self.state = states.STARTING
        self.log("Bus STARTING")
        try:
            self.publish("start")
        except (KeyboardInterrupt, SystemExit):
            self.log("Interrupted while starting: exiting bus")  # a request, not an error
            self._exit_quietly()
            raise
        except ChannelFailures as failures:
            # the listener's traceback was logged by publish(): not once more
            self.log("Shutting down due to error in start listener", level=40)
            self._stop_quietly()
            errors = failures.get_instances()
            if len(errors) == 1:
                raise errors[0] from None
            raise
        with self._cond:
            if self._state is not states.STARTING:
                return  # stopped or exited by another thread while starting
            self.state = states.STARTED
        self.log("Bus STARTED")

    def stop(self) -> None:
        """Stop all services: -> STOPPING -> STOPPED (reached even if listeners fail)."""
        self.state = states.STOPPING
        self.log("Bus STOPPING")
        try:
            self.publish("stop")
        finally:
            self.state = states.STOPPED
            self.log("Bus STOPPED")

    def graceful(self) -> None:
        """Advise all services to reload."""
        self.log("Bus graceful")
        self.publish("graceful")

    def exit(self) -> None:
        """Stop all services and prepare the process to exit: stop, then -> EXITING.

        EXITING is always reached, so ``block()`` returns. Failures of 'stop' or 'exit'
        listeners are logged and then raised here as ChannelFailures. Calling exit() again once
        EXITING does nothing.
        """
        if self._state is states.EXITING:
            return
        self._exiting = True
        failures = ChannelFailures()
        try:
            self.stop()
        except ChannelFailures as e:
            failures._exceptions.extend(e.get_instances())
        self.state = states.EXITING
        self.log("Bus EXITING")
        try:
            self.publish("exit")
        except ChannelFailures as e:
            failures._exceptions.extend(e.get_instances())
        self.log("Bus EXITED")
        if failures:
            raise failures

    def _stop_quietly(self) -> None:
        try:
            self.stop()
        except ChannelFailures:
            pass  # already logged by publish()

    def _exit_quietly(self) -> None:
        try:
            self.exit()
        except ChannelFailures:
            pass  # already logged by publish()

    def restart(self) -> None:
        """Exit the bus and have ``block()`` (in the main thread) re-execute the process."""
        self.execv = True
        self.exit()

    def _clean_exit(self) -> None:
        """At interpreter exit: exit the bus if the program forgot to."""
        if self._state is not states.EXITING:
            warnings.warn(
                f"The main thread is exiting, but the Bus is in the {self._state!r} state; "
                "shutting it down automatically now. Call bus.block() after start(), or "
                "bus.exit() before the main thread exits.",
                RuntimeWarning,
                stacklevel=1,
            )
            self._exit_quietly()

    # -- waiting -------------------------------------------------------------------------

    def defer(self, func: Callable[[], Any], first: bool = False) -> None:
        """Run ``func()`` in the thread waiting in ``wait()``/``block()``, as soon as possible.

        The main thread runs it if it is waiting, else any waiting thread. Safe to call from
        any thread and from a signal handler (the condition's lock is reentrant for that).
        Deferred calls run in order; ``first`` puts this one before those already waiting.
        """
        self._deferred.call_soon(func, first)
        with self._cond:
            self._notify()

    def _notify(self) -> None:
        """Wake every wait() (call with the condition held)."""
        self._cond.notify_all()
        if self._waker is not None:
            self._waker.wake()

    def _run_deferred(self) -> None:
        self._deferred.run_due()

    def _deferred_failed(self, func: Callable[[], Any], exc: BaseException) -> None:
        self.log(f"Error in deferred call {func!r}", level=40, traceback=True)

    def wait(
        self,
        state: State | Iterable[State],
        interval: float = 0.1,
        channel: str | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Wait until the bus is in ``state`` (or one of several); return whether it is.

        While ``channel`` has listeners it is published every ``interval`` seconds; otherwise
        the thread sleeps until the state changes. Deferred calls run here. ``timeout`` bounds
        the whole wait (None: forever).
        """
        wanted = _as_set(state)
        deadline = None if timeout is None else time.monotonic() + timeout
        in_main = threading.current_thread() is threading.main_thread()
        installed: _SignalWaker | None = None  # ours to remove (an outer wait() may own one)
        with self._cond:
            self._main_waiting += in_main
        try:
            while True:
                # Deferred calls belong to the main thread while it waits (that is where
                # signals arrive); another waiting thread runs them only when it does not.
                runs_deferred = in_main or not self._main_waiting
                if runs_deferred and self._deferred:
                    self._run_deferred()
                waker = None
                with self._cond:
                    if self._state in wanted:
                        return True
                    ticking = channel is not None and bool(self._sorted.get(channel))
                    delay = interval if ticking else None
                    if deadline is not None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return False
                        delay = remaining if delay is None else min(delay, remaining)
                    if not (runs_deferred and self._deferred):
                        if in_main and delay is None:
                            if self._waker is None and installed is None:
                                installed = self._waker = _SignalWaker.install()
                            waker = self._waker
                        if waker is None:
                            self._cond.wait(delay)
                            if self._state in wanted:
                                return True
                if waker is not None:
                    waker.sleep()  # outside the lock: a signal or any _notify() ends it
                elif ticking:
                    self.publish(channel)
        finally:
            with self._cond:
                self._main_waiting -= in_main
                if installed is not None:
                    self._waker = None
            if installed is not None:
                installed.remove()

    def block(self, interval: float = 0.1, timeout: float | None = None) -> None:
        """Wait for EXITING, then for non-daemon threads, then re-exec if restart() asked.

        Meant for the main thread. KeyboardInterrupt exits the bus; SystemExit exits it and
        propagates. Each thread waited for is logged; ``timeout`` bounds the total time spent
        waiting for threads (None: wait for them all, like CherryPy).
        """
        try:
            self.wait(states.EXITING, interval=interval, channel="main")
        except KeyboardInterrupt:
            self.log("Keyboard Interrupt: shutting down bus")
            self._exit_quietly()
        except SystemExit:
            self.log("SystemExit raised: shutting down bus")
            self._exit_quietly()
            raise

        # CherryPy's line (its tests expect it), at DEBUG: printed on every exit, it was noise;
        # each thread actually waited for is still logged at INFO below
        self.log("Waiting for child threads to terminate...", 10)
        deadline = None if timeout is None else time.monotonic() + timeout
        current = threading.current_thread()
        for t in threading.enumerate():
            if t is current or t is threading.main_thread() or t.daemon:
                continue
            self.log(f"Waiting for thread {t.name}.")
            if deadline is None:
                t.join()
            else:
                t.join(max(0.0, deadline - time.monotonic()))
                if t.is_alive():
                    self.log(f"Thread {t.name} still running after {timeout}s; not waiting.", 30)

        if self.execv:
            self._do_execv()

    def start_with_callback(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> threading.Thread:
        """Start ``func(*args, **kwargs)`` in a new thread once STARTED, then start the bus."""
        args = args or ()
        kwargs = kwargs or {}

        def _callback() -> None:
            self.wait(states.STARTED)
            func(*args, **kwargs)

        t = threading.Thread(target=_callback)
        t.name = "Bus Callback " + t.name
        t.start()
        self.start()
        return t

    def _do_execv(self) -> None:
        """Re-execute the current process with its original interpreter arguments."""
        args = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
        self.log("Re-spawning " + " ".join(args))
        if sys.path and sys.path[0] == "":
            # started with -m or -c: keep the current directory importable after exec
            path = os.environ.get("PYTHONPATH", "")
            if not path.startswith("." + os.pathsep):
                os.environ["PYTHONPATH"] = "." + os.pathsep + path
        os.chdir(_startup_cwd)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, args)
