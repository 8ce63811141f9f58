"""Zygote: a preloaded process that forks workers on request (like multiprocessing's forkserver).

A fresh worker interpreter costs ~250 ms of CPU (startup, multibus, zmq, the bridge); a fleet
of 50 on two cores waits seconds for that. The supervisor instead execs
``python -m multibus.zygote`` once (from its ProcessManager thread); the zygote imports the
worker's code once and forks each worker from that warm state.

The rules that make forking safe, and keep the process rules of ``docs/design.md`` intact:

- the zygote never creates a zmq Context and stays single-threaded (it refuses to serve if a
  preloaded module started a thread); it has ``PDEATHSIG=SIGKILL`` towards the supervisor;
- requests come over a SOCK_SEQPACKET socket pair: JSON (never pickle) plus the worker's
  stdout/stderr pipe ends as SCM_RIGHTS fds, then its group's listening sockets (placed at
  fd 3... in the worker, :mod:`multibus.sockets`); the reply is the worker's pid;
- the zygote forks an intermediate that forks the worker and exits at once, so the worker is
  re-parented to the supervisor (a child subreaper), which then owns its wait (pidfd) as for
  an exec'd worker; the zygote reaps only the intermediate;
- the worker leads its own process group, gets default signal handling, /dev/null stdin and
  the given pipes, and only *after* re-parenting runs ``multibus.worker``'s main, which sets
  ``PDEATHSIG`` (the kernel would send it on the re-parenting itself) and checks that its
  parent is the supervisor.

A forked worker has what an exec'd one of the same spec would have (``tests/test_zygote.py``
compares them): its environment (``os.environ``, and ``sys.path`` rebuilt as ``python -m`` with
its PYTHONPATH builds it), cwd, the supervisor's current umask and rlimits (sent with each
request), the signal dispositions and mask a fresh exec gets (recorded when the zygote
started), its own title (``multibus.worker`` sets it, as for an exec'd worker), ``sys.argv``,
and what is on disk for its imports (the zygote drops its import caches before each fork).
What a fork cannot give is decided by the supervisor before asking (:func:`exec_reason`):

- environment variables that act while an interpreter or libc starts (:data:`STARTUP_VARS`,
  :data:`STARTUP_PREFIXES`) differing from the zygote's: the worker is exec'd, and
  ``multibus status`` says why (``launch: "exec (PYTHONHASHSEED set)"``);
- the supervisor's user/groups changed, or a hard rlimit was raised, since the zygote started.

A group's ``umask`` replaces the supervisor's in its request; its ``rlimits`` come as the
worker's ``--rlimit`` arguments, which ``multibus.worker`` applies first thing, forked or
exec'd. A group's user and group come the same way (``--uid/--gid/--groups``), switched to
before the target is imported; otherwise a forked worker has the supervisor's ids as an
exec'd one would (checked per request, see above). Forked workers share the zygote's
``__main__`` module (``multibus.zygote``), not ``multibus.worker``'s.
The supervisor's end is :class:`multibus.zygoteclient.ZygoteClient`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from multibus.sockets import FDS_ENV, MAX_SOCKETS, place_fds

if TYPE_CHECKING:
    pass

__all__ = ["can_fork", "exec_reason", "launch_state", "serve", "main"]

# (resource: _apply_limits in every worker; imported there, it cost each one ~140 page faults)
PRELOAD = ("multibus.worker", "multibus.fastexit", "multibus.bus", "multibus.transport.bridge",
           "resource")
MAX_MESSAGE = 1 << 20
EXIT_UNSAFE = 4
EXIT_WORKER_SETUP = 70
BATCH = 16  # fork requests one intermediate process serves


# -- what a fork cannot give (decided by the supervisor) ----------------------------------------

# Variables read while an interpreter or libc starts: a forked worker inherits the zygote's
# start-up, so a group whose value differs from the zygote's is exec'd. Every PYTHON* counts
# (``python --help-env``: PYTHONHASHSEED, PYTHONOPTIMIZE, PYTHONDONTWRITEBYTECODE,
# PYTHONMALLOC, PYTHONWARNINGS, PYTHONUNBUFFERED, PYTHONIOENCODING, PYTHONUTF8, PYTHONHOME,
# PYTHONSAFEPATH, PYTHONNOUSERSITE, PYTHONDEVMODE, ... and any later one) except those in
# RUNTIME_PYTHON_VARS; LD_* (the dynamic loader: LD_PRELOAD, LD_LIBRARY_PATH...), MALLOC_* and
# GLIBC_TUNABLES (glibc), LANG and LC_* (the locale, hence stdio and file name encodings).
# TZ is honoured in the worker (time.tzset()); HOME only matters for the user site-packages
# (when either HOME has them).
STARTUP_PREFIXES = ("PYTHON", "LD_", "MALLOC_", "LC_")
STARTUP_VARS = frozenset({"LANG", "GLIBC_TUNABLES"})
RUNTIME_PYTHON_VARS = frozenset({
    "PYTHONPATH",  # the worker rebuilds sys.path from it, as python -m does
    "PYTHONBREAKPOINT",  # read by each breakpoint() call
    "PYTHONASYNCIODEBUG",  # read when an event loop is made
    "PYTHONSTARTUP",  # interactive sessions only
})


def _acts_at_startup(key: str, *homes: str | None) -> bool:
    if key in RUNTIME_PYTHON_VARS:
        return False
    if key == "HOME":  # only where the user site-packages are, if used and either one exists
        import site

        tail = os.path.join(".local", "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                            "site-packages")
        return bool(site.ENABLE_USER_SITE) and any(
            h and os.path.isdir(os.path.join(h, tail)) for h in homes)
    return key in STARTUP_VARS or key.startswith(STARTUP_PREFIXES)


def exec_reason(env: dict[str, str], base_env: dict[str, str]) -> str | None:
    """Why a worker with environment ``env`` must be exec'd rather than forked from a zygote
    started with ``base_env`` (e.g. 'PYTHONHASHSEED set'); None: it can be forked."""
    keys = sorted(k for k in set(env) | set(base_env) if env.get(k) != base_env.get(k)
                  and _acts_at_startup(k, env.get(k), base_env.get(k)))
    if not keys:
        return None
    said = [f"{k} {'set' if k not in base_env else 'unset' if k not in env else 'changed'}"
            for k in keys[:3]]
    return ", ".join(said) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def can_fork(env: dict[str, str], base_env: dict[str, str]) -> bool:
    """A worker with environment ``env`` can be forked (see :func:`exec_reason`)."""
    return exec_reason(env, base_env) is None


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o22)  # not atomic, hence only without /proc
    os.umask(mask)
    return mask


def launch_state() -> dict[str, Any]:
    """What a process spawned now inherits besides its environment: umask, rlimits, ids."""
    import resource

    limits = {}
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            try:
                limits[name] = list(resource.getrlimit(getattr(resource, name)))
            except (OSError, ValueError):
                pass
    return {"umask": _umask(), "rlimits": limits,
            "ids": [list(os.getresuid()), list(os.getresgid()), sorted(os.getgroups())]}


def state_reason(now: dict[str, Any], then: dict[str, Any]) -> str | None:
    """Why a zygote started in launch state ``then`` cannot give a worker the state ``now``:
    other ids, or a hard rlimit raised (a worker can only lower them); None if it can."""
    import resource

    if now["ids"] != then["ids"]:
        return "the supervisor's user or groups changed since the zygote started"

    def num(v: int) -> float:
        return float("inf") if v == resource.RLIM_INFINITY else v

    raised = [n for n, (_soft, hard) in now["rlimits"].items()
              if n in then["rlimits"] and num(hard) > num(then["rlimits"][n][1])]
    if raised:
        return f"{raised[0]} hard limit raised since the zygote started"
    return None


# -- the zygote process -----------------------------------------------------------------------

# What this process got from its exec, recorded before anything runs (see _record_inherited):
# a forked worker is given the same, as an exec'd worker would get it.
INHERITED: dict[str, Any] = {}


def _record_inherited() -> None:
    """Signal dispositions and mask, the environment as exec'd and what Python's start-up
    added to it (locale coercion sets LC_CTYPE), and sys.path after PYTHONPATH."""
    import signal

    INHERITED["signals"] = {
        sig: signal.getsignal(sig) for sig in signal.valid_signals()
        if sig not in (signal.SIGKILL, signal.SIGSTOP)}
    INHERITED["mask"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
        initial = dict(item.decode("utf-8", "surrogateescape").partition("=")[::2]
                       for item in raw.split(b"\0") if b"=" in item)
    except OSError:
        initial = dict(os.environ)
    INHERITED["environ"] = initial
    INHERITED["startup_env"] = {k: v for k, v in os.environ.items() if initial.get(k) != v}
    INHERITED["path_tail"] = path_tail()


def _abs_unique(paths: Iterable[str]) -> list[str]:
    """As ``site.removeduppaths`` leaves them: absolute, first occurrence only."""
    return list(dict.fromkeys(os.path.abspath(p) for p in paths if p))


def path_tail() -> list[str]:
    """This process's sys.path after its first entry and its PYTHONPATH: the rest (stdlib,
    site-packages) that a ``python -m`` of the same interpreter gets too."""
    pp = _abs_unique(os.environ.get("PYTHONPATH", "").split(os.pathsep))
    return sys.path[1 + len(pp):]


def worker_sys_path(env: dict[str, str], tail: list[str]) -> list[str]:
    """The sys.path `python -m` would give a process with ``env`` in this cwd: cwd first
    (added after site's deduplication), then PYTHONPATH and ``tail``, absolute and
    deduplicated."""
    return [os.getcwd(), *_abs_unique([*env.get("PYTHONPATH", "").split(os.pathsep), *tail])]


def _note_signal_changes() -> None:
    """After the preloads: which dispositions, and whether the mask, differ from those this
    process was exec'd with; a worker restores only those (going through all of them in
    each worker touched ~35 shared pages, copied on write)."""
    import signal

    INHERITED["restore"] = [(sig, handler) for sig, handler in INHERITED["signals"].items()
                            if handler is not None and signal.getsignal(sig) is not handler]
    INHERITED["restore_mask"] = (signal.pthread_sigmask(signal.SIG_BLOCK, [])
                                 != INHERITED["mask"])


def _restore_signals() -> None:
    """The dispositions and mask this process was exec'd with (a fresh exec gets the same):
    whatever a preloaded module changed is undone."""
    import signal

    for sig, handler in INHERITED["restore"]:
        signal.signal(sig, handler)
    if INHERITED["restore_mask"]:
        signal.pthread_sigmask(signal.SIG_SETMASK, INHERITED["mask"])


def _set_environ(env: dict[str, str]) -> None:
    """Make ``os.environ`` (and the C environment) ``env``, changing only what differs: the
    zygote's own variables are shared pages, and rewriting them all (clear, then update)
    copied ~110 of them into every worker."""
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _apply_limits(umask: int, rlimits: dict[str, list[int]]) -> None:
    """The supervisor's umask and rlimits as they are now (it may have changed them since it
    started the zygote; hard limits are only lowered: see :func:`state_reason`)."""
    import resource

    os.umask(umask)
    for name, value in rlimits.items():
        which = getattr(resource, name, None)
        if which is not None and list(resource.getrlimit(which)) != value:
            resource.setrlimit(which, tuple(value))


def _wait_reparented(intermediate: int, timeout: float = 5.0) -> None:
    """Return once ``intermediate`` (our parent) has exited and we have a new parent."""
    import select
    import time

    try:
        pidfd = os.pidfd_open(intermediate)
    except OSError:
        pidfd = -1  # already gone
    if pidfd >= 0:
        select.select([pidfd], [], [], timeout)  # readable once it has exited
        os.close(pidfd)
    deadline = time.monotonic() + timeout
    while os.getppid() == intermediate and time.monotonic() < deadline:
        time.sleep(0.0005)  # not reached in practice: the pidfd wakes after re-parenting


def _become_worker(sock: socket.socket, req: dict[str, Any], fds: list[int],
                   intermediate: int) -> None:
    """In the forked worker: set up like a fresh ``python -m multibus.worker``, run it, exit."""
    code = EXIT_WORKER_SETUP
    try:
        sock.close()
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        _restore_signals()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        socks = place_fds(fds[2:]) if len(fds) > 2 else []  # its group's sockets: fd 3...
        os.closerange(3 + len(socks), 1 << 16)  # nothing of the zygote's leaks into the worker
        _wait_reparented(intermediate)
        env = dict(req["env"])
        if socks:
            env[FDS_ENV] = ",".join(map(str, socks))  # where they are now (adopt() reads it)
        for key, value in INHERITED["startup_env"].items():
            if env.get(key) == INHERITED["environ"].get(key):
                env[key] = value  # the same start-up input: an exec would add the same
        _set_environ(env)
        import time

        time.tzset()  # TZ as the worker's environment says
        _apply_limits(req["umask"], req["rlimits"])
        if req.get("cwd"):
            os.chdir(req["cwd"])
        sys.path[:] = worker_sys_path(env, INHERITED["path_tail"])  # as `python -m` has it
        from multibus import worker

        sys.argv = [worker.__file__, *req["args"]]
        sys.orig_argv = list(req.get("orig_argv") or sys.argv)
        worker.run()  # ends with os._exit
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - report, never return into the zygote's loop
        try:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
    os._exit(code)


def _shrink() -> None:
    """Give back what the imports left free: each worker maps (and at its exit unmaps) every
    page the zygote holds, so a smaller zygote makes spawning and stopping a fleet cheaper."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass
    # What is left is the workers' shared heap: out of the collector's reach, a worker's
    # collections never write to it (each write copies a page on write: more to fault in at
    # start and to free at exit, per worker)
    gc.freeze()


def _fork_workers(sock: socket.socket, batch: list[tuple[dict[str, Any], list[int]]]
                  ) -> list[int | None]:
    """Fork an intermediate that forks a worker for each ``(request, fds)`` of ``batch``
    and exits (they are re-parented to the supervisor); return each worker's pid (None:
    that fork failed). One intermediate per batch: half the forks of one per worker."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    a = os.fork()
    if a == 0:
        code = 1
        try:
            os.close(r)
            me = os.getpid()
            for req, fds in batch:
                try:
                    b = os.fork()
                except OSError:
                    os.write(w, b"-\n")
                    continue
                if b == 0:
                    os.close(w)
                    _become_worker(sock, req, fds, me)
                    os._exit(EXIT_WORKER_SETUP)  # not reached
                try:
                    os.setpgid(b, b)  # both sides: the group exists before the pid is reported
                except OSError:
                    pass
                os.write(w, f"{b}\n".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(a, 0)
    pids: list[int | None] = [None if x == "-" else int(x) for x in data.decode().split()]
    return pids + [None] * (len(batch) - len(pids))


def _read_batch(sock: socket.socket) -> tuple[list[tuple[dict[str, Any], list[int]]], bool]:
    """The next requests: wait for one, then take what else is already there (up to
    :data:`BATCH`). Returns (batch of (request or {'error'}, fds), the supervisor is gone)."""
    import select

    batch: list[tuple[dict[str, Any], list[int]]] = []
    while len(batch) < BATCH:
        if batch and not select.select([sock], [], [], 0)[0]:
            break  # (recv_fds ignores its flags: no MSG_DONTWAIT)
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 2 + MAX_SOCKETS)
        except ConnectionResetError:  # the supervisor closed with a reply unread: it is gone
            msg, fds = b"", []
        if not msg:
            for fd in fds:
                os.close(fd)
            return batch, True
        try:
            req = json.loads(msg)
        except ValueError as e:
            batch.append(({"error": f"{type(e).__name__}: {e}"}, fds))
            continue
        want = 2 + int(req.get("fds", 0))  # stdout, stderr, then its group's sockets
        if len(fds) != want:
            for fd in fds:
                os.close(fd)
            batch.append(({"error": f"expected {want} fds, got {len(fds)}"}, []))
        else:
            batch.append((req, fds))
    return batch, False


def serve(sock: socket.socket) -> int:
    """Answer fork requests until the supervisor closes its end; requests that arrive
    together are forked by one intermediate (:func:`_fork_workers`), answered in order."""
    import importlib
    import threading

    if threading.active_count() != 1:
        names = ", ".join(t.name for t in threading.enumerate())
        sock.send(json.dumps({"error": f"zygote is not single-threaded ({names})"}).encode())
        return EXIT_UNSAFE
    sock.send(json.dumps({"ready": os.getpid()}).encode())
    while True:
        batch, gone = _read_batch(sock)
        good = [(req, fds) for req, fds in batch if "error" not in req]
        # what is on disk now, as a fresh exec sees it: done here once for the batch rather
        # than in each worker (it cost each ~75 page faults, copied on write)
        importlib.invalidate_caches()
        try:
            pids = iter(_fork_workers(sock, good) if good else [])
            failed = "the intermediate process failed to fork the worker"
        except Exception as e:  # noqa: BLE001 - one bad request must not end the zygote
            pids, failed = iter([]), f"{type(e).__name__}: {e}"
        for req, fds in batch:
            for fd in fds:
                os.close(fd)
            pid = None if "error" in req else next(pids, None)
            reply = {"error": req.get("error", failed)} if pid is None else {"pid": pid}
            try:
                sock.send(json.dumps(reply).encode())
            except OSError:
                return 0
        if gone:
            return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    opts: dict[str, list[str]] = {}
    for key, value in zip(args[::2], args[1::2], strict=False):
        opts.setdefault(key, []).append(value)
    try:
        parent_pid = int(opts["--parent-pid"][0])
        fd = int(opts["--fd"][0])
    except (KeyError, ValueError):
        sys.stderr.write("usage: python -m multibus.zygote --parent-pid PID --fd FD "
                         "[--preload MODULE]... [--path DIR]...\n")
        return 64
    import signal

    _record_inherited()  # before anything can change it
    from multibus.worker import die_with_parent, title_setter

    title_setter()  # set up once here (before a preload can change environ), used by workers

    die_with_parent(parent_pid, int(signal.SIGKILL), "multibus.zygote")
    sock = socket.socket(fileno=fd)
    import importlib

    def preload(names: list[str] | tuple[str, ...]) -> None:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 - the worker will report it properly
                sys.stderr.write(f"multibus.zygote: cannot preload {name}: {e}; workers are "
                                 "forked without it (check the zygote_preload/--preload "
                                 "name and the workers' pythonpath)\n")

    preload(PRELOAD)
    # the workers' own directories and PYTHONPATH, for their preloads only: each worker then
    # sets up its sys.path as an exec'd one would (see _become_worker)
    added = [p for p in dict.fromkeys(opts.get("--path", [])) if p not in sys.path]
    sys.path[1:1] = added
    preload(opts.get("--preload", []))
    for p in added:
        sys.path.remove(p)
    _note_signal_changes()
    _shrink()
    code = serve(sock)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # nothing to tear down: skip the interpreter's (slow with all it preloaded)


if __name__ == "__main__":
    sys.exit(main())
