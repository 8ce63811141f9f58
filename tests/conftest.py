"""Shared fixtures: every test must leave no child process behind."""

from __future__ import annotations

import os
import time

import psutil
import pytest


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
