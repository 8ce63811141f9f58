"""The name grammar: fleet and peer names, group names, and worker names ``group.index``.

Every module that accepts, builds or takes apart a name does it here, so the rules are
written once. The lowest layer: imports nothing of multibus.

* a **name** (a fleet, a hub, a bridge peer) is 1-64 of ``[A-Za-z0-9_.-]``, not starting
  with ``.`` or ``-``: it is a file name in the runtime dir and a ZeroMQ routing id;
* a **group** name is 1-64 of ``[A-Za-z0-9_-]`` (no dot, so ``group.index`` parses back);
* a **worker** name is ``<group>.<index>`` with a decimal index below 10**9.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = [
    "NAME_MAX",
    "WorkerName",
    "check_name",
    "valid_group",
    "valid_host",
    "valid_name",
]

NAME_MAX = 64
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z", re.ASCII)
_GROUP = re.compile(r"[A-Za-z0-9_-]{1,64}\Z", re.ASCII)
_WORKER = re.compile(r"([A-Za-z0-9_-]{1,64})\.(\d{1,9})\Z", re.ASCII)
# A worker's name as the prefix of a line it logged: "job.0 | text".
WORKER_PREFIX = re.compile(r"([A-Za-z0-9_-]{1,64})\.(\d{1,9}) \| ", re.ASCII)


def valid_name(name: object) -> bool:
    """A fleet, hub or peer name: 1-64 of [A-Za-z0-9_.-], not starting with '.' or '-'."""
    return type(name) is str and _NAME.match(name) is not None


def check_name(name: object, what: str = "name") -> str:
    """Return ``name`` if :func:`valid_name`; else raise ValueError naming the rule."""
    if not valid_name(name):
        raise ValueError(
            f"invalid {what} {name!r}: use 1-{NAME_MAX} characters from [A-Za-z0-9_.-], "
            "not starting with '.' or '-'"
        )
    return name  # type: ignore[return-value]


def valid_group(name: object) -> bool:
    """A group name: 1-64 of [A-Za-z0-9_-]."""
    return type(name) is str and _GROUP.match(name) is not None


class WorkerName(NamedTuple):
    """``job.3`` as ``WorkerName("job", 3)``; ``str()`` gives the name back."""

    group: str
    index: int

    def __str__(self) -> str:
        return f"{self.group}.{self.index}"

    @classmethod
    def parse(cls, name: object) -> WorkerName | None:
        """The parts of a worker name, or None when ``name`` is not one."""
        if type(name) is not str:
            return None
        m = _WORKER.match(name)
        return None if m is None else cls(m.group(1), int(m.group(2)))


def valid_host(name: object) -> bool:
    """A host's name (several hosts): a valid name not shaped like a worker's (``group.N``),
    so that ``HOST:job.2`` and ``logs NAME`` cannot be read two ways."""
    return valid_name(name) and WorkerName.parse(name) is None
