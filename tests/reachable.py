"""Run a supervisor where another user can reach this Python, for tests of run-as-user.

A test machine's interpreter may live where only root can pass (e.g. pyenv under a 0700
``/root``). :func:`argv_for` wraps a command in a private mount namespace (``unshare -m``)
in which each such directory is a 0755 tmpfs holding bind mounts of just the entries on the
way to the interpreter, multibus and their packages: nothing changes outside the namespace.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import sys
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq

import multibus


def _needed() -> list[Path]:
    mods = (multibus, zmq, msgpack, psutil)
    return [Path(sys.prefix).resolve(), Path(sys.executable).resolve(),
            *(Path(m.__file__).resolve().parent for m in mods)]


def _closed_dirs() -> dict[Path, set[str]]:
    """Directories others cannot pass on the way to what a worker needs -> the entries in
    them that lead there."""
    closed: dict[Path, set[str]] = {}
    for path in _needed():
        for parent in reversed(path.parents):
            child = path.relative_to(parent).parts[0] if parent != path else None
            if child and not stat.S_IMODE(os.stat(parent).st_mode) & 0o001:
                closed.setdefault(parent, set()).add(child)
    return closed


def argv_for(argv: list[str]) -> list[str]:
    """``argv``, run where others can reach this Python (as is when they already can);
    skips the test when that needs a mount namespace and none can be made."""
    closed = _closed_dirs()
    if not closed:
        return argv
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("this Python is not reachable by other users and unshare -m is unavailable")
    script = []
    for parent, children in sorted(closed.items()):
        p = shlex.quote(str(parent))
        script.append(f'keep=$(mktemp -d) && mount --bind {p} "$keep" && '
                      f"mount -t tmpfs -o mode=0755 tmpfs {p}")
        for child in sorted(children):
            c = shlex.quote(child)
            kind = "mkdir" if (parent / child).is_dir() else "touch"
            script.append(f'{kind} {p}/{c} && mount --bind "$keep"/{c} {p}/{c}')
        script.append('umount "$keep" && rmdir "$keep"')
    script.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
            " && ".join(script), "sh", *argv]
