"""Op targets: a group (``job``) or a worker (``job.2``), as control commands name them.

Pure (names only): the shape of a targets list on the wire, which of them a fleet does not
have (said as ``multibus scale`` says it), a status document cut down to them, and signal
names (``HUP``, ``SIGHUP`` or a number) for ``multibus signal``. On a parent of several
hosts a target may name a host's group or worker: ``HOST:GROUP``, ``HOST:GROUP.N``
(:func:`split_host`).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from typing import Any

from multibus.names import WorkerName, valid_group, valid_name

__all__ = ["MAX_TARGETS", "is_host_target", "is_targets", "only", "parse_signal",
           "qualified", "split_host", "unknown"]

MAX_TARGETS = 64  # targets in one request


def split_host(target: str) -> tuple[str | None, str]:
    """``"web-b:job.2"`` -> ``("web-b", "job.2")``; a target without a host -> ``(None,
    target)``."""
    host, sep, rest = target.partition(":")
    return (host, rest) if sep else (None, target)


def _is_target(t: Any) -> bool:
    return isinstance(t, str) and (valid_group(t) or WorkerName.parse(t) is not None)


def is_host_target(t: Any) -> bool:
    """``HOST:GROUP`` or ``HOST:GROUP.N``."""
    if not isinstance(t, str):
        return False
    host, rest = split_host(t)
    return host is not None and valid_name(host) and _is_target(rest)


def is_targets(v: Any) -> bool:
    """A wire targets list: at most MAX_TARGETS group or worker names (``HOST:`` prefixed
    or not)."""
    return isinstance(v, list) and len(v) <= MAX_TARGETS and all(
        _is_target(t) or is_host_target(t) for t in v)


def unknown(targets: Iterable[str], groups: Iterable[str],
            workers: Callable[[], set[str]]) -> str | None:
    """Why the first of ``targets`` that is not one of ``groups`` nor of ``workers()``
    (asked only for a worker name) is unknown, naming what there is; None: all known."""
    groups = list(groups)
    names: set[str] | None = None
    for t in targets:
        host, rest = split_host(t)
        wn = WorkerName.parse(rest)
        group = rest if wn is None else wn.group
        group = group if host is None else f"{host}:{group}"
        if group not in groups:
            return f"no group {group!r}; groups: {', '.join(groups)}"
        if wn is not None:
            names = workers() if names is None else names
            if t not in names:
                known = sorted((n for n in names if n.startswith(group + ".")),
                               key=lambda n: WorkerName.parse(split_host(n)[1]))
                return f"no worker {t!r}; workers of {group}: {', '.join(known) or 'none'}"
    return None


def qualified(row: dict[str, Any], key: str) -> str:
    """A status row's group or worker name, ``HOST:``-prefixed if it is a host's."""
    return f"{row['host']}:{row[key]}" if row.get("host") else row[key]


def only(st: dict[str, Any], targets: Iterable[str]) -> dict[str, Any]:
    """The status document ``st`` with only the groups and workers of ``targets``."""
    keep = set(targets)
    workers = [w for w in st["workers"]
               if qualified(w, "name") in keep or qualified(w, "group") in keep]
    shown = {qualified(w, "group") for w in workers} | {
        qualified(g, "name") for g in st["groups"] if qualified(g, "name") in keep}
    return {**st, "groups": [g for g in st["groups"] if qualified(g, "name") in shown],
            "workers": workers}


def parse_signal(value: str | int) -> int:
    """'HUP', 'SIGHUP', 'hup', '1' or 1 -> 1; ValueError naming the signal otherwise."""
    text = "" if isinstance(value, bool) else str(value).strip()
    if text.isdigit() and 0 < int(text) < signal.NSIG:
        return int(text)
    name = text.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"unknown signal {value!r}; use a name like HUP or TERM, or a "
                         f"number from 1 to {signal.NSIG - 1}") from None
