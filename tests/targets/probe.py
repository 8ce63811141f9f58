"""Worker targets that report what their process sees, to compare a forked worker with an
exec'd one of the same spec (tests/test_zygote.py), and one that is slow to start."""

from __future__ import annotations

import json
import os
import sys
import time


def _handler(h: object) -> str:
    return getattr(h, "__qualname__", None) or repr(h)


def report(bus) -> None:
    """Write what this process sees to ``$MB_PROBE_DIR/<worker>.json``, atomically."""
    import resource
    import signal
    import threading

    with open("/proc/self/status") as f:
        umask = next(line.split()[1] for line in f if line.startswith("Umask:"))
    seen = {
        "environ": dict(os.environ),
        "sys_path": list(sys.path),
        "cwd": os.getcwd(),
        "umask": umask,
        "rlimits": {n: resource.getrlimit(getattr(resource, n)) for n in dir(resource)
                    if n.startswith("RLIMIT_")},
        "signals": {signal.Signals(s).name: _handler(signal.getsignal(s))
                    for s in signal.valid_signals()
                    if s not in (signal.SIGKILL, signal.SIGSTOP) and s < signal.SIGRTMIN},
        "sigmask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "threads": threading.active_count(),
        "argv0": sys.argv[0],
        "ids": [os.getresuid(), os.getresgid(), sorted(os.getgroups())],
        "flags": repr(sys.flags),
        "stdio": [sys.stdout.encoding, sys.getfilesystemencoding()],
        "pgid_is_pid": os.getpgid(0) == os.getpid(),
        "stdin": os.readlink("/proc/self/fd/0"),
    }
    path = os.path.join(os.environ["MB_PROBE_DIR"], os.environ["MULTIBUS_WORKER"] + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(seen, f)
    os.replace(path + ".tmp", path)


def slow_then_crash_once(bus) -> None:
    """Its first process takes ``$MB_SLOW`` s and exits 1; later ones take ``$MB_SLOW2`` s and
    start normally (``$MB_MARK``: the file that tells them apart)."""
    mark = os.environ["MB_MARK"]
    if not os.path.exists(mark):
        open(mark, "w").close()
        time.sleep(float(os.environ["MB_SLOW"]))
        sys.exit(1)
    time.sleep(float(os.environ["MB_SLOW2"]))
