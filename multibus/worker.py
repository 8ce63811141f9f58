"""Child side of a supervised fleet: ``python -m multibus.worker --name N --parent-pid P ...``.

Order matters and is the point of this module:

1. ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, then exit if the parent pid we were given is no longer
   our parent (it died before the prctl took effect). Nothing else is imported first. Then
   the group's listening sockets go to fd 3... with ``LISTEN_PID`` = our pid
   (:func:`multibus.sockets.adopt`), before anything else opens a descriptor. Then the
   group's rlimits and user (``--uid/--gid/--groups``; the parent-death signal, which a
   change of ids clears, is set again).
2. Build a Bus, load the target (``package.module:callable`` called with the bus so it can
   subscribe its plugins, and return) — *before* connecting, so the supervisor's 'start' can
   never reach a bus whose plugins are not subscribed yet. What the target logs on the bus
   meanwhile is held and sent once connected (``Bridge.hold_logs``). A target that cannot be
   imported or called exits with status 2 and one line naming it.
3. Connect a Bridge (role='peer'); lifecycle commands arrive through it and are applied
   in the main thread (``bus.defer``), which has nothing else to do while it blocks.
4. Block until the bus exits: on an 'exit' command, on SIGTERM (also what PDEATHSIG sends),
   or when the hub is lost ('hub.lost'). After SIGTERM or a lost hub the orderly exit gets
   at most 0.8 s (``PARENT_GONE_EXIT``), without lingering on unsent messages, then the
   process exits hard (a SIGALRM timer when a signal began it: the handler takes no lock,
   as it may interrupt its own thread inside one); after an 'exit' command the supervisor
   does the timing.

Imports are lazy: a worker imports little before it reports STARTED.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from multibus.specs import WorkerSpec

PR_SET_PDEATHSIG = 1
EXIT_PARENT_GONE = 3
EXIT_BAD_TARGET = 2
EXIT_USAGE = 64
#: the environment variable a spawner passes a worker's secret in (never argv: /proc/PID/
#: cmdline is world-readable; the environment is the owner's only)
SECRET_ENV = "MULTIBUS_SECRET"
PARENT_GONE_EXIT = 0.8  # seconds an orphaned worker gets to exit in order


_PRCTL: list = []  # libc's prctl, once loaded: a zygote's workers inherit it


def die_with_parent(parent_pid: int, sig: int = 15, who: str = "multibus.worker") -> None:
    """Have the kernel send ``sig`` (SIGTERM) when the spawning thread dies; exit at once if
    the parent ``parent_pid`` is already gone. Imports nothing of note: it runs first."""
    import ctypes

    if not _PRCTL:  # (a CDLL makes a class: in a forked worker, ~25 pages copied on write)
        _PRCTL.append(ctypes.CDLL(None, use_errno=True).prctl)
    if _PRCTL[0](PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"{who}: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}\n")
    if parent_pid and os.getppid() != parent_pid:
        sys.stderr.write(f"{who}: parent {parent_pid} is gone (ppid is {os.getppid()}); exiting\n")
        sys.stderr.flush()
        os._exit(EXIT_PARENT_GONE)


_TITLE: list = []  # the setproctitle function, once loaded (None: not available)


def title_setter():
    """setproctitle's C function, set up. Its extension module is loaded on its own when it
    can be: the package's ``__init__`` imports logging, ~6 ms of every exec'd worker's start.
    Call it before the environment changes: setproctitle finds the argv area from it."""
    if not _TITLE:
        func = None
        try:
            import importlib.machinery
            import importlib.util

            spec = importlib.util.find_spec("setproctitle")
            for d in (spec.submodule_search_locations or []) if spec else []:
                for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                    path = os.path.join(d, "_setproctitle" + suffix)
                    if os.path.exists(path):
                        loader = importlib.machinery.ExtensionFileLoader(
                            "setproctitle._setproctitle", path)
                        module = importlib.util.module_from_spec(
                            importlib.util.spec_from_loader(loader.name, loader))
                        loader.exec_module(module)
                        module.getproctitle()  # finds the argv area (from environ)
                        func = module.setproctitle
                        break
                if func:
                    break
        except (ImportError, OSError, AttributeError):
            func = None
        if func is None:
            try:
                from setproctitle import getproctitle
                from setproctitle import setproctitle as func

                getproctitle()
            except ImportError:  # a dependency; without it the title stays the command line
                func = None
        _TITLE.append(func)
    return _TITLE[0]


def set_title(name: str, fleet: str | None) -> None:
    """Show as ``multibus: job.3 [fleet]`` in ps and top (forked or exec'd alike)."""
    func = title_setter()
    if func is not None:
        func(f"multibus: {name}" + (f" [{fleet}]" if fleet else ""))


def _parse(argv: list[str]) -> dict[str, object]:
    """Tiny ``--key value`` parser (argparse costs startup time). --channel repeats."""
    opts: dict[str, object] = {"channels": [], "stop_timeout": 5.0, "parent_pid": 0}
    it = iter(argv)
    for arg in it:
        if not arg.startswith("--"):
            raise SystemExit(f"multibus.worker: unexpected argument {arg!r}")
        key = arg[2:].replace("-", "_")
        try:
            value = next(it)
        except StopIteration:
            raise SystemExit(f"multibus.worker: {arg} needs a value") from None
        if key == "channel":
            opts["channels"].append(value)  # type: ignore[union-attr]
        elif key == "rlimit":
            opts.setdefault("rlimits", []).append(value)  # type: ignore[union-attr]
        elif key in ("parent_pid", "uid", "gid"):
            opts[key] = int(value)
        elif key == "groups":
            opts[key] = [int(g) for g in value.split(",") if g]
        elif key == "heartbeat" and value.lower() in ("none", "off"):
            opts[key] = None  # no heartbeats: the supervisor watches our pidfd instead
        elif key in ("stop_timeout", "heartbeat", "peer_timeout"):
            opts[key] = float(value)
        elif key in ("name", "target", "endpoints", "fleet"):
            opts[key] = value
        else:
            raise SystemExit(f"multibus.worker: unknown option {arg}")
    for key in ("name", "target"):
        if key not in opts:
            raise SystemExit(
                "usage: python -m multibus.worker --name NAME --target pkg.mod:callable "
                "[--parent-pid PID] [--endpoints E] [--channel C]... [--stop-timeout S] "
                "[--heartbeat S] [--peer-timeout S] [--fleet NAME] [--rlimit NAME=SOFT:HARD]... "
                "[--uid UID] [--gid GID] [--groups G,G...]"
            )
    return opts


def worker_args(
    name: str,
    target: str,
    *,
    parent_pid: int,
    endpoints: str,
    stop_timeout: float,
    heartbeat: float | None,
    peer_timeout: float,
    channels: Iterable[str] = (),
    fleet: str | None = None,
    rlimits: Mapping[str, tuple[int, int]] | None = None,
    ids: tuple[int | None, int | None, list[int] | None] = (None, None, None),
) -> list[str]:
    """The command line (after ``python -m multibus.worker``) that :func:`_parse` reads;
    ``fleet``, the supervisor's name, goes into the process title; ``rlimits`` (name ->
    (soft, hard)) are set, and ``ids`` (uid, gid, supplementary groups; None: keep ours)
    switched to, before the target is loaded."""
    argv = [
        "--parent-pid", str(parent_pid),
        "--name", name,
        "--target", target,
        "--stop-timeout", repr(float(stop_timeout)),
        "--endpoints", endpoints,
        "--heartbeat", "none" if heartbeat is None else repr(float(heartbeat)),
        "--peer-timeout", repr(float(peer_timeout)),
    ]
    for ch in channels:
        argv += ["--channel", ch]
    if fleet:
        argv += ["--fleet", fleet]
    if rlimits:
        from multibus.launcher import format_rlimits

        for arg in format_rlimits(dict(rlimits)):
            argv += ["--rlimit", arg]
    uid, gid, groups = ids
    for opt, value in (("--uid", uid), ("--gid", gid)):
        if value is not None:
            argv += [opt, str(value)]
    if groups is not None:
        argv += ["--groups", ",".join(map(str, groups))]
    return argv


def worker_env(spec: WorkerSpec | None = None) -> dict[str, str]:
    """The environment of a worker of ``spec`` (None: of the zygote, which forks them): ours
    plus the spec's ``env``, with this multibus on PYTHONPATH (the worker must import it as
    we do, whatever its cwd) and unbuffered output (its lines arrive as it prints them).
    The one definition: the supervisor spawns with it, ``multibus check`` imports targets
    with it."""
    env = dict(os.environ)
    if spec is not None:
        env.update(spec.env)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if here not in paths:
        paths.append(here)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class TargetError(Exception):
    """The worker's target cannot be imported or called."""


def _import_hint(e: Exception, module_name: str) -> str:
    """What to do about an import error: a module missing from outside the target's own
    package is a third-party package to install; anything else is a path to fix."""
    missing = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
    if missing:
        top = missing.partition(".")[0]
        if top != module_name.partition(".")[0]:
            return f"it needs the package {top!r}: install it, e.g. pip install {top}"
    return "check the module is on PYTHONPATH / the spec's cwd"


def load_target(target: str):
    """Resolve ``package.module:callable``; TargetError names the target and the fix."""
    import importlib

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise TargetError(f"target {target!r} must look like 'package.module:callable'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:
        hint = _import_hint(e, module_name)
        raise TargetError(
            f"cannot import target {target!r}: {type(e).__name__}: {e} ({hint})"
        ) from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(
                f"cannot load target {target!r}: module {module_name!r} has no {attr!r}"
            ) from None
    if not callable(obj):
        raise TargetError(f"target {target!r} is not callable")
    return obj


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # 1. parent death first of all (parse only what is needed for it)
    parent_pid = 0
    if "--parent-pid" in args:
        i = args.index("--parent-pid")
        try:
            parent_pid = int(args[i + 1])
        except (IndexError, ValueError):
            sys.stderr.write("multibus.worker: --parent-pid needs a pid\n")
            return EXIT_USAGE
    die_with_parent(parent_pid)
    from multibus.sockets import adopt

    adopt()  # its group's listening sockets to fd 3..., LISTEN_PID: before any user code
    import multibus.fastexit  # noqa: F401 - for run(); an import while exiting costs ~0.4 ms
    opts = _parse(args)
    name = str(opts["name"])
    if opts.get("rlimits"):  # the group's, before any of its code runs
        from multibus.launcher import apply_rlimits, parse_rlimit_arg

        try:
            apply_rlimits({n: (s, h) for n, s, h in map(parse_rlimit_arg, opts["rlimits"])})  # type: ignore[arg-type]
        except (OSError, ValueError) as e:
            sys.stderr.write(f"multibus.worker {name}: {e}\n")
            return EXIT_BAD_TARGET
    if "uid" in opts or "gid" in opts or "groups" in opts:  # the group's user, before its code
        from multibus.launcher import switch_user

        try:
            switch_user(opts.get("uid"), opts.get("gid"), opts.get("groups"))  # type: ignore[arg-type]
        except OSError as e:
            sys.stderr.write(f"multibus.worker {name}: cannot switch to the group's user: {e}\n")
            return EXIT_BAD_TARGET
        die_with_parent(parent_pid)  # a change of ids cleared the parent-death signal
    set_title(name, opts.get("fleet"))  # type: ignore[arg-type]
    # the target (and anything it starts) can tell which worker it is, e.g. to pick a port
    os.environ["MULTIBUS_WORKER"] = name
    # the secret that proves to the hub we are the process spawned as `name`: taken out of
    # the environment before the target runs, so nothing it starts inherits it
    secret = os.environ.pop(SECRET_ENV, None) or None
    stop_timeout = float(opts["stop_timeout"])  # type: ignore[arg-type]

    import signal
    import threading
    import time

    from multibus.bus import Bus

    bus = Bus()
    bridge: list = []  # the Bridge, once connected
    # Plain values, never locks: leave() runs inside a signal handler, which may interrupt
    # this very thread while it holds a lock (an Event's, say) and would then deadlock.
    leaving = {"why": "", "deadline": False, "exit_deferred": False}

    def parent_gone() -> bool:
        return bool(parent_pid) and os.getppid() != parent_pid

    def hard_exit() -> None:
        os.write(2, f"multibus.worker {name}: {leaving['why']}: the exit took too long; "
                    "exiting now\n".encode())
        os._exit(1)

    def arm_deadline(limit: float) -> None:
        """Exit hard ``limit`` s from now, whatever the exit is stuck on."""
        if threading.current_thread() is threading.main_thread():
            # maybe in a signal handler: a timer signal, no thread, no lock
            signal.signal(signal.SIGALRM, lambda signum, frame: hard_exit())
            signal.setitimer(signal.ITIMER_REAL, limit)
        else:
            threading.Thread(target=lambda: (time.sleep(limit), hard_exit()),
                             name="exit-deadline", daemon=True).start()

    def leave(why: str) -> None:
        """The parent or hub is gone (or wants us gone at once): exit the bus from the main
        thread, quickly and within a short deadline. Safe in a signal handler."""
        if bridge:
            bridge[0].abandon()  # nobody is left to read our last words: do not linger
        if not leaving["deadline"]:
            leaving["deadline"] = True
            leaving["why"] = why
            arm_deadline(min(stop_timeout, PARENT_GONE_EXIT))
        if not leaving["exit_deferred"]:
            leaving["exit_deferred"] = True
            bus.defer(bus.exit)

    def on_term(signum: int, frame: object) -> None:
        # SIGTERM is either PDEATHSIG (sent when the spawning thread dies, possibly while
        # the rest of the dying parent still runs, so getppid() cannot tell) or the
        # supervisor's escalation after the stop timeout: either way, exit quickly.
        leave("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)

    def on_hub_lost(reason: str = "") -> None:
        bus.log(f"hub lost ({reason}); exiting", 30)
        leave(f"hub lost ({reason})")

    bus.subscribe("hub.lost", on_hub_lost)

    # 2. the target subscribes its plugins before any command can arrive; what it logs
    # meanwhile is held by the (not yet connected) bridge and sent first once it connects
    from multibus.transport.bridge import Bridge

    peer: Bridge | ValueError
    try:
        peer = Bridge(
            bus,
            role="peer",
            name=name,
            endpoints=opts.get("endpoints"),  # type: ignore[arg-type]
            channels=opts["channels"],  # type: ignore[arg-type]
            apply_via=bus.defer,  # commands run in this main thread, which waits in block()
            secret=secret,
            **{k: opts[k] for k in ("heartbeat", "peer_timeout") if k in opts},  # type: ignore[arg-type]
        ).hold_logs()
    except ValueError as e:  # bad bridge options: raised at step 3, after the target's errors
        peer = e
    try:
        func = load_target(str(opts["target"]))
    except TargetError as e:
        sys.stderr.write(f"multibus.worker {name}: {e}\n")
        sys.stderr.flush()
        return EXIT_BAD_TARGET
    try:
        func(bus)
    except Exception as e:  # noqa: BLE001 - the target's error, reported
        import traceback

        traceback.print_exc()
        sys.stderr.write(
            f"multibus.worker {name}: target {opts['target']!r} failed when called with the "
            f"bus: {type(e).__name__}: {e}\n"
        )
        sys.stderr.flush()
        return EXIT_BAD_TARGET

    # 3. connect
    if isinstance(peer, ValueError):
        raise peer
    bridge.append(peer.subscribe())

    # 4. block until exit
    bus.block()
    return 1 if parent_gone() else 0


def run() -> None:
    """Entry point: main(), then exit without interpreter teardown (see ``exit_now``)."""
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            sys.stderr.write(f"{e.code}\n")
    from multibus.fastexit import exit_now  # loaded by main(): an import at exit is slow

    exit_now(code)


if __name__ == "__main__":
    run()
