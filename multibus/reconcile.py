"""Apply a changed fleet file to a running supervisor: change only what differs.

:func:`plan` compares the groups running now with those of the file (pure): groups added,
removed, whose ``count`` changed (scaled), and whose spec changed otherwise (restarted: their
workers exit and new ones start with the new spec). :func:`apply_plan` then does it on the
supervisor's main thread (an 'apply' op): removed groups first (their workers exit, in reverse
``after`` order), then changed and new groups are started in ``after`` order, then counts.
Supervisor settings (``[supervisor]``) other than the groups' restart defaults need a new
``run``; a group that would mirror a channel the hub does not carry is refused up front.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from multibus import fdbudget
from multibus.fleet import Group
from multibus.specs import SpecError, WorkerSpec

if TYPE_CHECKING:
    from multibus.supervisor import Supervisor

__all__ = ["Plan", "apply_plan", "plan"]


@dataclass
class Plan:
    """What differs between the fleet and the file, group by group (file order)."""

    added: list[WorkerSpec] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[WorkerSpec] = field(default_factory=list)
    scaled: list[tuple[str, int, int]] = field(default_factory=list)  # (group, from, to)
    order: list[str] = field(default_factory=list)  # every group of the file, in its order

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.scaled)

    def describe(self) -> str:
        """'added cache; removed old; restarted web; job: 3 -> 5 workers', or 'no change'."""
        said = []
        if self.added:
            said.append("added " + ", ".join(s.name for s in self.added))
        if self.removed:
            said.append("removed " + ", ".join(self.removed))
        if self.changed:
            said.append("restarted " + ", ".join(s.name for s in self.changed))
        said.extend(f"{g}: {a} -> {b} worker{'s' if b != 1 else ''}" for g, a, b in self.scaled)
        return "; ".join(said) or "no change"


def _same(a: WorkerSpec, b: WorkerSpec) -> bool:
    """Equal but for ``count``."""
    return dataclasses.replace(a, count=0) == dataclasses.replace(b, count=0)


def plan(running: Mapping[str, WorkerSpec], counts: Mapping[str, int],
         wanted: Sequence[WorkerSpec]) -> Plan:
    """The :class:`Plan` from the groups ``running`` (with their desired ``counts`` now) to
    the groups ``wanted`` (a file's, validated)."""
    p = Plan(order=[s.name for s in wanted])
    names = set(p.order)
    p.removed = [name for name in running if name not in names]
    for spec in wanted:
        old = running.get(spec.name)
        if old is None:
            p.added.append(spec)
        elif not _same(old, spec):
            p.changed.append(spec)
        elif counts.get(spec.name, old.count) != spec.count:
            p.scaled.append((spec.name, counts.get(spec.name, old.count), spec.count))
    return p


def apply_plan(sup: Supervisor, p: Plan, wanted: Sequence[WorkerSpec],
               started: bool) -> None:
    """Do ``p`` on ``sup`` (its main thread); start what is new or changed if ``started``
    (the fleet is STARTED). SpecError before any change when it cannot be done."""
    hub = set(sup.hub_channels)
    for spec in [*p.added, *p.changed]:
        extra = sorted(set(spec.channels) - hub)
        if extra:
            raise SpecError(f"groups.{spec.name}.channels: {', '.join(extra)} not mirrored by "
                            f"this supervisor (its hub mirrors: {', '.join(sorted(hub)) or 'none'}"
                            "); a new channel needs a new run")
    try:
        fdbudget.check_workers(sum(s.count for s in wanted), "apply")
    except fdbudget.FdBudgetExceeded as e:
        raise SpecError(str(e)) from None
    for wave in [*reversed(sup.groupops.waves(p.removed)), [s.name for s in p.changed]]:
        for group in wave:
            sup.scale(group, 0)  # its workers exit (escalated as a scale down is)
    with sup.keeper.cond:
        groups = sup.fleet.groups
        for name in p.removed:
            del groups[name]
        for spec in [*p.added, *p.changed]:
            groups[spec.name] = Group(spec)
        reordered = {name: groups[name] for name in p.order}
        groups.clear()
        groups.update(reordered)
        sup.specs.clear()
        sup.specs.update((name, g.spec) for name, g in groups.items())
    for name in p.removed:
        sup.restart_policy.reset(name)
    for spec in p.changed:
        sup.restart_policy.reset(spec.name)
    fresh = [s.name for s in [*p.added, *p.changed] if s.count]
    if started and fresh:
        sup.groupops.start(fresh, "STARTED")
    for group, _, count in p.scaled:
        sup.scale(group, count)
    sup.keeper.changed()
