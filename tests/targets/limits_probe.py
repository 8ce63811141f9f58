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
