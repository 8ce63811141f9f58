"""The ``multibus`` command: run a supervised fleet, and control it from another terminal.

    multibus run TARGET|FILE.toml [-n N] [--name NAME] [--mirror CH ...]
    multibus run [-n N] [--group G] -- PROGRAM ARGS...
    multibus status [--json] [TARGET...]
    multibus start | stop | restart | graceful [TARGET...]   (a group, or a worker: job.2)
    multibus exit
    multibus signal TARGET... SIGNAL
    multibus scale GROUP N
    multibus apply [FILE]
    multibus reload [GROUP...]
    multibus logs [-f] [GROUP]
    multibus keygen NAME [--dir DIR]
    multibus run FILE.toml --join tcp://HOST:PORT   (a child of a parent supervisor)
    multibus --version

This module only parses argv. ``run`` loads and checks the fleet, then calls
:func:`multibus.runner.run_fleet` (the foreground supervisor: Bus, Supervisor, Control socket,
signals, log printing, systemd notification). The other commands are declared in
:mod:`multibus.commands` (their arguments, help and output) and talk to that Control socket;
transitions are queued there and the client waits for them (``--no-wait`` to return once
queued). Exit status: 0 ok, 1 failure or no such
supervisor, 2 bad usage or configuration (nothing started).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from multibus.actions import ControlError, NotRunning
from multibus.commands import (
    COMMANDS,
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    say_error,
)
from multibus.config import (
    ConfigError,
    FleetConfig,
    from_command,
    from_target,
    load,
    parse_level,
    valid_module,
)
from multibus.controlclient import ControlClient, resolve_name
from multibus.preflight import start_checks
from multibus.rundir import RunDirError

__all__ = ["build_parser", "console", "main"]


# --------------------------------------------------------------------------- run

def _load_fleet(args: argparse.Namespace) -> FleetConfig:
    target = args.target
    if args.cmd is not None:  # run -- PROGRAM ARGS...
        if target is not None or args.mirror:
            raise ConfigError(f"run -- {' '.join(args.cmd)}: give either a TARGET|FILE or a "
                              "program after '--' (and no --mirror: a program has no bus)")
        cfg = from_command(args.cmd, 1 if args.n is None else args.n, group=args.group)
        return cfg.with_name(_name(args))
    if target is None:
        raise ConfigError("run: expected a TARGET, a FILE.toml, or '-- PROGRAM ARGS...'")
    if args.group is not None:
        raise ConfigError("run: --group names the group of a program run with '-- PROGRAM'")
    if target.endswith(".toml") or os.path.isfile(target):
        if args.n is not None or args.mirror:
            raise ConfigError(f"{target}: -n and --mirror apply to a TARGET; set count and "
                              "channels in the file")
        cfg = load(target)
    elif ":" in target:
        cfg = from_target(target, 1 if args.n is None else args.n, args.mirror or ())
    else:
        raise ConfigError(f"{target!r} is neither a .toml file nor a 'package.module:callable' "
                          "target")
    return cfg.with_name(_name(args))


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = _load_fleet(args)
        level = cfg.log_level if args.log_level is None else parse_level(args.log_level)
        fmt = args.log_format or cfg.log_format
        for module in args.preload or ():
            if not valid_module(module):
                raise ConfigError(f"--preload {module!r}: expected a module name like "
                                  "'app.jobs'")
        zygote = (cfg.zygote or args.zygote or bool(args.preload)) and not args.exec
        if args.exec and (args.zygote or args.preload or cfg.zygote_preload):
            raise ConfigError("--exec: cannot be combined with --zygote, --preload or the "
                              "fleet file's zygote_preload; drop one of them")
        cfg = _joining(cfg, args.join)
        checks = start_checks(cfg, fork=zygote)  # its workers are forked: so are the checks
    except ConfigError as e:
        say_error(str(e))
        return EXIT_USAGE
    try:
        # imported while the targets are checked (each check is an interpreter start)
        from multibus.runner import FleetRefused, run_fleet
    except BaseException:
        checks.close()
        raise
    try:
        checks.wait()
    except ConfigError as e:
        say_error(str(e))
        return EXIT_USAGE

    cfg = replace(cfg, log_level=level, log_format=fmt,
                  zygote=zygote,
                  zygote_preload=(*cfg.zygote_preload, *(args.preload or ())))
    try:
        return run_fleet(cfg)
    except FleetRefused as e:
        say_error(str(e))
        return e.code


def _joining(cfg: FleetConfig, join: str | None) -> FleetConfig:
    """``run --join ADDRESS``: the [upstream] table's address (its keys stay the file's)."""
    up = cfg.upstream
    if join is not None:
        if up is None:
            raise ConfigError(f"--join {join}: needs an [upstream] table in the fleet file "
                              "with this host's key and the parent's server_key")
        from multibus.transport.endpoints import EndpointError, Endpoints

        try:
            if not Endpoints.parse(join).is_network or "*" in join:
                raise EndpointError("not tcp")
        except EndpointError:
            raise ConfigError(f"--join {join!r}: expected tcp://HOST:PORT") from None
        return replace(cfg, upstream=replace(up, address=join))
    if up is not None and up.address is None:
        raise ConfigError(f"{cfg.source}: upstream.address: missing; set it, or run with "
                          "--join tcp://HOST:PORT")
    return cfg


def cmd_keygen(args: argparse.Namespace) -> int:
    """``multibus keygen NAME``: DIR/NAME.key (public) and DIR/NAME.key_secret (0600)."""
    from multibus.transport.endpoints import EndpointError
    from multibus.transport.keys import load_keys, make_keys

    try:
        public, secret = make_keys(args.dir, args.key_name)
    except EndpointError as e:
        say_error(f"keygen: {e}".replace("pass --force to replace it", "remove it first"))
        return EXIT_USAGE
    print(f"{public}: public key {load_keys(public).public.decode()} (give it to the "
          f"other side)\n{secret}: secret key (mode 0600, keep it here)")
    return EXIT_OK


# --------------------------------------------------------------------------- control commands

def _name(args: argparse.Namespace) -> str | None:
    return getattr(args, "name", None) or getattr(args, "global_name", None)


def _client(args: argparse.Namespace) -> ControlClient:
    name = _name(args)
    if name is None and getattr(args, "config", None):
        name = load(args.config).name
    return ControlClient(resolve_name(name), timeout=args.request_timeout)


# --------------------------------------------------------------------------- parser

def version() -> str:
    """The installed package's version (its metadata), or the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("multibus")
    except PackageNotFoundError:  # run from a checkout that was never installed
        from multibus import __version__

        return __version__


class _Version(argparse.Action):
    """``--version``: the version is looked up only when asked for (the package metadata
    scan costs ~20 ms, which every command, ``multibus run`` included, paid at start)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "show program's version number and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        parser._print_message(f"{parser.prog} {version()}\n", sys.stdout)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Run a fleet of worker buses under a supervisor, and control it.",
        epilog="Exit status: 0 ok, 1 failure (or no such supervisor), 2 bad usage or "
               "configuration.",
    )
    ap.add_argument("--version", action=_Version)
    ap.add_argument("--name", dest="global_name", metavar="NAME", help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", metavar="NAME",
                        help="supervisor name (default: the file's, else 'multibus'; control "
                             "commands: the only running one)")

    ctl = argparse.ArgumentParser(add_help=False, parents=[common])
    ctl.add_argument("-c", "--config", metavar="FILE",
                     help="take the supervisor name from this fleet file")
    ctl.add_argument("--request-timeout", type=float, default=5.0, metavar="S",
                     help=argparse.SUPPRESS)

    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--no-wait", action="store_true",
                         help="return once the supervisor has queued it")
    waiting.add_argument("--timeout", type=float, default=120.0, metavar="S",
                         help="seconds to wait for it to be done (default 120)")

    run = sub.add_parser("run", parents=[common], help="run a supervisor in the foreground",
                         description="Run a fleet in the foreground: TARGET is "
                         "'package.module:callable' (called with each worker's bus), or a "
                         "fleet .toml file; or '-- PROGRAM ARGS...' runs any executable "
                         "(a cmd group). Ctrl-C / SIGTERM stop it gracefully; SIGHUP "
                         "stops it too on a terminal, and reloads when detached (stdin not a "
                         "terminal: systemd, a daemon); SIGTTIN / SIGTTOU add / remove a worker "
                         "of the first group; SIGUSR2 is a rolling reload (multibus reload).")
    run.add_argument("target", metavar="TARGET|FILE", nargs="?")
    run.add_argument("--group", metavar="NAME", default=None,
                     help="with '-- PROGRAM ARGS...': the group's name (default: the "
                     "program's basename)")
    run.add_argument("-n", type=int, default=None, metavar="N",
                     help="number of workers of TARGET (default 1)")
    run.add_argument("--mirror", action="append", metavar="CH",
                     help="mirror bus channel CH between supervisor and workers (repeatable)")
    run.add_argument("--log-level", default=None, metavar="LEVEL",
                     help="debug, info (default), warning, error, critical")
    run.add_argument("--log-format", choices=("text", "json"), default=None,
                     help="text lines (default) or JSON lines")
    run.add_argument("--exec", action="store_true",
                     help="start an interpreter for each worker instead of forking it from "
                     "one preloaded process, the default (as 'zygote = false' in a fleet file)")
    run.add_argument("--zygote", action="store_true",
                     help="fork workers from one preloaded process (the default; overrides "
                     "'zygote = false')")
    run.add_argument("--preload", action="append", metavar="MODULE",
                     help="have that process import MODULE once, e.g. your worker module, "
                     "instead of each worker (repeatable)")

    run.add_argument("--join", metavar="ADDRESS", default=None,
                     help="join the parent supervisor at tcp://HOST:PORT (the fleet file's "
                     "[upstream] gives the keys)")
    keygen = sub.add_parser("keygen", help="write a CURVE key pair for several hosts",
                            description="Write DIR/NAME.key (public: give it to the other "
                            "side) and DIR/NAME.key_secret (mode 0600). Never overwrites.")
    keygen.add_argument("key_name", metavar="NAME")
    keygen.add_argument("--dir", default=".", metavar="DIR",
                        help="where to write them (default: the current directory)")

    for command in COMMANDS.values():
        command.add_parsers(sub, ctl, waiting)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``multibus`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = None
    if "run" in argv and "--" in argv and argv.index("run") < argv.index("--"):
        cut = argv.index("--")  # run ... -- PROGRAM ARGS: the program's args are its own
        argv, cmd = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.cmd = cmd
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "keygen":
            return cmd_keygen(args)
        return int(args.control.run(args, lambda: _client(args)))
    except NotRunning as e:
        say_error(str(e))
        return EXIT_FAIL
    except ConfigError as e:
        say_error(str(e))
        return EXIT_USAGE
    except (ControlError, RunDirError) as e:  # e.g. a runtime dir another user pre-created
        say_error(str(e))
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


def console() -> None:
    """The ``multibus`` console script: main(), then leave without interpreter teardown
    (a supervisor that has reaped its fleet has nothing left for it; see ``exit_now``)."""
    from multibus.fastexit import exit_now

    exit_now(main())


if __name__ == "__main__":
    console()
