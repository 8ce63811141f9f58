"""Worker specs: what a supervisor runs, as plain data (OTP-style child specs).

A spec names a group of identical workers; each instance is called ``"<name>.<i>"``
(:class:`~multibus.names.WorkerName`). Specs
are validated up front so a typo fails with one line naming the field and the fix, before
anything is spawned. ``WorkerSpec.from_dict`` accepts the same keys as the constructor, so
specs can come from JSON/TOML.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from multibus import order
from multibus.names import WorkerName, valid_group
from multibus.sockets import parse_address
from multibus.targets import parse_signal

__all__ = ["ON_FATAL", "RESTART_MODES", "SLOW_PEER_POLICIES", "SocketSpec", "SpecError",
           "WorkerSpec", "Intensity", "parse_size", "signal_name", "check_rlimits",
           "resolve_ids", "login_env"]

RESTART_MODES = ("permanent", "transient", "temporary")
SLOW_PEER_POLICIES = ("drop", "restart")
ON_FATAL = ("stop-group", "stop-fleet")  # a group at its restart intensity: what stops
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_RESERVED_CHANNELS = {"main", "start", "stop", "graceful", "exit", "log"}


class SpecError(ValueError):
    """A worker spec is invalid; the message names the field and the fix."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_size(value: int | str) -> int:
    """A size in bytes: an integer, or a string like ``"512MB"`` (KB/MB/GB/TB are powers of
    1000, KiB/MiB/GiB/TiB of 1024; ``"100"`` and ``"100B"`` are bytes). ValueError otherwise
    (or when it is not > 0)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = (m.group(2) or "").lower().removesuffix("b")
        n = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise ValueError(f"{value!r} is not a size: use bytes or a string like '512MB', "
                         "'1.5GiB' (KB, MB, GB, KiB, MiB, GiB)")
    if n <= 0:
        raise ValueError(f"{value!r}: a size must be > 0")
    return n


@dataclass(frozen=True)
class WorkerSpec:
    """A group of identical workers.

    name: group name ([A-Za-z0-9_-], unique per supervisor); instances are ``name.0``...
    target: ``package.module:callable``, called in the child as ``callable(bus)`` to
        subscribe its plugins.
    count: number of instances. channels: bus channels mirrored between parent and worker.
    restart: 'permanent' (always restarted), 'transient' (restarted unless it exits 0),
        'temporary' (never restarted).
    stop_timeout: seconds a worker gets to stop/exit on request before SIGTERM, then SIGKILL.
    start_timeout: seconds a worker gets to report STARTED.
    env: extra environment variables; cwd: working directory (None: the supervisor's).
    slow_peer: what happens to a worker that looks stuck: it stops reading its mirrored
        channels (its queue in the hub makes no progress for 5 s, or holds 32 MiB; see
        ``transport/fanout.py``), or its main thread does not take up a lifecycle command
        within 5 s of receiving it. 'drop' (the default: mirrored messages for it are
        dropped, counted and logged once per episode, until it reads again; nobody else
        waits) or 'restart' (it is terminated, and restarted as its ``restart`` mode says).
        Either way its status row says ``stuck`` (why) while it lasts.
    max_memory: bytes of RSS (or a size string, see :func:`parse_size`) past which a
        worker is gracefully replaced (:mod:`multibus.recycle`); None: no limit.
    max_age: seconds after which a worker is gracefully replaced, plus a random
        ``uniform(0, max_age_jitter)`` of its own (so a group is not replaced all at once).
    cmd: instead of ``target``, any executable and its arguments (exactly one of the two):
        a program without a bus, whose state the supervisor drives (:mod:`multibus.programs`).
        ``ready`` (:mod:`multibus.readiness`) says when it counts as STARTED; ``stop_signal``
        (then SIGKILL after ``stop_timeout``) ends it, ``graceful_signal`` is its reload.
    user, group: run as that user (its groups) / group; only the root can. A bus worker
        then reaches its hub on sockets of that user's (``Bridge.share_with``).
    umask: the workers' umask (None: the supervisor's). rlimits: ``{"nofile": 4096}``
        (``resource.RLIMIT_*`` lower-case -> a limit for soft and hard, ``"unlimited"``, or
        ``[soft, hard]``), set in the child before its code runs.
    after: groups that must be STARTED before this one is spawned (stopped after it).
    max_restarts, restart_period: this group's restart intensity (None: the supervisor's).
    on_fatal: at that intensity, 'stop-group' (it goes FATAL, the others keep running) or
        'stop-fleet' (the fleet stops, the supervisor exits 1).
    sockets: names of the supervisor's listening sockets (``[sockets.NAME]``) its workers
        inherit at fd 3... (LISTEN_FDS, see :mod:`multibus.sockets`).
    max_surge: replacements a rolling reload runs ahead of the old workers (default 1).
    """

    name: str
    target: str | None = None
    count: int = 1
    channels: tuple[str, ...] = ()
    restart: str = "permanent"
    stop_timeout: float = 5.0
    start_timeout: float = 10.0
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    slow_peer: str = "drop"
    max_memory: int | None = None
    max_age: float | None = None
    max_age_jitter: float = 0.0
    cmd: tuple[str, ...] = ()
    ready: str | None = None
    stop_signal: str = "SIGTERM"
    graceful_signal: str = "SIGHUP"
    user: str | None = None
    group: str | None = None
    umask: int | None = None
    rlimits: Mapping[str, Any] = field(default_factory=dict)
    # issue 16: ordering and failure isolation, per group (see multibus.order, keeper)
    after: tuple[str, ...] = ()
    max_restarts: int | None = None  # None: the supervisor's Intensity
    restart_period: float | None = None
    on_fatal: str = "stop-group"
    sockets: tuple[str, ...] = ()
    max_surge: int = 1

    def __post_init__(self) -> None:
        if not valid_group(self.name):
            raise SpecError(
                f"worker spec name {self.name!r} is invalid: use 1-64 letters, digits, '_' or '-'"
            )
        where = f"worker spec {self.name!r}"
        self._check_program(where)
        if self.cmd:
            pass
        elif not isinstance(self.target, str) or not _TARGET.match(self.target):
            raise SpecError(
                f"{where}: target {self.target!r} must look like 'package.module:callable'"
            )
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 0:
            raise SpecError(f"{where}: count {self.count!r} must be an integer >= 0")
        if self.restart not in RESTART_MODES:
            raise SpecError(
                f"{where}: restart {self.restart!r} must be one of {', '.join(RESTART_MODES)}"
            )
        if self.slow_peer not in SLOW_PEER_POLICIES:
            raise SpecError(f"{where}: slow_peer {self.slow_peer!r} must be one of "
                            f"{', '.join(SLOW_PEER_POLICIES)}")
        for key in ("stop_timeout", "start_timeout"):
            value = getattr(self, key)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise SpecError(f"{where}: {key} {value!r} must be a number of seconds > 0")
        self._check_recycling(where)
        channels = (self.channels,) if isinstance(self.channels, str) else self.channels
        channels = tuple(channels)
        for ch in channels:
            if not isinstance(ch, str) or not ch or ch in _RESERVED_CHANNELS:
                raise SpecError(
                    f"{where}: channel {ch!r} cannot be mirrored (lifecycle channels travel as "
                    "commands, 'main' and 'log' are never mirrored)"
                )
        object.__setattr__(self, "channels", channels)
        self._check_reload_keys(where)
        if not isinstance(self.env, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()
        ):
            raise SpecError(f"{where}: env must map str to str")
        object.__setattr__(self, "env", dict(self.env))
        if self.cwd is not None and not isinstance(self.cwd, str):
            raise SpecError(f"{where}: cwd must be a path string or None")
        self._check_groups(where)

    def _check_groups(self, where: str) -> None:
        """after, max_restarts, restart_period, on_fatal (issue 16)."""
        after = (self.after,) if isinstance(self.after, str) else tuple(self.after)
        if not all(valid_group(g) for g in after):
            raise SpecError(f"{where}: after {list(after)!r} must list group names")
        object.__setattr__(self, "after", after)
        if self.max_restarts is not None and (not isinstance(self.max_restarts, int) or isinstance(
                self.max_restarts, bool) or self.max_restarts < 0):
            raise SpecError(f"{where}: max_restarts {self.max_restarts!r} must be an integer >= 0")
        period = self.restart_period
        if period is not None and (not isinstance(period, int | float) or isinstance(
                period, bool) or period <= 0):
            raise SpecError(f"{where}: restart_period {period!r} must be a number of seconds > 0")
        if self.on_fatal not in ON_FATAL:
            raise SpecError(f"{where}: on_fatal {self.on_fatal!r} must be one of "
                            f"{', '.join(ON_FATAL)}")

    def intensity(self, default: Intensity) -> Intensity:
        """Its restart intensity: its own max_restarts/restart_period, else ``default``'s."""
        return Intensity(default.max_restarts if self.max_restarts is None else self.max_restarts,
                         default.period if self.restart_period is None else self.restart_period)

    def _check_recycling(self, where: str) -> None:
        """max_memory (bytes, or a size string), max_age and max_age_jitter."""
        if self.max_memory is not None:
            try:
                object.__setattr__(self, "max_memory", parse_size(self.max_memory))
            except ValueError as e:
                raise SpecError(f"{where}: max_memory {e}") from None
        if self.max_age is not None and (not isinstance(self.max_age, int | float) or isinstance(
                self.max_age, bool) or self.max_age <= 0):
            raise SpecError(f"{where}: max_age {self.max_age!r} must be a number of seconds > 0")
        jitter = self.max_age_jitter
        if not isinstance(jitter, int | float) or isinstance(jitter, bool) or jitter < 0:
            raise SpecError(f"{where}: max_age_jitter {jitter!r} must be a number of seconds "
                            ">= 0")
        if jitter and self.max_age is None:
            raise SpecError(f"{where}: max_age_jitter needs max_age; set max_age too")

    def _check_reload_keys(self, where: str) -> None:
        """``sockets`` and ``max_surge`` (issue 17)."""
        socks = (self.sockets,) if isinstance(self.sockets, str) else tuple(self.sockets)
        if not all(isinstance(s, str) and s for s in socks) or len(set(socks)) != len(socks):
            raise SpecError(f"{where}: sockets {socks!r} must be distinct socket names")
        object.__setattr__(self, "sockets", socks)
        surge = self.max_surge
        if not isinstance(surge, int) or isinstance(surge, bool) or surge < 1:
            raise SpecError(f"{where}: max_surge {surge!r} must be an integer >= 1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerSpec:
        """Build a spec from plain data; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(
                f"worker spec {data.get('name', '?')!r}: unknown key(s) {', '.join(unknown)}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        missing = [k for k in ("name",) if k not in data]
        if "target" not in data and "cmd" not in data:
            missing.append("target (or cmd)")
        if missing:
            raise SpecError(f"worker spec is missing {', '.join(missing)}")
        return cls(**dict(data))

    def _check_program(self, where: str) -> None:
        """The keys of a ``cmd`` program and of launch settings (user, umask, rlimits)."""
        if isinstance(self.cmd, str):
            raise SpecError(f"{where}: cmd must be a list: the program, then its arguments")
        cmd = tuple(self.cmd or ())
        if cmd and (not all(isinstance(a, str) for a in cmd) or not cmd[0]):
            raise SpecError(f"{where}: cmd must be a list of strings, the program first")
        object.__setattr__(self, "cmd", cmd)
        if bool(cmd) == (self.target is not None):
            raise SpecError(f"{where}: give exactly one of target (a Python callable) and cmd "
                            "(a program)")
        if cmd and self.channels:
            raise SpecError(f"{where}: a cmd program has no bus: remove channels")
        if self.ready is not None:
            if not cmd:
                raise SpecError(f"{where}: ready applies to cmd programs (a bus worker is "
                                "STARTED when its bus says so)")
            from multibus.readiness import parse

            try:
                parse(self.ready)
            except ValueError as e:
                raise SpecError(f"{where}: {e}") from None
        for key in ("stop_signal", "graceful_signal"):
            object.__setattr__(self, key, signal_name(getattr(self, key), f"{where}: {key}"))
        if self.umask is not None and (not isinstance(self.umask, int) or isinstance(
                self.umask, bool) or not 0 <= self.umask <= 0o777):
            raise SpecError(f"{where}: umask {self.umask!r} must be an integer 0-0o777 "
                            "(e.g. 0o022)")
        object.__setattr__(self, "rlimits", check_rlimits(self.rlimits, where))
        resolve_ids(self.user, self.group, where)

    def launch_settings(self) -> dict[str, Any]:
        """user, group, umask (octal text), rlimits (name -> [soft, hard], 'unlimited'): the
        ``limits`` of ``multibus status --json``."""
        def v(x: int) -> int | str:
            return "unlimited" if x == RLIM_INFINITY else x

        return {"user": self.user, "group": self.group,
                "umask": None if self.umask is None else f"{self.umask:04o}",
                "rlimits": {k: [v(s), v(h)] for k, (s, h) in self.rlimits.items()}}

    def status_fields(self) -> dict[str, Any]:
        """What ``status --json`` adds to this group's entry, only where set (a bus group
        without launch settings adds nothing): ``cmd`` and ``ready`` for a program,
        ``limits`` (:meth:`launch_settings`) when any is set, and ``max_memory``, ``max_age``
        and ``max_age_jitter`` when either limit is set (bytes, seconds; null when not set)."""
        out: dict[str, Any] = {}
        if self.max_memory or self.max_age:
            out.update(max_memory=self.max_memory, max_age=self.max_age,
                       max_age_jitter=self.max_age_jitter)
        if self.cmd:
            out.update(cmd=list(self.cmd), ready=self.ready)
        if (self.user, self.group, self.umask) != (None, None, None) or self.rlimits:
            out["limits"] = self.launch_settings()
        return out

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def instance_names(self, count: int | None = None) -> list[str]:
        n = self.count if count is None else count
        return [str(WorkerName(self.name, i)) for i in range(n)]


RLIM_INFINITY = -1  # resource.RLIM_INFINITY on Linux


def signal_name(value: Any, what: str = "signal") -> str:
    """'TERM' / 'sigterm' / 15 -> 'SIGTERM' (:func:`multibus.targets.parse_signal`, named);
    SpecError naming ``what`` otherwise."""
    import signal

    try:
        return signal.Signals(parse_signal(value)).name
    except ValueError:
        raise SpecError(f"{what}: {value!r} is not a signal; use a name like 'SIGTERM' or "
                        "'HUP'") from None


def check_rlimits(value: Any, where: str) -> dict[str, tuple[int, int]]:
    """``{"nofile": 4096, "core": 0, "stack": [8388608, "unlimited"]}`` -> name -> (soft,
    hard), RLIM_INFINITY for 'unlimited'. Names are ``resource.RLIMIT_*`` lower-case; a limit
    above this process's hard limit needs root (SpecError says so)."""
    import os
    import resource

    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: rlimits must be a table like {{ nofile = 4096 }}")
    names = sorted(n[7:].lower() for n in dir(resource) if n.startswith("RLIMIT_"))
    out: dict[str, tuple[int, int]] = {}

    def one(key: str, x: Any) -> int:
        if x in ("unlimited", "infinity"):
            return RLIM_INFINITY
        if isinstance(x, int) and not isinstance(x, bool) and x >= 0:
            return x
        raise SpecError(f"{where}: rlimits.{key}: {x!r} must be an integer >= 0, "
                        "'unlimited', or [soft, hard]")

    for key, x in value.items():
        if key not in names:
            raise SpecError(f"{where}: rlimits.{key}: unknown limit; expected one of "
                            f"{', '.join(names)}")
        soft, hard = ((one(key, x[0]), one(key, x[1])) if isinstance(x, list | tuple)
                      and len(x) == 2 else (one(key, x),) * 2)

        def num(v: int) -> float:
            return float("inf") if v == RLIM_INFINITY else v

        if num(soft) > num(hard):
            raise SpecError(f"{where}: rlimits.{key}: soft {x[0]!r} is above hard {x[1]!r}")
        now = resource.getrlimit(getattr(resource, "RLIMIT_" + key.upper()))[1]
        if num(hard) > num(now) and os.geteuid() != 0:
            raise SpecError(f"{where}: rlimits.{key}: {hard} is above the hard limit "
                            f"{'unlimited' if now == RLIM_INFINITY else now}; only root can "
                            "raise it (raise the supervisor's: ulimit -H, LimitXXX= in systemd)")
        out[key] = (soft, hard)
    return out


def resolve_ids(user: Any, group: Any,
                where: str) -> tuple[int | None, int | None, list[int] | None]:
    """(uid, gid, supplementary groups) to switch to for ``user``/``group`` names (None:
    keep ours); the user's own groups, as a login gives them. SpecError if one does not
    exist, or if we are not root."""
    import grp
    import os
    import pwd

    if user is None and group is None:
        return None, None, None
    for key, x in (("user", user), ("group", group)):
        if x is not None and (not isinstance(x, str) or not x):
            raise SpecError(f"{where}: {key} must be a user/group name")
    try:
        pw = pwd.getpwnam(user) if user is not None else None
    except KeyError:
        raise SpecError(f"{where}: user: no user {user!r} on this system") from None
    try:
        gr = grp.getgrnam(group) if group is not None else None
    except KeyError:
        raise SpecError(f"{where}: group: no group {group!r} on this system") from None
    uid = pw.pw_uid if pw else None
    gid = gr.gr_gid if gr else (pw.pw_gid if pw else None)
    if uid == os.geteuid() and gid in (None, os.getegid()):
        return None, None, None  # already so: nothing to switch
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        raise SpecError(f"{where}: user/group: the supervisor must be root to run a group as "
                        f"another user or group (it runs as {me!r}); remove user/group or "
                        "start it as root")
    groups = os.getgrouplist(pw.pw_name, gid) if pw else [gid]
    return uid, gid, sorted(set(groups))


def login_env(env: dict[str, str], uid: int | None, spec: WorkerSpec) -> None:
    """HOME, USER and LOGNAME as a login as ``uid`` gives them (None: leave ``env`` as it
    is), unless the group's ``env`` sets them."""
    if uid is not None:
        import pwd

        pw = pwd.getpwuid(uid)
        for key, value in (("HOME", pw.pw_dir), ("USER", pw.pw_name), ("LOGNAME", pw.pw_name)):
            env[key] = spec.env.get(key, value)


@dataclass(frozen=True)
class SocketSpec:
    """A listening socket the supervisor owns (``[sockets.NAME]``, :mod:`multibus.sockets`):
    ``address`` ('host:port', '[v6]:port' or 'unix:/path'), the listen ``backlog``, and
    ``mode`` (unix sockets: the file's permissions, e.g. 0o660)."""

    name: str
    address: str
    backlog: int = 1024
    mode: int | None = None

    def __post_init__(self) -> None:
        parse_address(self.address)  # ValueError says what is wrong


@dataclass(frozen=True)
class Intensity:
    """Restart intensity: more than ``max_restarts`` restarts within ``period`` seconds
    (of one group) stop that group (FATAL), or the fleet (``on_fatal = "stop-fleet"``),
    instead of crash-looping."""

    max_restarts: int = 5
    period: float = 10.0


def coerce_specs(specs: Iterable[WorkerSpec | Mapping[str, Any]]) -> list[WorkerSpec]:
    """Specs from objects or dicts; duplicate names are an error."""
    out: list[WorkerSpec] = []
    seen: set[str] = set()
    for s in specs:
        spec = s if isinstance(s, WorkerSpec) else WorkerSpec.from_dict(s)
        if spec.name in seen:
            raise SpecError(f"two worker specs are named {spec.name!r}: names must be unique")
        seen.add(spec.name)
        out.append(spec)
    try:
        order.check({s.name: s.after for s in out})
    except order.OrderError as e:
        raise SpecError(str(e)) from None
    return out
