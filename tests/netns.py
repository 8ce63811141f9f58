"""Hosts on one machine, for the several-hosts tests: Linux network namespaces.

``Hosts(n)`` makes ``n`` namespaces, each joined to this one by a point-to-point veth link
(``10.X.i.1`` here, ``10.X.i.2`` there, X random per run): a child supervisor runs in host i
and reaches the parent at ``parent_ip(i)``. :meth:`Hosts.cut` / :meth:`Hosts.restore` take a
host's link down and up. Everything is removed on ``close()`` (the fixture calls it even
when the test fails). Needs root and iproute2: :func:`skip_reason` says why not.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def skip_reason() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed: apt-get install iproute2"
    probe = f"mbprobe{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def free_port() -> int:
    """A port P with P, P+1 and P+2 free on every address here (a hub binds all three)."""
    for _ in range(100):
        port = random.randrange(20000, 60000)
        socks = []
        try:
            for p in (port, port + 1, port + 2):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port triple")


class Hosts:
    """``n`` network namespaces linked to this one (see the module docstring)."""

    def __init__(self, n: int) -> None:
        self.tag = f"{os.getpid() % 10000:04d}{random.randrange(100):02d}"
        self.net = random.randrange(100, 250)
        self.names = [f"mb{self.tag}h{i}" for i in range(n)]
        self._made: list[int] = []
        try:
            for i in range(n):
                self._make(i)
        except BaseException:
            self.close()
            raise

    def _veth(self, i: int) -> str:
        return f"mb{self.tag}v{i}"

    def parent_ip(self, i: int) -> str:
        return f"10.{self.net}.{i}.1"

    def _make(self, i: int) -> None:
        ns, veth = self.names[i], self._veth(i)
        _ip("netns", "add", ns)
        self._made.append(i)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("addr", "add", f"{self.parent_ip(i)}/30", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"10.{self.net}.{i}.2/30", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    def cut(self, i: int) -> None:
        _ip("link", "set", self._veth(i), "down")

    def restore(self, i: int) -> None:
        _ip("link", "set", self._veth(i), "up")

    def argv(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run inside host ``i``."""
        return ["ip", "netns", "exec", self.names[i], *argv]

    def close(self) -> None:
        for i in self._made:
            _ip("link", "del", self._veth(i), check=False)
            _ip("netns", "del", self.names[i], check=False)
        self._made = []


def supervisor(argv: list[str], env: dict | None = None
               ) -> contextlib.AbstractContextManager[tuple[subprocess.Popen, Path]]:
    """``argv`` (a ``multibus run``, maybe inside a namespace) in the background, its output
    in a file; on the way out SIGTERM (then SIGKILL) to it and any process it left behind."""
    from test_cli import supervised

    return supervised(argv, env=env, wait=30, check_left=False)


def multibus(*args: str) -> list[str]:
    return [sys.executable, "-m", "multibus", *args]
