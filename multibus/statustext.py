"""``multibus status`` as text: the table a person reads (``status --json`` is the stable form).

One line for the supervisor (state, workers, uptime, containment), one per group that is not
as the fleet is (FATAL, stopped alone, reloaded), the hosts of a parent, then a row per
worker, and a summary of the counters that mean trouble (invalid frames, refusals, drops).
"""

from __future__ import annotations

from typing import Any

from multibus.targets import qualified

__all__ = ["format_status"]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


def format_status(st: dict[str, Any]) -> str:
    """The human table of ``multibus status``."""
    lines = []
    n = len(st["workers"])
    head = (f"{st['name']} (pid {st['pid']}): {st['state']}, {n} worker{'s' if n != 1 else ''}, "
            f"up {_duration(st['uptime'])}")
    if st.get("containment"):  # which boundary holds every descendant (issue 14)
        head += f", containment: {st['containment']}"
    lines.append(head)
    trouble = _trouble(st.get("counters") or {})
    if trouble:
        lines.append(f"  counters: {trouble}")
    for op in st["queue"]:
        lines.append(f"  {op['state']}: {op['action']}"
                     + (f" {op['args']}" if op["args"] else ""))
    for h in st.get("hosts", ()):  # a parent of hosts: each host's own state
        lines.append(f"  host {h['name']}: {h['state']}" + (
            f" (last seen {_duration(h['last_seen'])} ago: {h['lost']})"
            if h["state"] == "LOST" else f", {h['workers']} workers")
            + (f"; {h['error']}" if h.get("error") else ""))
    for g in st.get("groups", ()):  # a group not as the fleet is: FATAL, or stopped alone
        gstate = g.get("state")
        if gstate and (gstate != st["state"] or g.get("error")):
            lines.append(f"  group {qualified(g, 'name')}: {gstate}"
                         + (f": {g['error']}" if g.get("error") else ""))
    for g in st.get("groups") or ():  # once reloaded: its code generation, old/new workers
        if g.get("generation"):
            lines.append(f"  {g['name']}: code generation {g['generation']}, {g['new']} "
                         f"worker{'s' if g['new'] != 1 else ''} on it, {g['old']} on older")
    # LAUNCH ('fork' / 'exec (why)') only when a worker was exec'd: forking is the default
    launch = any(w.get("launch") not in (None, "fork") for w in st["workers"])
    hosts = "hosts" in st  # a HOST column: this supervisor's own rows show its name
    rows = [(("HOST",) if hosts else ()) + (
            "GROUP", "WORKER", "PID", "STATE", "RESTARTS", "UPTIME", "CPU%", "MEM")
            + (("LAUNCH",) if launch else ())]
    for w in st["workers"]:
        rows.append(((w.get("host") or st["name"],) if hosts else ()) + (
            w["group"], w["name"], str(w["pid"] or "-"),
            w["state"] + (f" ({w['exit_code']})" if w["exit_code"] and not w["pid"] else "")
            + (" (stuck)" if w.get("stuck") else ""),
            str(w["restarts"]), _duration(w["uptime"] if w["pid"] else None),
            "-" if w["cpu_percent"] is None else f"{w['cpu_percent']:.1f}", _size(w["memory_rss"]),
        ) + ((w.get("launch") or "-",) if launch else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    return "\n".join(lines)


_TROUBLE = (("control", "invalid", "invalid control request"),
            ("control", "refused", "refused control request"),
            ("bridge", "invalid", "invalid frame"), ("bridge", "gaps", "gap"),
            ("bridge", "lost", "lost message"), ("bridge", "stale", "stale batch"),
            ("bridge", "dropped", "dropped message"),
            ("bridge", "handshake_failed", "failed handshake"),
            ("bridge", "zap_refused", "refused CURVE key"),
            ("bridge", "name_refused", "refused peer name"))


def _trouble(counters: dict[str, dict[str, int]]) -> str:
    """The status document's non-zero trouble counters, in words ('' when all are 0)."""
    said = []
    for part, key, what in _TROUBLE:
        n = counters.get(part, {}).get(key, 0)
        if n:
            said.append(f"{n} {what}{'s' if n != 1 else ''}")
    return ", ".join(said)
