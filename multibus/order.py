"""Group ordering: ``after = ["db", "cache"]`` as start waves, checked for unknown names and cycles.

Pure functions over ``{group: (groups it runs after, ...)}`` in fleet-file order, no specs and
no processes. A fleet starts wave by wave (each wave once every group it runs after is
STARTED) and stops in the reverse order. Groups that need nothing of each other share a wave,
so a fleet without ``after`` is one wave: everything at once, as before ordering existed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

__all__ = ["OrderError", "check", "waves"]


class OrderError(ValueError):
    """``after`` names an unknown group or makes a cycle; the message says which."""


def check(after: Mapping[str, Sequence[str]]) -> None:
    """Raise OrderError when a group runs after an unknown group, itself, or in a cycle."""
    for group, deps in after.items():
        for dep in deps:
            if dep not in after:
                raise OrderError(f"groups.{group}.after: no group {dep!r}; groups: "
                                 f"{', '.join(after)}")
    state: dict[str, int] = {}  # 1: being visited, 2: done

    def visit(group: str, path: list[str]) -> None:
        state[group] = 1
        for dep in after[group]:
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [group, dep]
                raise OrderError(f"groups.{group}.after: a cycle: {' -> '.join(cycle)} (a "
                                 "group cannot run after itself); remove one of these")
            if dep not in state:
                visit(dep, path + [dep])
        state[group] = 2

    for group in after:
        if group not in state:
            visit(group, [group])


def waves(after: Mapping[str, Sequence[str]],
          among: Iterable[str] | None = None) -> list[list[str]]:
    """The start order of the groups ``among`` (default: all), in waves: a group comes
    after every group it runs after, directly or not; within a wave, fleet-file order.
    Assumes :func:`check` passed. Stop in ``reversed(waves(...))``."""
    keep = None if among is None else set(among)
    chosen = [g for g in after if keep is None or g in keep]
    level: dict[str, int] = {}

    def depth(group: str) -> int:
        if group not in level:
            level[group] = 1 + max((depth(d) for d in after[group]), default=-1)
        return level[group]

    out: list[list[str]] = []
    for group in chosen:
        d = depth(group)
        while len(out) <= d:
            out.append([])
        out[d].append(group)
    return [w for w in out if w]
