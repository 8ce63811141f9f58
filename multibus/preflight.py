"""Checks before anything starts: every target imports, every program can be executed.

``multibus run`` and ``multibus apply`` call :func:`check_targets` on a loaded fleet file:
each group's target is imported in a throwaway interpreter with that group's environment and
cwd (never in the supervisor: a module's import-time code runs there, not here), in parallel,
and a ``cmd`` group's program must be found. The first failure is a one-line ConfigError
naming the group and the fix (exit 2, nothing started or changed).

``multibus run`` with the zygote (the default) checks by forking instead (``fork=True``):
its workers will be forked from a preloaded process too, and a fork costs ~1 ms where an
interpreter start costs ~60 ms of CPU (every supervisor of a fleet of hosts pays it at
start). The check is forked from the CLI process before it has a thread or a zmq context,
and only for groups a zygote would fork (the group's user is the supervisor's, and no
variable that acts at interpreter start differs: :func:`multibus.zygote.exec_reason`);
the child sets up the group's environment, cwd and ``sys.path`` as a forked worker does,
imports the target and exits. Any other group gets an interpreter, as before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

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


class _ForkedCheck:
    """One target's import check in a child forked from this process (see the module
    docstring), with what :class:`TargetChecks` uses of a Popen."""

    def __init__(self, target: str, env: dict[str, str], cwd: str | None,
                 tail: list[str]) -> None:
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # never returns
            _forked_check(r, w, target, env, cwd, tail)
        os.close(w)
        self.pid = pid
        self.returncode: int | None = None
        self._r = r

    def communicate(self, timeout: float) -> tuple[None, str]:
        import select

        deadline = time.monotonic() + timeout
        chunks = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise subprocess.TimeoutExpired(["(forked check)"], timeout)
            data = os.read(self._r, 65536)
            if not data:
                break
            chunks.append(data)
        self.wait()
        return None, b"".join(chunks).decode(errors="replace")

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        if self._r >= 0:
            os.close(self._r)
            self._r = -1
        return self.returncode


def _forked_check(r: int, w: int, target: str, env: dict[str, str], cwd: str | None,
                  tail: list[str]) -> None:
    """(the forked child) Import ``target`` as a worker forked with ``env`` and ``cwd``
    would; exit 0, or 2 with the reason on stderr (the pipe ``w``)."""
    code = 70
    try:
        os.close(r)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(w, 2)
        os.environ.clear()
        os.environ.update(env)
        if cwd:
            os.chdir(cwd)
        from multibus.zygote import worker_sys_path  # loaded already by start_checks

        sys.path[:] = worker_sys_path(env, tail)  # as the zygote gives a worker
        import importlib

        importlib.invalidate_caches()
        from multibus.worker import TargetError, load_target

        try:
            load_target(target)
            code = 0
        except TargetError as e:
            sys.stderr.write(f"{e}\n")
            code = 2
    except SystemExit as e:  # the module exited while imported: as the interpreter would
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - said on stderr, never back into the caller
        try:
            import traceback

            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    try:
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass
    os._exit(code)


def _can_fork_here() -> bool:
    """No thread besides this one and no global zmq context: a fork copies a consistent
    process (``multibus run`` checks before it starts either)."""
    import threading

    if threading.active_count() != 1:
        return False
    zmq = sys.modules.get("zmq")
    return zmq is None or getattr(zmq.Context, "_instance", None) is None


class TargetChecks:
    """The running checks of one fleet file's targets (:func:`start_checks`); :meth:`wait`
    for their verdict. Meanwhile the caller can go on (``multibus run`` imports the rest of
    the supervisor): a check is a whole interpreter start (~60 ms of CPU, more wall)."""

    def __init__(self, config: FleetConfig, timeout: float) -> None:
        self.config = config
        self.timeout = timeout
        self.procs: list[tuple[WorkerSpec, Any]] = []  # Popen or _ForkedCheck

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


def start_checks(config: FleetConfig, timeout: float = CHECK_TIMEOUT,
                 fork: bool = False) -> TargetChecks:
    """Start importing every group's target in a child interpreter with that group's env and
    cwd (and check each ``cmd`` group's program now); :meth:`TargetChecks.wait` for the
    verdict. The target's module is executed in the checker, never in the supervisor.
    ``fork``: the workers will be forked from a zygote, so check those a zygote would fork
    in a forked child (see the module docstring). ConfigError at once for a missing cwd or
    program, or a user who cannot run Python."""
    from multibus.zygote import can_fork, path_tail

    checks = TargetChecks(config, timeout)
    fork = fork and _can_fork_here()
    tail = path_tail() if fork else []
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
            if fork and spec.user is None and spec.group is None and can_fork(
                    env, dict(os.environ)):
                checks.procs.append((spec, _ForkedCheck(spec.target, env, spec.cwd, tail)))
                continue
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
