"""A supervisor's file descriptor budget: raise the limit, count, refuse before running out.

Running out of descriptors is not an error libzmq survives: an ipc listener whose
``accept()`` fails with EMFILE aborts the whole process (the assertion "Too many open files
(src/ipc_listener.cpp)", libzmq 4.3.5). So a supervisor must never get there:

* :func:`raise_soft_limit` at start: the soft ``RLIMIT_NOFILE`` goes up to the hard one, as
  systemd and nginx do (the workers inherit it, as they would a raised ``ulimit -n``);
* :func:`check_workers`: a fleet, or a ``scale``, that would not fit is refused in one line
  naming the limit and how to raise it. Measured: :data:`BASE` descriptors of its own (its
  threads' wakeups, the hub's and the control socket's listeners, the zygote's pipes) and
  :data:`PER_WORKER` per worker (its stdout and stderr pipes, its pidfd, its two ipc
  connections to the hub);
* :func:`near_limit` / :func:`has_room`: the control socket stops listening once the
  descriptors in use come within :func:`headroom` of the limit (so a flood of connections
  can neither abort the supervisor nor eat the descriptors a worker's restart needs), and
  listens again when they are back under twice that.

Linux only (``/proc/self/fd``). The lowest layer: imports nothing of multibus.
"""

from __future__ import annotations

import os
import resource

__all__ = ["BASE", "PER_WORKER", "FdBudgetExceeded", "check_workers", "has_room", "headroom",
           "connections_cap", "in_use", "limit", "near_limit", "raise_soft_limit", "workers_fit"]

PER_WORKER = 5  # measured: 2 pipes + 1 pidfd + 2 hub connections (docs/design.md)
BASE = 64  # measured 44-49 with one worker and the zygote; rounded up


class FdBudgetExceeded(OSError):
    """The workers asked for would not fit in the file descriptor limit; the message says
    the limit and how to raise it."""


def limit() -> int:
    """The soft ``RLIMIT_NOFILE``: how many descriptors this process may have open."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (capped at the kernel's
    ``fs.nr_open``); return (before, after). Never lowers it, never fails."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            return soft, soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft
        return soft, target
    return soft, soft


def headroom(most: int | None = None) -> int:
    """Descriptors kept free for restarts and for what is already on its way in."""
    most = limit() if most is None else most
    return max(32, most // 16)


def in_use() -> int:
    """How many descriptors this process has open now."""
    return len(os.listdir("/proc/self/fd")) - 1  # not the one listdir() itself had open


def workers_fit(most: int | None = None) -> int:
    """How many workers a supervisor can run within the limit ``most`` (default: ours)."""
    most = limit() if most is None else most
    return max(0, (most - BASE - headroom(most)) // PER_WORKER)


def check_workers(total: int, what: str) -> None:
    """Raise :class:`FdBudgetExceeded` unless ``total`` workers fit (``what`` names the
    request in the message: "this fleet", "scale web 300")."""
    most = limit()
    fit = workers_fit(most)
    if total <= fit:
        return
    need = BASE + PER_WORKER * total + 32
    while workers_fit(need) < total:  # the headroom grows with the limit
        need += 1
    raise FdBudgetExceeded(
        f"{what}: {total} workers need about {need} file descriptors, over this supervisor's "
        f"limit of {most} (RLIMIT_NOFILE; at most {fit} workers fit); raise it (`ulimit -n "
        f"{need}` before starting, LimitNOFILE={need} in a systemd unit) or run fewer")


def near_limit(fd: int, most: int | None = None) -> bool:
    """True when descriptor number ``fd`` (descriptors come lowest first, so it tells how
    many are open) is within :func:`headroom` of the limit: stop taking connections."""
    most = limit() if most is None else most
    return fd >= most - headroom(most)


def connections_cap(most: int | None = None) -> int:
    """How many connections a listener of ours takes at once: a quarter of what the limit
    leaves after :data:`BASE`, so that a burst accepted before it stops listening still fits
    (libzmq accepts on its own thread; we only hear of it afterwards)."""
    most = limit() if most is None else most
    return max(8, (most - BASE) // 4)


def has_room(most: int | None = None) -> bool:
    """True when the descriptors in use are back under the limit by twice the headroom."""
    most = limit() if most is None else most
    return in_use() < most - 2 * headroom(most)
