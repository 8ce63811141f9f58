"""Spawner: start one worker process, forked by the zygote when it can, else exec'd.

Either way the worker runs ``multibus.worker`` with the command line and environment that
module defines (:func:`~multibus.worker.worker_args`, :func:`~multibus.worker.worker_env`),
and becomes a :class:`~multibus.child.Child` of the :class:`~multibus.procs.ProcessManager`,
whose thread is the only one that spawns (PDEATHSIG follows the spawning thread).
How it was started is kept in ``child.data["launch"]``: ``"fork"``, or ``"exec (why)"``, which
``multibus status`` shows (e.g. ``exec (PYTHONHASHSEED set)``, ``exec (zygote disabled)``).

A ``cmd`` group's program is never forked: it is exec'd through :mod:`multibus.launcher`
(its rlimits, user and groups, PDEATHSIG), with the supervisor's environment plus the group's
``env`` and nothing of multibus's; its launch is ``"cmd"``. A group's ``umask`` is Popen's
(exec) or the zygote's (fork); its rlimits are set by the worker's bootstrap (exec, as
``--rlimit`` arguments), the zygote's child (fork) or the launcher (cmd).
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

from multibus import launcher
from multibus import sockets as listening
from multibus.child import Child
from multibus.procs import ProcessManager
from multibus.specs import WorkerSpec, login_env, resolve_ids
from multibus.worker import SECRET_ENV, worker_args, worker_env
from multibus.zygoteclient import ZygoteClient

__all__ = ["Spawner"]


class Spawner:
    """Spawn workers of fleet ``fleet`` through ``procs``, forked from a preloaded zygote once
    :meth:`start_zygote` was called, else exec'd (``exec_why`` says why in the status).

    :meth:`spawn` and the zygote's start run in the manager thread; :meth:`close_zygote`
    from any other thread, once nothing more will be forked (workers are exec'd after)."""

    def __init__(
        self,
        procs: ProcessManager,
        python: str,
        *,
        heartbeat: float | None,
        peer_timeout: float,
        log: Callable[[str, int], None],
        fleet: str | None = None,
    ) -> None:
        self.procs = procs
        self.python = python
        self.heartbeat = heartbeat
        self.peer_timeout = peer_timeout
        self.log = log
        self.fleet = fleet
        self.zygote: ZygoteClient | None = None
        self.exec_why = "zygote disabled"  # why workers are exec'd while there is no zygote
        # the hub's Bridge.expect: each worker gets a fresh secret to prove in its hello
        self.expect: Callable[[str, str], None] | None = None
        # the hub's Bridge.share_with: where a worker running as another user connects (it
        # cannot enter our private runtime dir)
        self.share: Callable[[int, int], Any] | None = None
        # the supervisor's listening sockets by name: a group's `sockets` are passed to
        # each of its workers (fd 3..., LISTEN_FDS; see multibus.sockets)
        self.sockets: dict[str, Any] = {}

    def start_zygote(self, specs: Iterable[WorkerSpec], preload: Iterable[str]) -> None:
        """Have the manager thread exec the zygote: it preloads while the caller goes on."""

        def started(z: ZygoteClient | None) -> None:
            self.zygote, self.exec_why = z, "zygote unavailable"

        self._launch_zygote(specs, preload, started)

    def _launch_zygote(self, specs: Iterable[WorkerSpec], preload: Iterable[str],
                       then: Callable[[ZygoteClient | None], None]) -> None:
        """Exec a zygote from the manager thread; ``then(it)`` there (None: it could not
        be started, workers are exec'd)."""
        specs, preload = list(specs), tuple(preload)

        def start() -> None:
            z = None
            try:
                z = ZygoteClient.launch(self.procs, self.python, specs, preload, log=self.log)
            finally:
                then(z)

        self.procs.call_soon(start)

    def close_zygote(self) -> None:
        z, self.zygote = self.zygote, None
        self.exec_why = "zygote closed"
        if z is not None:
            z.stop()

    def spawn(self, name: str, spec: WorkerSpec, endpoints: str) -> Child:
        """Start worker ``name`` of ``spec`` connecting to the hub at ``endpoints`` (manager
        thread); OSError if it cannot be started."""
        child = self.spawn_many([(name, spec)], endpoints)[0]
        if isinstance(child, OSError):
            raise child
        return child

    def spawn_many(self, workers: list[tuple[str, WorkerSpec]],
                   endpoints: str) -> list[Child | OSError]:
        """:meth:`spawn` each ``(name, spec)``, the zygote's forks pipelined (manager thread):
        one Child, or the OSError that kept it from starting, per worker, in order."""
        programs = {name: self._spawn_program(name, spec) for name, spec in workers
                    if spec.cmd}
        reqs = []
        done: dict[str, Child | OSError] = {}
        groups: dict[str, tuple[Any, ...] | OSError] = {}  # per group: the same for its workers
        for name, spec in workers:
            if spec.cmd:
                continue
            if spec.name not in groups:
                groups[spec.name] = self._bus_identity(spec, endpoints)
            group = groups[spec.name]
            if isinstance(group, OSError):
                done[name] = group
                continue
            ids, group_endpoints, group_env = group
            args = worker_args(name, spec.target or "", parent_pid=os.getpid(),
                               endpoints=group_endpoints,
                               stop_timeout=spec.stop_timeout, heartbeat=self.heartbeat,
                               peer_timeout=self.peer_timeout, channels=spec.channels,
                               fleet=self.fleet, rlimits=spec.rlimits, ids=ids)
            env = dict(group_env)
            if self.expect is not None:
                env[SECRET_ENV] = secret = secrets.token_hex(16)
                self.expect(name, secret)  # before the worker can say hello
            fds = self._socket_fds(spec, env)
            reqs.append((name, args, env, spec.cwd, spec.umask, fds))
        z = self.zygote
        forked = (z.spawn_many(reqs) if z is not None
                  else [(None, self.exec_why)] * len(reqs))
        for (name, args, env, cwd, umask, fds), (child, why) in zip(reqs, forked, strict=True):
            if child is not None:
                child.data["launch"] = "fork"
                done[name] = child
                continue
            try:
                child = self.procs.spawn(name, [self.python, "-m", "multibus.worker", *args],
                                         env, cwd, umask=-1 if umask is None else umask,
                                         pass_fds=fds)
            except OSError as e:
                done[name] = e
                continue
            child.data["launch"] = f"exec ({why or self.exec_why})"
            done[name] = child
        return [programs[name] if name in programs else done[name] for name, _ in workers]

    def _spawn_program(self, name: str, spec: WorkerSpec) -> Child | OSError:
        """Exec a ``cmd`` group's program through the launcher (manager thread)."""
        try:
            uid, gid, groups = resolve_ids(spec.user, spec.group, f"group {spec.name!r}")
        except ValueError as e:
            return OSError(str(e))
        env = {**os.environ, **spec.env, "MULTIBUS_WORKER": name}  # which one it is, as a worker
        login_env(env, uid, spec)
        argv = [self.python, "-I", "-S", launcher.__file__, "--parent-pid", str(os.getpid()),
                "--pdeathsig", str(int(signal.Signals[spec.stop_signal]))]
        for arg in launcher.format_rlimits(dict(spec.rlimits)):
            argv += ["--rlimit", arg]
        for opt, value in (("--uid", uid), ("--gid", gid)):
            if value is not None:
                argv += [opt, str(value)]
        if groups is not None:
            argv += ["--groups", ",".join(map(str, groups))]
        try:
            child = self.procs.spawn(name, [*argv, "--", *spec.cmd], env, spec.cwd,
                                     umask=-1 if spec.umask is None else spec.umask)
        except OSError as e:
            return e
        child.data["launch"] = "cmd"
        child.data["program"] = True
        return child

    def _bus_identity(self, spec: WorkerSpec, endpoints: str
                      ) -> tuple[tuple[Any, ...], str, dict[str, str]] | OSError:
        """A bus group's (uid, gid, groups), the hub endpoints its workers connect to, and
        their environment; the OSError that keeps them from starting instead."""
        try:
            uid, gid, groups = resolve_ids(spec.user, spec.group, f"group {spec.name!r}")
            if uid is not None:
                if self.share is None:
                    raise ValueError(f"group {spec.name!r}: user: this supervisor's hub cannot "
                                     "listen for another user's workers")
                endpoints = self.share(uid, gid).to_string()
        except Exception as e:  # noqa: BLE001 - a SpecError or BridgeError: this group fails
            return OSError(str(e))
        env = worker_env(spec)
        login_env(env, uid, spec)
        return (uid, gid, groups), endpoints, env

    def _socket_fds(self, spec: WorkerSpec, env: dict[str, str]) -> tuple[int, ...]:
        """The descriptors of ``spec``'s sockets, named in ``env`` for the worker (whose
        bootstrap moves them to 3...); no LISTEN_* of our own reaches a worker."""
        listening.clear_listen_env(env)
        fds = tuple(self.sockets[n].fileno() for n in spec.sockets)
        if fds:
            env.update(listening.listen_env(spec.sockets, fds))
        return fds

    def swap_zygote(self, zygote: ZygoteClient | None) -> ZygoteClient | None:
        """Fork from now on with ``zygote`` (a fresh generation, see :meth:`fresh_zygote`);
        return the one it replaces, for the caller to close or put back."""
        old, self.zygote = self.zygote, zygote
        return old

    def fresh_zygote(self, specs: Iterable[WorkerSpec], preload: Iterable[str]
                     ) -> ZygoteClient | None:
        """A new zygote (from the manager thread; any thread may call), which imports the
        preloads again: what a rolling reload forks its replacements from, never the old
        code. None if it cannot be started (workers are exec'd then)."""
        made: list[ZygoteClient | None] = []
        done = threading.Event()

        def started(z: ZygoteClient | None) -> None:
            made.append(z)
            done.set()

        self._launch_zygote(specs, preload, started)
        done.wait(30)
        return made[0] if made else None
