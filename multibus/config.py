"""Fleet files: a TOML description of a supervisor and its worker groups, validated up front.

``load(path)`` parses the file with ``tomllib`` and returns a :class:`FleetConfig` (supervisor
settings + :class:`~multibus.specs.WorkerSpec` list). Every unknown key, wrong type or bad
value raises :class:`ConfigError` with ONE line naming the file, the dotted key and what was
expected, so ``multibus run`` can refuse before anything is started. ``check_targets`` then
imports each group's target in a throwaway process (an interpreter, or a fork as the zygote's:
:mod:`multibus.preflight`) with the worker's environment, so an unimportable target is also
refused up front (and the supervisor never executes user code).

Layout (every key optional except ``groups.<name>.target``, or ``cmd`` instead for a program
that is not Python: see the README; paths are relative to the file)::

    [supervisor]
    name = "fleet"            # hub/control name (--name overrides); default: "multibus"
    pidfile = "fleet.pid"     # default: <runtime dir>/<name>.pid; false: no PID file
    stop_timeout = 5.0        # default stop_timeout of every group
    term_timeout = 2.0        # SIGTERM -> SIGKILL grace
    max_restarts = 5          # restart intensity of every group: more than max_restarts ...
    restart_period = 10.0     # ... restarts of one group within restart_period s: FATAL
    log_level = "info"        # debug | info | warning | error | critical
    log_format = "text"       # text | json
    pythonpath = ["."]        # prepended to every worker's PYTHONPATH
    zygote = true             # fork workers from one preloaded process (the default: fast);
                              # false: exec an interpreter per worker (multibus run --exec)
    zygote_preload = []       # modules that process imports once, e.g. ["app"] (opt-in)
    log_file = "fleet.log"    # every record, also to this file (default: none)
    log_max_bytes = "10MB"    # rotate the log files at this size (default 0: never)
    log_backups = 5           # rotated files kept (fleet.log.1 ... .5)
    containment = "auto"      # auto | cgroup | scan | none (README: Containment)

    [groups.web]              # groups run in file order; the first is the default group
    target = "app:serve"      # package.module:callable, called with the worker's bus
    count = 2
    channels = []             # mirrored channels
    restart = "permanent"     # permanent | transient | temporary
    stop_timeout = 5.0
    start_timeout = 10.0
    env = { PORT = "8080" }
    cwd = "."
    pythonpath = []
    slow_peer = "drop"        # a worker not reading its mirrored channels: drop | restart
    log_file = "web.log"      # this group's records (its workers' logs and output) too
    log_max_bytes = "10MB"    # default: the supervisor's; log_backups likewise
    max_memory = "512MB"      # RSS past which a worker is gracefully replaced
    max_age = 3600            # seconds after which a worker is gracefully replaced ...
    max_age_jitter = 300      # ... plus uniform(0, 300) s of its own
    after = ["db"]            # spawned once these groups are STARTED; stopped before them
    max_restarts = 5          # this group's intensity (default: [supervisor]'s) ...
    restart_period = 10.0
    on_fatal = "stop-group"   # at it: this group goes FATAL | "stop-fleet" (exit 1)
    sockets = ["web"]         # listening sockets its workers inherit at fd 3... (LISTEN_FDS)
    max_surge = 1             # replacements a rolling reload runs ahead

    [sockets.web]             # bound by the supervisor before any worker starts
    address = "127.0.0.1:8080"   # or "[::1]:8080", or "unix:/run/app.sock"
    backlog = 1024
    mode = "0660"             # unix sockets only: the file's permissions
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from multibus import order
from multibus.containment import MODES
from multibus.hostconf import DownstreamConfig, UpstreamConfig, parse_downstream, parse_upstream
from multibus.logfiles import LogFile
from multibus.names import check_name
from multibus.specs import (
    ON_FATAL,
    SLOW_PEER_POLICIES,
    Intensity,
    SocketSpec,
    SpecError,
    WorkerSpec,
    parse_size,
)
from multibus.worker import worker_env

__all__ = [
    "ConfigError",
    "FleetConfig",
    "LOG_LEVELS",
    "from_command",
    "from_target",
    "load",
    "parse_level",
    "worker_env",
]

DEFAULT_NAME = "multibus"
LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
LOG_FORMATS = ("text", "json")
CHECK_TIMEOUT = 20.0  # seconds to import one target in the checker process


class ConfigError(ValueError):
    """A fleet file or target is invalid; ``str()`` is one line naming file, key and fix."""


@dataclass(frozen=True)
class FleetConfig:
    """What ``multibus run`` starts: supervisor settings plus worker groups (in order)."""

    specs: list[WorkerSpec]
    name: str = DEFAULT_NAME
    pidfile: str | bool | None = None  # None: default path in the runtime dir; False: none
    term_timeout: float = 2.0
    intensity: Intensity = field(default_factory=Intensity)
    log_level: int = 20
    log_format: str = "text"
    source: str | None = None  # the file it came from (for messages)
    zygote: bool = True  # fork workers from a preloaded zygote (Supervisor(zygote=...))
    zygote_preload: tuple[str, ...] = ()  # modules the zygote imports (Supervisor(zygote_preload))
    log_file: LogFile | None = None  # every record also goes there ([supervisor] log_file)
    group_log_files: Mapping[str, LogFile] = field(default_factory=dict)  # group -> its file
    containment: str = "auto"  # auto | cgroup | scan | none (multibus.containment)
    path: str | None = None  # the file's absolute path (`multibus apply` re-reads it)
    sockets: tuple[SocketSpec, ...] = ()  # [sockets.NAME] (Supervisor(sockets=...))
    upstream: UpstreamConfig | None = None  # [upstream]: join a parent (multibus.hostconf)
    downstream: DownstreamConfig | None = None  # [downstream]: take child supervisors

    @property
    def default_group(self) -> str | None:
        """The first group: the one SIGTTIN/SIGTTOU scale."""
        return self.specs[0].name if self.specs else None

    def with_name(self, name: str | None) -> FleetConfig:
        """A copy with another supervisor name (``--name``), or self when name is None."""
        if name is None:
            return self
        _check_name(name, "--name")
        return replace(self, name=name)


# --------------------------------------------------------------------------- type checks

def _kind(value: Any) -> str:
    """TOML's name for the type of ``value`` (for messages)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__  # dates and times


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    """Helpers that raise ConfigError prefixed with the file name."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, expected: str, value: Any = None, *, got: bool = True) -> ConfigError:
        where = f"{self.source}: {key}: " if key else f"{self.source}: "
        tail = f", got {_shown(value)} ({_kind(value)})" if got else ""
        return ConfigError(f"{where}expected {expected}{tail}")

    def table(self, key: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "a table", value)
        return value

    def keys(self, key: str, table: Mapping[str, Any], known: Iterable[str]) -> None:
        known = list(known)
        for k in table:
            if k not in known:
                raise ConfigError(
                    f"{self.source}: {_join(key, k)}: unknown key; expected one of "
                    f"{', '.join(known)}"
                )

    def string(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, "a non-empty string", value)
        return value

    def integer(self, key: str, value: Any, minimum: int = 0) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(key, f"an integer >= {minimum}", value)
        return value

    def seconds(self, key: str, value: Any) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            raise self.fail(key, "a number of seconds > 0", value)
        return float(value)

    def strings(self, key: str, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, "an array of non-empty strings", value)
        return list(value)

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def choice(self, key: str, value: Any, choices: Iterable[str]) -> str:
        choices = list(choices)
        if not isinstance(value, str) or value.lower() not in choices:
            raise self.fail(key, "one of " + ", ".join(repr(c) for c in choices), value)
        return value.lower()


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _check_name(name: Any, what: str) -> str:
    try:
        return check_name(name, "hub name")
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None


def parse_level(value: str | int) -> int:
    """'info' / 'WARNING' / '20' -> 20; ConfigError on anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text.isdigit():
        return int(text)
    if text in LOG_LEVELS:
        return LOG_LEVELS[text]
    raise ConfigError(f"log level {value!r}: expected one of {', '.join(LOG_LEVELS)}")


# --------------------------------------------------------------------------- loading

SUPERVISOR_KEYS = ("name", "pidfile", "stop_timeout", "term_timeout", "max_restarts",
                   "restart_period", "log_level", "log_format", "pythonpath", "zygote",
                   "zygote_preload", "containment")
GROUP_KEYS = ("target", "count", "channels", "restart", "stop_timeout", "start_timeout", "env",
              "cwd", "pythonpath", "slow_peer",
              "after", "max_restarts", "restart_period", "on_fatal", "sockets", "max_surge")
LOG_FILE_KEYS = ("log_file", "log_max_bytes", "log_backups")  # [supervisor] and groups
RECYCLE_KEYS = ("max_memory", "max_age", "max_age_jitter")  # groups
# programs (cmd groups) and launch settings (every group): see _program_fields
PROGRAM_KEYS = ("cmd", "ready", "stop_signal", "graceful_signal")
LAUNCH_KEYS = ("user", "group", "umask", "rlimits")
SOCKET_KEYS = ("address", "backlog", "mode")


def load(path: str | os.PathLike[str]) -> FleetConfig:
    """Read and validate a fleet file; ConfigError (one line) on any problem."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    cfg = from_mapping(data, source=source, base=Path(path).resolve().parent)
    return replace(cfg, path=str(Path(path).resolve()))


def valid_module(name: str) -> bool:
    """A dotted module name (``app.jobs``)."""
    return all(part.isidentifier() for part in name.split("."))


def from_mapping(data: Mapping[str, Any], *, source: str = "<config>",
                 base: Path | None = None) -> FleetConfig:
    """Validate parsed TOML data (relative paths are relative to ``base``, default: cwd)."""
    c = _Checker(source)
    base = base or Path.cwd()
    c.keys("", data, ("supervisor", "groups", "sockets", "upstream", "downstream"))
    sup = c.table("supervisor", data.get("supervisor", {}))
    c.keys("supervisor", sup, SUPERVISOR_KEYS + LOG_FILE_KEYS)

    name = DEFAULT_NAME
    if "name" in sup:
        name = _check_name(c.string("supervisor.name", sup["name"]), f"{source}: supervisor.name")
    pidfile: str | bool | None = None
    if "pidfile" in sup:
        value = sup["pidfile"]
        if value is False:
            pidfile = False
        elif isinstance(value, str) and value:
            pidfile = str(base / value)
        else:
            raise c.fail("supervisor.pidfile", "a path string or false", value)
    default_stop = None
    if "stop_timeout" in sup:
        default_stop = c.seconds("supervisor.stop_timeout", sup["stop_timeout"])
    term_timeout = c.seconds("supervisor.term_timeout", sup.get("term_timeout", 2.0))
    intensity = Intensity(
        c.integer("supervisor.max_restarts", sup.get("max_restarts", Intensity.max_restarts)),
        c.seconds("supervisor.restart_period", sup.get("restart_period", Intensity.period)),
    )
    log_level = LOG_LEVELS[c.choice("supervisor.log_level", sup.get("log_level", "info"),
                                    LOG_LEVELS)]
    log_format = c.choice("supervisor.log_format", sup.get("log_format", "text"), LOG_FORMATS)
    common_path = [str(base / p) for p in c.strings("supervisor.pythonpath",
                                                     sup.get("pythonpath", []))]
    preload = tuple(c.strings("supervisor.zygote_preload", sup.get("zygote_preload", [])))
    for module in preload:
        if not valid_module(module):
            raise c.fail("supervisor.zygote_preload", "module names like 'app.jobs'", module)
    zygote = c.boolean("supervisor.zygote", sup.get("zygote", True))
    if preload and not zygote:
        raise ConfigError(f"{source}: supervisor.zygote_preload: needs the zygote; remove "
                          "'zygote = false' or the preload list")

    containment = c.choice("supervisor.containment", sup.get("containment", "auto"), MODES)

    hosts = {k: parse(c, c.table(k, data[k]), base) for k, parse in (
        ("upstream", parse_upstream), ("downstream", parse_downstream)) if k in data}
    parent_only = "downstream" in hosts  # a parent of hosts needs no local group
    if "groups" not in data and not parent_only:
        raise ConfigError(f"{source}: groups: missing; add at least one [groups.NAME] table "
                          "with a target")
    groups = c.table("groups", data.get("groups", {}))
    if not groups and not parent_only:
        raise ConfigError(f"{source}: groups: empty; add at least one [groups.NAME] table "
                          "with a target")
    log_default = _log_file(c, "supervisor", sup, base, LogFile(""))
    group_logs: dict[str, LogFile] = {}
    sockets = _sockets(c, data.get("sockets", {}))
    specs = []
    for gname, group in groups.items():
        key = f"groups.{gname}"
        group = c.table(key, group)
        c.keys(key, group, GROUP_KEYS + LOG_FILE_KEYS + RECYCLE_KEYS + PROGRAM_KEYS + LAUNCH_KEYS)
        fields: dict[str, Any] = {"name": gname, **_program_fields(c, key, group, base)}
        if "count" in group:
            fields["count"] = c.integer(f"{key}.count", group["count"])
        if "channels" in group:
            fields["channels"] = tuple(c.strings(f"{key}.channels", group["channels"]))
        if "restart" in group:
            fields["restart"] = c.choice(f"{key}.restart", group["restart"],
                                         ("permanent", "transient", "temporary"))
        if "slow_peer" in group:
            fields["slow_peer"] = c.choice(f"{key}.slow_peer", group["slow_peer"],
                                           SLOW_PEER_POLICIES)
        for k in ("stop_timeout", "start_timeout"):
            if k in group:
                fields[k] = c.seconds(f"{key}.{k}", group[k])
        if "stop_timeout" not in fields and default_stop is not None:
            fields["stop_timeout"] = default_stop
        env: dict[str, str] = {}
        if "env" in group:
            table = c.table(f"{key}.env", group["env"])
            for k, v in table.items():
                if not isinstance(v, str):
                    raise c.fail(f"{key}.env.{k}", "a string (quote numbers)", v)
                env[k] = v
        fields.update(_group_socket_keys(c, key, group, sockets))
        if "cwd" in group:
            fields["cwd"] = str(base / c.string(f"{key}.cwd", group["cwd"]))
        paths = common_path + [str(base / p) for p in c.strings(f"{key}.pythonpath",
                                                                 group.get("pythonpath", []))]
        if paths:
            extra = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
            env["PYTHONPATH"] = os.pathsep.join(paths + extra)
        fields["env"] = env
        fields.update(_recycling(c, key, group))
        group_log = _log_file(c, key, group, base, log_default)
        if group_log.path:
            group_logs[gname] = group_log
        fields.update(_group_keys(c, key, group, intensity))
        try:
            specs.append(WorkerSpec.from_dict(fields))
        except SpecError as e:
            raise ConfigError(f"{source}: {key}: {e}") from None
    try:
        order.check({s.name: s.after for s in specs})
    except order.OrderError as e:
        raise ConfigError(f"{source}: {e}") from None
    zygote = zygote and bool(specs)  # a parent of hosts only has nothing to fork
    return FleetConfig(specs, name, pidfile, term_timeout, intensity, log_level, log_format,
                       source, zygote, preload,
                       log_file=log_default if log_default.path else None,
                       group_log_files=group_logs, containment=containment,
                       sockets=tuple(sockets.values()), **hosts)


def _size(c: _Checker, key: str, value: Any) -> int:
    """A size in bytes (an integer, or a string like '512MB'), > 0."""
    try:
        return parse_size(value)
    except ValueError:
        raise c.fail(key, "a size in bytes or a string like '512MB' (KB, MB, GB, KiB, MiB, "
                     "GiB)", value) from None


def _log_file(c: _Checker, key: str, table: Mapping[str, Any], base: Path,
              default: LogFile) -> LogFile:
    """The log_file, log_max_bytes and log_backups of ``table`` (``key``: where it is),
    each defaulting to ``default``'s (the supervisor's); path '' when it has no log_file."""
    path = ""
    if "log_file" in table:
        path = str(base / c.string(f"{key}.log_file", table["log_file"]))
    max_bytes = default.max_bytes
    if "log_max_bytes" in table:
        value = table["log_max_bytes"]
        never = value == 0 and value is not False
        max_bytes = 0 if never else _size(c, f"{key}.log_max_bytes", value)
    backups = default.backups
    if "log_backups" in table:
        backups = c.integer(f"{key}.log_backups", table["log_backups"])
    if key != "supervisor" and not path and any(k in table for k in LOG_FILE_KEYS):
        raise ConfigError(f"{c.source}: {key}.log_max_bytes/log_backups: no effect without "
                          f"{key}.log_file; set log_file too")
    if max_bytes and not backups:
        raise ConfigError(f"{c.source}: {key}.log_backups: expected an integer >= 1 when "
                          "log_max_bytes is set (with 0 backups a file would never rotate)")
    return LogFile(path, max_bytes, backups, f"{key}.log_file")


def _recycling(c: _Checker, key: str, group: Mapping[str, Any]) -> dict[str, Any]:
    """max_memory, max_age and max_age_jitter of a group, checked (for WorkerSpec)."""
    fields: dict[str, Any] = {}
    if "max_memory" in group:
        fields["max_memory"] = _size(c, f"{key}.max_memory", group["max_memory"])
    if "max_age" in group:
        fields["max_age"] = c.seconds(f"{key}.max_age", group["max_age"])
    if "max_age_jitter" in group:
        jitter = group["max_age_jitter"]
        if jitter != 0 or jitter is False:
            jitter = c.seconds(f"{key}.max_age_jitter", jitter)
        if "max_age" not in group:
            raise ConfigError(f"{c.source}: {key}.max_age_jitter: needs max_age; set max_age "
                              "too")
        fields["max_age_jitter"] = float(jitter)
    return fields


def _program_fields(c: _Checker, key: str, group: Mapping[str, Any],
                    base: Path) -> dict[str, Any]:
    """``target``, or ``cmd`` and the keys of a program; the launch settings of any group."""
    if ("target" in group) == ("cmd" in group):
        what = "missing" if "target" not in group else "and cmd both given"
        raise ConfigError(f"{c.source}: {key}.target: {what}; expected "
                          "'package.module:callable', or cmd = [\"program\", \"arg\", ...] "
                          "instead")
    fields: dict[str, Any] = {}
    if "target" in group:
        fields["target"] = c.string(f"{key}.target", group["target"])
        for k in PROGRAM_KEYS:
            if k in group:
                raise ConfigError(f"{c.source}: {key}.{k}: applies to cmd programs only; "
                                  "remove it (a bus worker's bus drives its lifecycle)")
    else:
        cmd = group["cmd"]
        if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd) \
                or not cmd[0]:
            raise c.fail(f"{key}.cmd", "an array of strings: the program, then its arguments",
                         cmd)
        fields["cmd"] = tuple(cmd)
        if "ready" in group:
            ready = c.string(f"{key}.ready", group["ready"])
            kind, _, path = ready.partition(":")
            if kind == "file" and path and not os.path.isabs(path):
                ready = f"file:{base / path}"  # relative to the file, as every path here
            fields["ready"] = ready
        for k in ("stop_signal", "graceful_signal"):
            if k in group:
                value = group[k]
                if not isinstance(value, str | int) or isinstance(value, bool):
                    raise c.fail(f"{key}.{k}", "a signal name like 'SIGTERM', or a number",
                                 value)
                fields[k] = value
    for k in ("user", "group"):
        if k in group:
            fields[k] = c.string(f"{key}.{k}", group[k])
    if "umask" in group:
        value = group["umask"]
        if isinstance(value, str):
            try:
                value = int(value.removeprefix("0o"), 8)
            except ValueError:
                raise c.fail(f"{key}.umask", "an octal umask like 0o022 or '022'",
                             group["umask"]) from None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o777:
            raise c.fail(f"{key}.umask", "an octal umask like 0o022 or '022'", group["umask"])
        fields["umask"] = value
    if "rlimits" in group:
        fields["rlimits"] = c.table(f"{key}.rlimits", group["rlimits"])
    return fields


def _group_keys(c: _Checker, key: str, group: Mapping[str, Any],
                intensity: Intensity) -> dict[str, Any]:
    """A group's after, max_restarts, restart_period (default: [supervisor]'s) and on_fatal."""
    return {
        "after": tuple(c.strings(f"{key}.after", group.get("after", []))),
        "max_restarts": c.integer(f"{key}.max_restarts",
                                  group.get("max_restarts", intensity.max_restarts)),
        "restart_period": c.seconds(f"{key}.restart_period",
                                    group.get("restart_period", intensity.period)),
        "on_fatal": c.choice(f"{key}.on_fatal", group.get("on_fatal", "stop-group"), ON_FATAL),
    }


def _sockets(c: _Checker, table: Any) -> dict[str, SocketSpec]:
    """``[sockets.NAME]`` tables: address (required), backlog, mode (unix sockets)."""
    out: dict[str, SocketSpec] = {}
    for sname, sock in c.table("sockets", table).items():
        key = f"sockets.{sname}"
        sock = c.table(key, sock)
        c.keys(key, sock, SOCKET_KEYS)
        if "address" not in sock:
            raise ConfigError(f"{c.source}: {key}.address: missing; expected "
                              "'127.0.0.1:8080', '[::1]:8080' or 'unix:/path'")
        address = c.string(f"{key}.address", sock["address"])
        mode = None
        if "mode" in sock:
            raw = sock["mode"]
            if not (isinstance(raw, str) and len(raw) in (3, 4)
                    and all(ch in "01234567" for ch in raw)):
                raise c.fail(f"{key}.mode", "an octal mode string like \"0660\"", raw)
            if not address.startswith("unix:"):
                raise ConfigError(f"{c.source}: {key}.mode: only for unix sockets "
                                  "(address = \"unix:/path\")")
            mode = int(raw, 8)
        try:
            out[sname] = SocketSpec(sname, address,
                                    c.integer(f"{key}.backlog", sock.get("backlog", 1024), 1),
                                    mode)
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{c.source}: {key}.address: {e}") from None
    return out


def _group_socket_keys(c: _Checker, key: str, group: Mapping[str, Any],
                       sockets: Mapping[str, SocketSpec]) -> dict[str, Any]:
    """A group's ``sockets`` (each a declared ``[sockets.NAME]``) and ``max_surge``."""
    fields: dict[str, Any] = {}
    if "sockets" in group:
        names = c.strings(f"{key}.sockets", group["sockets"])
        for n in names:
            if n not in sockets:
                raise ConfigError(f"{c.source}: {key}.sockets: no socket {n!r}; declare it "
                                  f"as [sockets.{n}] with an address"
                                  + (f" (declared: {', '.join(sockets)})" if sockets else ""))
        fields["sockets"] = tuple(names)
    if "max_surge" in group:
        fields["max_surge"] = c.integer(f"{key}.max_surge", group["max_surge"], 1)
    return fields


def from_target(target: str, count: int = 1, channels: Iterable[str] = (), *,
                name: str | None = None) -> FleetConfig:
    """The fleet of ``multibus run TARGET -n N``: one group, named after the target's module
    (``app.web:serve`` -> ``web``)."""
    group = target.partition(":")[0].rpartition(".")[2] or "worker"
    group = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in group)[:64]
    try:
        spec = WorkerSpec(name=group, target=target, count=count, channels=tuple(channels))
    except SpecError as e:
        raise ConfigError(str(e)) from None
    return FleetConfig([spec], name=_check_name(name, "--name") if name else DEFAULT_NAME,
                       source=target)


def from_command(cmd: list[str], count: int = 1, *, group: str | None = None,
                 name: str | None = None) -> FleetConfig:
    """The fleet of ``multibus run -- CMD ARGS...``: one ``cmd`` group, named ``group`` or
    after the program (``/usr/bin/redis-server`` -> ``redis-server``)."""
    if not cmd or not cmd[0]:
        raise ConfigError("run --: expected a program after '--', e.g. multibus run -- "
                          "redis-server --port 0")
    if group is None:
        group = os.path.basename(cmd[0])
        group = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in group)[:64]
    try:
        spec = WorkerSpec(name=group or "program", cmd=tuple(cmd), count=count)
    except SpecError as e:
        raise ConfigError(str(e)) from None
    return FleetConfig([spec], name=_check_name(name, "--name") if name else DEFAULT_NAME,
                       source=" ".join(cmd))
