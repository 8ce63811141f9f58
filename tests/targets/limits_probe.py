"""A worker target that prints the rlimits and umask its process got, then serves nothing."""

from __future__ import annotations

import os
import resource


def probe(bus) -> None:
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    core = resource.getrlimit(resource.RLIMIT_CORE)
    with open("/proc/self/status") as f:
        umask = next(line.split()[1] for line in f if line.startswith("Umask:"))
    print(f"LIMITS {os.environ.get('MULTIBUS_WORKER')} nofile={nofile[0]}:{nofile[1]} "
          f"core={core[0]}:{core[1]} umask={umask}", flush=True)


def identity(bus) -> None:
    """Print who this worker runs as; log on the bus when started and on graceful, so a test
    sees both ways of its hub connection work."""
    name = os.environ.get("MULTIBUS_WORKER")
    print(f"IDENTITY {name} uid={os.getuid()} gid={os.getgid()} groups={os.getgroups()} "
          f"home={os.environ.get('HOME')} user={os.environ.get('USER')}", flush=True)
    bus.subscribe("start", lambda: bus.log(f"{name} started as uid {os.getuid()}"))
    bus.subscribe("graceful", lambda: bus.log(f"{name} graceful as uid {os.getuid()}"))
