"""Launcher: what a child is set up with before its own code runs: rlimits, user, parent death.

Two uses, one definition:

- as a script, ``python -I -S .../multibus/launcher.py [options] -- PROGRAM ARGS...``, it is
  how a ``cmd`` group's program is started (:mod:`multibus.spawner`): it applies the group's
  rlimits, switches to its user and groups, sets ``PR_SET_PDEATHSIG`` and checks that its
  parent is still the supervisor, then execs the program (which keeps its pid, its process
  group and the pipes). A launcher rather than ``Popen(user=...)`` plus ``preexec_fn``
  (forbidden: not fork-safe in a threaded supervisor), because:
  the order matters — rlimits first (raising a hard limit needs the privilege a user switch
  drops), then the ids, then PDEATHSIG (the kernel clears it when the ids change); and the
  interpreter that runs it must be the supervisor's, which the target user may not be allowed
  to execute (a pyenv under a 0700 ``/root``). It runs isolated (``-I -S``: no site, no
  PYTHON* variables, no cwd on sys.path) and imports nothing of multibus, so the program's
  environment cannot change it, and it starts in ~10 ms. ``umask`` and the process group are
  given by Popen itself (``umask=``, ``process_group=0``).
- as a module, :func:`apply_rlimits` is what a bus worker applies in its bootstrap
  (:mod:`multibus.worker`, exec'd) or the zygote in the forked child (:mod:`multibus.zygote`),
  before the target is imported.

Stdlib only, by design.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["EXIT_LAUNCH", "apply_rlimits", "format_rlimits", "main", "parse_rlimit_arg"]

EXIT_LAUNCH = 127  # the program could not be started (as a shell says for "not found")
EXIT_PARENT_GONE = 3  # as multibus.worker
PR_SET_PDEATHSIG = 1


def _value(text: str) -> int:
    import resource

    return resource.RLIM_INFINITY if text in ("unlimited", "-1") else int(text)


def parse_rlimit_arg(arg: str) -> tuple[str, int, int]:
    """``'nofile=4096:4096'`` -> ('nofile', 4096, 4096); 'unlimited' is RLIM_INFINITY."""
    name, _, values = arg.partition("=")
    soft, _, hard = values.partition(":")
    return name, _value(soft), _value(hard or soft)


def format_rlimits(limits: dict[str, tuple[int, int]]) -> list[str]:
    """The ``--rlimit`` arguments for ``limits`` (name -> (soft, hard)), as parsed above."""
    import resource

    def text(v: int) -> str:
        return "unlimited" if v == resource.RLIM_INFINITY else str(v)

    return [f"{name}={text(soft)}:{text(hard)}" for name, (soft, hard) in limits.items()]


def apply_rlimits(limits: dict[str, tuple[int, int]]) -> None:
    """Set each ``name -> (soft, hard)`` (``nofile``, ``core``... as ``resource.RLIMIT_*``
    lower-case) on this process; OSError/ValueError name the limit."""
    import resource

    for name, (soft, hard) in limits.items():
        try:
            resource.setrlimit(getattr(resource, "RLIMIT_" + name.upper()), (soft, hard))
        except (OSError, ValueError) as e:
            raise type(e)(f"cannot set rlimit {name} to {soft}:{hard}: {e}") from None


def _die_with_parent(libc: Any, parent_pid: int, sig: int) -> None:
    import ctypes

    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        sys.stderr.write(f"multibus.launcher: prctl(PR_SET_PDEATHSIG): "
                         f"{os.strerror(ctypes.get_errno())}\n")
    if parent_pid and os.getppid() != parent_pid:
        sys.stderr.write(f"multibus.launcher: parent {parent_pid} is gone; not starting\n")
        sys.stderr.flush()
        os._exit(EXIT_PARENT_GONE)


def switch_user(uid: int | None, gid: int | None, groups: list[int] | None) -> None:
    """Supplementary groups first, then the gid, then the uid (after which none can change)."""
    if groups is not None:
        os.setgroups(groups)
    if gid is not None:
        os.setresgid(gid, gid, gid)
    if uid is not None:
        os.setresuid(uid, uid, uid)


USAGE = ("usage: launcher.py [--parent-pid PID] [--pdeathsig SIG] [--rlimit NAME=SOFT:HARD]... "
         "[--uid UID] [--gid GID] [--groups G,G...] -- PROGRAM [ARGS...]")


def main(argv: list[str]) -> int:
    """Set up, then exec the program after ``--``; returns only on failure."""
    try:
        cut = argv.index("--")
    except ValueError:
        sys.stderr.write(USAGE + "\n")
        return 64
    opts, program = argv[:cut], argv[cut + 1:]
    parent_pid, sig = 0, 15
    uid = gid = None
    groups: list[int] | None = None
    limits: dict[str, tuple[int, int]] = {}
    try:
        for key, value in zip(opts[::2], opts[1::2], strict=True):
            if key == "--parent-pid":
                parent_pid = int(value)
            elif key == "--pdeathsig":
                sig = int(value)
            elif key == "--rlimit":
                name, soft, hard = parse_rlimit_arg(value)
                limits[name] = (soft, hard)
            elif key == "--uid":
                uid = int(value)
            elif key == "--gid":
                gid = int(value)
            elif key == "--groups":
                groups = [int(g) for g in value.split(",") if g]
            else:
                raise ValueError(f"unknown option {key}")
        if not program:
            raise ValueError("no program after --")
    except ValueError as e:
        sys.stderr.write(f"multibus.launcher: {e}\n{USAGE}\n")
        return 64
    import ctypes  # before the switch: the new user may not be able to read the stdlib

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        apply_rlimits(limits)
        switch_user(uid, gid, groups)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"multibus.launcher: {e}\n")
        return EXIT_LAUNCH
    _die_with_parent(libc, parent_pid, sig)  # after the switch: a change of ids clears it
    try:
        os.execvp(program[0], program)
    except OSError as e:
        sys.stderr.write(f"multibus.launcher: cannot run {program[0]!r}: {e.strerror or e}\n")
    return EXIT_LAUNCH


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stderr.flush()
    os._exit(code)
