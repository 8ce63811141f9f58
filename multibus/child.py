"""One child process of a supervisor, and how it is ended.

:class:`Child` is what the supervisor knows of a process it spawned (its exit, its last
lines, how it had to be ended). :func:`stop_children` waits for children asked to stop and
escalates, SIGTERM then SIGKILL, to the process groups of those that do not; every signal
goes through :func:`signal_group`, which resumes a stopped group as systemd does.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Child", "signal_group", "stop_children"]


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``, then SIGCONT, as systemd does: a suspended
    (SIGSTOPped) process would act on a SIGTERM only once resumed, and be SIGKILLed first.
    False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
        if sig not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT):
            os.killpg(pgid, signal.SIGCONT)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


@dataclass(eq=False)
class Child:
    """One spawned process. Fields after ``popen`` are updated by the manager thread only."""

    name: str
    popen: Any  # subprocess.Popen, or a zygoteclient.ForkedProcess (pid, stdout, stderr, ...)
    started: float = field(default_factory=time.monotonic)
    returncode: int | None = None
    ended: float | None = None
    exited: threading.Event = field(default_factory=threading.Event)
    drained: threading.Event = field(default_factory=threading.Event)
    last_lines: list[str] = field(default_factory=list)  # the last few stderr/stdout lines
    data: dict[str, Any] = field(default_factory=dict)  # free for the owner (supervisor)
    # How its owner had to end it ('SIGTERM', 'SIGTERM, then SIGKILL', 'SIGKILL'); empty if it
    # was never signalled. Set by :func:`stop_children` and :meth:`kill`.
    signalled: str = ""

    def kill(self) -> None:
        """SIGKILL its process group now and say so in ``signalled``; :func:`stop_children`
        then only waits for it. Safe in a signal handler (no lock, no log)."""
        if self.returncode is None:
            signal_group(self.pgid, signal.SIGKILL)
            self.signalled = "SIGKILL"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def pgid(self) -> int:
        return self.popen.pid  # spawned with process_group=0: leader of its own group

    def describe_exit(self) -> str:
        """'exit code 3' / 'killed by SIGKILL' / 'running'."""
        rc = self.returncode
        if rc is None:
            return "running"
        if rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exit code {rc}"


def stop_children(
    children: Iterable[Child],
    deadlines: Mapping[Child, float] | float,
    term_timeout: float = 2.0,
    kill_timeout: float = 5.0,
    log: Callable[[str, int], None] | None = None,
) -> set[Child]:
    """Wait for children to exit, escalating SIGTERM then SIGKILL to their process groups.

    ``deadlines`` is a monotonic deadline per child (or one for all) by which it should have
    exited on its own (the caller asked it to). A child still alive then gets SIGTERM to its
    process group, and ``term_timeout`` later SIGKILL. A KeyboardInterrupt while waiting (a
    second Ctrl-C) escalates to SIGKILL at once. A child already killed (:meth:`Child.kill`)
    is only waited for: nothing more is sent or said about it. Returns the children that had
    to be signalled here; each one's ``signalled`` says how. A child whose
    ``data["kill_at_deadline"]`` is set (a program already sent its own stop signal) gets
    SIGKILL at its deadline, without the SIGTERM step.
    """
    children = [c for c in children]
    signalled: set[Child] = set()

    def say(msg: str, level: int = 30) -> None:
        if log is not None:
            log(msg, level)

    def deadline_of(c: Child) -> float:
        return deadlines if isinstance(deadlines, float | int) else deadlines[c]

    def wait_until(cs: list[Child], when: Callable[[Child], float]) -> list[Child]:
        for c in cs:
            c.exited.wait(max(0.0, when(c) - time.monotonic()))
        return [c for c in cs if not c.exited.is_set()]

    def unkilled(cs: list[Child]) -> list[Child]:
        return [c for c in cs if not c.exited.is_set() and c.signalled != "SIGKILL"]

    def kill_all(cs: list[Child], why: str) -> None:
        for c in unkilled(cs):
            say(f"{c.name} (pid {c.pid}): {why}; sending SIGKILL to its process group")
            signal_group(c.pgid, signal.SIGKILL)
            c.signalled = f"{c.signalled}, then SIGKILL" if c.signalled else "SIGKILL"
            signalled.add(c)

    try:
        left = unkilled(wait_until(unkilled(children), deadline_of))
        kill_all([c for c in left if c.data.get("kill_at_deadline")],
                 "did not stop in time after its stop signal")
        left = [c for c in left if not c.data.get("kill_at_deadline")]
        for c in left:
            say(f"{c.name} (pid {c.pid}) did not stop in time; sending SIGTERM to its group")
            signal_group(c.pgid, signal.SIGTERM)
            c.signalled = "SIGTERM"
            signalled.add(c)
        term_deadline = time.monotonic() + term_timeout
        left = wait_until(left, lambda c: term_deadline)
        kill_all(left, f"still alive {term_timeout:g}s after SIGTERM")
    except KeyboardInterrupt:
        kill_all(children, "interrupted again")
    kill_deadline = time.monotonic() + kill_timeout
    while True:
        try:
            left = wait_until([c for c in children if not c.exited.is_set()],
                              lambda c: kill_deadline)
            break
        except KeyboardInterrupt:
            kill_all(children, "interrupted again")
    for c in left:
        say(f"{c.name} (pid {c.pid}) survived SIGKILL for {kill_timeout:g}s", 40)
    return signalled
