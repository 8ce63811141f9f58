"""Checks before anything starts: every target imports, every program can be executed.

``multibus run`` and ``multibus apply`` call :func:`check_targets` on a loaded fleet file:
each group's target is imported in a throwaway interpreter with that group's environment and
cwd (never in the supervisor: a module's import-time code runs there, not here), in parallel,
and a ``cmd`` group's program must be found. The first failure is a one-line ConfigError
naming the group and the fix (exit 2, nothing started or changed).
"""

from __future__ import annotations

import os
import subprocess
import sys

from multibus.config import CHECK_TIMEOUT, ConfigError, FleetConfig
from multibus.specs import WorkerSpec, login_env, resolve_ids
from multibus.worker import worker_env

__all__ = ["TargetChecks", "check_program", "check_targets", "start_checks"]


def check_program(config: FleetConfig, spec: WorkerSpec) -> None:
    """A ``cmd`` group's program exists and can be executed (found on its PATH)."""
    import shutil

    program = spec.cmd[0]
    path = {**os.environ, **spec.env}.get("PATH", os.defpath)
    if os.sep in program:
        found = os.path.join(spec.cwd or os.getcwd(), program)
        ok = os.path.isfile(found) and os.access(found, os.X_OK)
    else:
        ok = shutil.which(program, path=path) is not None
    if not ok:
        where = "is not an executable file" if os.sep in program else "is not found on PATH"
        raise ConfigError(f"{config.source}: groups.{spec.name}.cmd: {program!r} {where} "
                          "(install it, or give its full path)")


_CHECK = """\
import sys
from multibus.worker import TargetError, load_target
try:
    load_target(sys.argv[1])
except TargetError as e:
    sys.stderr.write(str(e) + "\\n")
    sys.exit(2)
"""


class TargetChecks:
    """The running checks of one fleet file's targets (:func:`start_checks`); :meth:`wait`
    for their verdict. Meanwhile the caller can go on (``multibus run`` imports the rest of
    the supervisor): a check is a whole interpreter start (~60 ms of CPU, more wall)."""

    def __init__(self, config: FleetConfig, timeout: float) -> None:
        self.config = config
        self.timeout = timeout
        self.procs: list[tuple[WorkerSpec, subprocess.Popen]] = []

    def wait(self) -> None:
        """Raise ConfigError naming the first group whose target failed; the checkers are
        always reaped."""
        config = self.config
        try:
            for spec, p in self.procs:
                try:
                    _, err = p.communicate(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    raise ConfigError(f"{config.source}: groups.{spec.name}.target: importing "
                                      f"{spec.target!r} took over {self.timeout:g}s") from None
                if p.returncode != 0:
                    lines = [ln for ln in (err or "").splitlines() if ln.strip()]
                    why = lines[-1] if lines else f"exit status {p.returncode}"
                    hint = "" if ("PYTHONPATH" in why or "pip install" in why) else (
                        " (set pythonpath or cwd in the file, or PYTHONPATH)")
                    if spec.user is not None:
                        why = f"as user {spec.user!r}: {why}"
                        hint += "; that user must be able to read the code and the Python it runs"
                    raise ConfigError(f"{config.source}: groups.{spec.name}.target: {why}{hint}")
        finally:
            self.close()

    def close(self) -> None:
        """Kill and reap the checkers still running (the caller gave up)."""
        for _, p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def start_checks(config: FleetConfig, timeout: float = CHECK_TIMEOUT) -> TargetChecks:
    """Start importing every group's target in a child interpreter with that group's env and
    cwd (and check each ``cmd`` group's program now); :meth:`TargetChecks.wait` for the
    verdict. The target's module is executed in the checker, never in the supervisor.
    ConfigError at once for a missing cwd or program, or a user who cannot run Python."""
    checks = TargetChecks(config, timeout)
    try:
        for spec in config.specs:
            if spec.cwd is not None and not os.path.isdir(spec.cwd):
                raise ConfigError(f"{config.source}: groups.{spec.name}.cwd: no such directory "
                                  f"{spec.cwd}")
            if spec.cmd:
                check_program(config, spec)
                continue
            uid, gid, groups = resolve_ids(spec.user, spec.group, spec.name)
            env = worker_env(spec)
            login_env(env, uid, spec)
            try:
                p = subprocess.Popen(  # as the group's user: what its workers can import
                    [sys.executable, "-c", _CHECK, spec.target],
                    env=env, cwd=spec.cwd, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                    user=uid, group=gid, extra_groups=groups,
                )
            except PermissionError as e:
                raise ConfigError(
                    f"{config.source}: groups.{spec.name}.user: user {spec.user!r} cannot run "
                    f"{sys.executable} ({e.strerror}); install Python and multibus where "
                    "that user can read them, or remove user") from None
            checks.procs.append((spec, p))
    except BaseException:
        checks.close()
        raise
    return checks


def check_targets(config: FleetConfig, timeout: float = CHECK_TIMEOUT) -> None:
    """Import every group's target in a child interpreter with that group's env and cwd.

    Runs the checks in parallel; raises ConfigError naming the first group that fails. The
    target's module is executed in the checker, never in the supervisor.
    """
    start_checks(config, timeout).wait()
