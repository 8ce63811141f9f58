"""Shared fixtures: every test must leave no child process behind."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from multibus import Bus

# Every test (and every process it starts) gets a private runtime dir for ipc sockets and
# PID files, so tests never touch the user's real one and leave nothing behind in it.
# mkdtemp makes it 0700; a short /tmp path keeps ipc socket paths under the 107-byte limit.
_RUNTIME_DIR = tempfile.mkdtemp(prefix="mbt-")
os.environ["XDG_RUNTIME_DIR"] = _RUNTIME_DIR


def pytest_unconfigure(config):
    shutil.rmtree(_RUNTIME_DIR, ignore_errors=True)


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process(os.getpid()).children(recursive=True)
    except psutil.Error:
        return []


@pytest.fixture(autouse=True)
def no_leftover_children():
    """Fail a test whose child processes outlive it, and kill them so the next test is clean.

    Children get a short grace period to finish exiting (a reaped process disappears at once;
    this only covers a child that is already on its way out).
    """
    before = {p.pid for p in _children()}
    yield
    deadline = time.monotonic() + 3.0
    left = [p for p in _children() if p.pid not in before]
    while left and time.monotonic() < deadline:
        gone, left = psutil.wait_procs(left, timeout=0.1)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    if left:
        described = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in left if p.is_running()]
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=3)
        pytest.fail(f"test left child processes running: {described}")


@pytest.fixture
def bus():
    """A fresh Bus, exited after the test (exit() on an EXITING bus does nothing)."""
    b = Bus()
    yield b
    b.exit()


@pytest.fixture
def xdg(tmp_path, monkeypatch) -> Path:
    """A private XDG_RUNTIME_DIR, so tests never touch the real runtime dir."""
    base = tmp_path / "xdg"
    base.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    return base
