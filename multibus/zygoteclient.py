"""The supervisor's end of the zygote (:mod:`multibus.zygote`): start it, ask it for workers.

:class:`ZygoteClient` execs ``python -m multibus.zygote`` through the ProcessManager and sends
it fork requests (JSON plus the worker's pipe ends and sockets as SCM_RIGHTS fds, pipelined
up to :data:`WINDOW` in flight); it is used from the ProcessManager thread
only. Whatever the zygote cannot serve comes back as "exec it", with the reason.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from multibus.worker import worker_env
from multibus.zygote import MAX_MESSAGE, exec_reason, launch_state, state_reason

if TYPE_CHECKING:
    from multibus.specs import WorkerSpec

__all__ = ["ZygoteClient", "ForkedProcess"]

WINDOW = 16  # fork requests in flight (each holds 2 pipe fds until answered)
READY_TIMEOUT = 5.0  # seconds the zygote gets to preload before workers are exec'd instead
REPLY_TIMEOUT = 10.0

class ForkedProcess:
    """What :class:`~multibus.child.Child` needs of a Popen, for a worker the zygote forked."""

    def __init__(self, pid: int, stdout: Any, stderr: Any, args: list[str]) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode  # the ProcessManager owns the wait and writes it here


class ZygoteClient:
    """Start a zygote through a ProcessManager and ask it for workers (manager thread only).

    :meth:`spawn` returns ``None`` whenever the zygote cannot serve (not started, died,
    refused), and :attr:`failure` says why: the caller then execs the worker as usual.
    """

    def __init__(self, procs: Any, python: str, env: dict[str, str],
                 preload: tuple[str, ...] = (), log: Any = None,
                 paths: tuple[str, ...] = ()) -> None:
        self.procs = procs
        self.python = python
        self.env = env
        self.preload = preload
        self.paths = paths  # where the preloads may be found (the workers' cwd and PYTHONPATH)
        self._log = log
        self.sock: socket.socket | None = None
        self.child: Any = None
        self.ready = False
        self.dead = False
        self.failure = ""  # why the last spawn() returned None
        self.state0: dict[str, Any] = {}  # launch_state() when the zygote was started

    @classmethod
    def launch(cls, procs: Any, python: str, specs: Iterable[WorkerSpec],
               preload: Iterable[str] = (),
               log: Callable[[str, int], None] | None = None) -> ZygoteClient | None:
        """Exec a zygote for workers of ``specs`` (manager thread): it preloads while the
        caller goes on. None (logged) if it cannot be started: workers are exec'd."""
        preload = tuple(preload)
        paths: list[str] = []  # where preloads are found: the workers' cwd, then PYTHONPATH
        for spec in specs if preload else ():
            env = worker_env(spec)
            for p in [spec.cwd or os.getcwd(), *env["PYTHONPATH"].split(os.pathsep)]:
                if p and p not in paths:
                    paths.append(p)
        z = cls(procs, python, worker_env(None), preload, log=log, paths=tuple(paths))
        try:
            z.start()
        except OSError as e:
            z.log(f"cannot start the zygote ({e}); exec'ing workers instead", 30)
            return None
        return z

    def log(self, msg: str, level: int = 30) -> None:
        if self._log is not None:
            self._log(msg, level)

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [self.python, "-m", "multibus.zygote", "--parent-pid", str(os.getpid()),
                    "--fd", str(theirs.fileno())]
            for name in self.preload:
                argv += ["--preload", name]
            for path in self.paths:
                argv += ["--path", path]
            self.state0 = launch_state()
            self.child = self.procs.spawn("zygote", argv, self.env,
                                          pass_fds=(theirs.fileno(),))
            self.child.data["term_group_on_exit"] = False
        except BaseException:
            ours.close()
            self.dead = True
            raise
        finally:
            theirs.close()
        self.sock = ours

    def _fail(self, why: str) -> None:
        if not self.dead:
            self.log(f"zygote unavailable ({why}); exec'ing workers instead", 30)
        self.dead = True
        self.close(wait=0)

    def _recv(self, timeout: float) -> dict[str, Any] | None:
        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            msg = self.sock.recv(MAX_MESSAGE)
        except OSError as e:
            self._fail(f"no answer: {e or type(e).__name__}")
            return None
        if not msg:
            tail = " / ".join(self.child.last_lines[-2:]) if self.child else ""
            self._fail("it exited" + (f": {tail}" if tail else ""))
            return None
        return json.loads(msg)

    def spawn(self, name: str, args: list[str], env: dict[str, str],
              cwd: str | None, umask: int | None = None, fds: tuple[int, ...] = ()) -> Any:
        """Fork worker ``name`` running ``multibus.worker`` with ``args``; None: exec it
        (:attr:`failure` says why). ``umask``: its group's (None: the supervisor's); ``fds``:
        its listening sockets."""
        child, self.failure = self.spawn_many([(name, args, env, cwd, umask, fds)])[0]
        return child

    def spawn_many(self, requests: list[tuple[Any, ...]],
                   window: int = WINDOW) -> list[tuple[Any, str]]:
        """Fork a worker for each ``(name, args, env, cwd, umask, socket fds)``, pipelined: up
        to ``window`` requests are in flight, so the zygote forks the next while we register
        the last.
        One ``(child, failure)`` per request, in order; child None: exec it, failure why."""
        out: list[tuple[Any, str]] = []
        sent: list[tuple[str, Any]] = []  # (name, what _collect needs), oldest first
        state = launch_state()  # once for the requests made together (it reads /proc)
        for req in requests:
            while len(sent) >= window:
                out.append(self._collect(*sent.pop(0)))
            pending = self._request(*req, state=state)
            if pending is None:
                while sent:  # replies come in order: drain before answering this one
                    out.append(self._collect(*sent.pop(0)))
                out.append((None, self.failure))
            else:
                sent.append((req[0], pending))
        while sent:
            out.append(self._collect(*sent.pop(0)))
        return out

    def _request(self, name: str, args: list[str], env: dict[str, str],
                 cwd: str | None, umask: int | None = None, fds: tuple[int, ...] = (),
                 state: dict[str, Any] | None = None) -> tuple[int, int, list[str]] | None:
        """Send one fork request: (stdout fd, stderr fd, argv) to collect, or None (exec:
        :attr:`failure` says why). ``state``: :func:`launch_state` (default: now)."""
        if self.dead or self.sock is None:
            self.failure = "zygote unavailable"
            return None
        state = launch_state() if state is None else state
        why = exec_reason(env, self.env) or state_reason(state, self.state0)
        if why:
            self.failure = why
            return None
        self.failure = "zygote unavailable"
        if not self.ready:
            hello = self._recv(READY_TIMEOUT)
            if hello is None:
                return None
            if "ready" not in hello:
                self._fail(str(hello.get("error")))
                return None
            self.ready = True
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        argv = [self.python, "-m", "multibus.worker", *args]
        req = {"args": args, "env": env, "cwd": cwd,
               "umask": state["umask"] if umask is None else umask,
               "rlimits": state["rlimits"], "orig_argv": argv, "fds": len(fds)}
        try:
            self.sock.settimeout(REPLY_TIMEOUT)
            socket.send_fds(self.sock, [json.dumps(req).encode()], [out_w, err_w, *fds])
        except OSError as e:
            os.close(out_r)
            os.close(err_r)
            self._fail(f"cannot send a request: {e}")
            return None
        finally:
            os.close(out_w)
            os.close(err_w)
        return out_r, err_r, argv

    def _collect(self, name: str, pending: tuple[int, int, list[str]]) -> tuple[Any, str]:
        """The zygote's answer to a request :meth:`_request` sent: (child, '') or (None,
        why it must be exec'd)."""
        out_r, err_r, argv = pending
        try:
            reply = None if self.sock is None else self._recv(REPLY_TIMEOUT)
            if reply is None:
                return None, "zygote unavailable"
            if "pid" not in reply:
                self.log(f"zygote could not fork {name}: {reply.get('error')}; exec'ing it", 30)
                return None, "the zygote could not fork it"
            proc = ForkedProcess(int(reply["pid"]), os.fdopen(out_r, "rb"),
                                 os.fdopen(err_r, "rb"), argv)
            out_r = err_r = -1
            return self.procs.register(name, proc), ""
        finally:
            for fd in (out_r, err_r):
                if fd >= 0:
                    os.close(fd)

    def shutdown(self) -> None:
        """Close our end (manager thread): the zygote sees EOF and exits."""
        self.dead = True
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def stop(self, timeout: float = 5.0) -> None:
        """:meth:`shutdown` in the manager thread, then :meth:`close` (any other thread)."""
        import threading

        if not self.procs.thread.is_alive():
            return
        done = threading.Event()

        def shut() -> None:
            self.shutdown()
            done.set()

        self.procs.call_soon(shut)
        done.wait(timeout)
        self.close(wait=1.0)

    def close(self, wait: float = 1.0) -> None:
        """:meth:`shutdown`, give the zygote ``wait`` s to exit, then SIGKILL it.

        Waiting needs the manager thread to reap it: call with ``wait=0`` from that thread.
        """
        self.shutdown()
        child = self.child
        if child is not None and child.returncode is None:
            if wait <= 0 or not child.exited.wait(wait):
                try:
                    os.kill(child.pid, 9)
                except ProcessLookupError:
                    pass
