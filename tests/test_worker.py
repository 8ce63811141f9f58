"""`python -m multibus.worker`: the parts that happen before it connects (no hub needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from multibus.worker import TargetError, load_target

HERE = Path(__file__).resolve().parent
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))


def run_worker(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multibus.worker", *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_load_target_resolves_dotted_attribute():
    assert load_target("os.path:join") is os.path.join


@pytest.mark.parametrize("target, words", [
    ("no_such_module_xyz:run", ["cannot import", "no_such_module_xyz", "PYTHONPATH"]),
    ("os:no_such_attr", ["has no", "no_such_attr"]),
    ("os:sep", ["not callable"]),
    ("nocolon", ["package.module:callable"]),
])
def test_load_target_errors_name_the_target(target, words):
    with pytest.raises(TargetError) as e:
        load_target(target)
    assert target in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_a_missing_third_party_package_says_install_it():
    with pytest.raises(TargetError) as e:
        load_target("targets.needs_pkg:worker")
    msg = str(e.value)
    assert "No module named 'no_such_dependency_xyz'" in msg
    assert "install it, e.g. pip install no_such_dependency_xyz" in msg
    assert "PYTHONPATH" not in msg


@pytest.mark.timeout(20)
def test_unimportable_target_exits_2_with_one_clear_line():
    r = run_worker("--parent-pid", str(os.getpid()), "--name", "w.0",
                   "--target", "targets.nope:job")
    assert r.returncode == 2
    assert "w.0" in r.stderr and "cannot import target 'targets.nope:job'" in r.stderr


@pytest.mark.timeout(20)
def test_target_failing_when_called_names_it():
    r = run_worker("--parent-pid", str(os.getpid()), "--name", "w.0",
                   "--target", "targets.jobs:failing")
    assert r.returncode == 2
    assert "target 'targets.jobs:failing' failed" in r.stderr
    assert "database unreachable" in r.stderr


@pytest.mark.timeout(20)
def test_worker_exits_at_once_when_parent_is_already_gone():
    r = run_worker("--parent-pid", "1", "--name", "w.0", "--target", "targets.jobs:job")
    assert r.returncode == 3
    assert "parent 1 is gone" in r.stderr


@pytest.mark.timeout(20)
def test_usage_error():
    r = run_worker("--parent-pid", str(os.getpid()), "--bogus", "x")
    assert r.returncode != 0 and "unknown option --bogus" in r.stderr


@pytest.mark.timeout(20)
def test_worker_imports_little_before_connecting():
    # fast start: importing the worker module must not pull in zmq, psutil or msgpack
    code = ("import sys; import multibus.worker; "
            "print(sorted(m for m in ('zmq','psutil','msgpack','subprocess','argparse') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                       timeout=10)
    assert r.stdout.strip() == "[]", r.stderr


@pytest.mark.timeout(20)
def test_connected_worker_imports_little():
    # what a worker loads to connect (and every zygote-forked worker maps, then unmaps at
    # exit) leaves out dataclasses (inspect, ast, dis...), logging and the CURVE/CLI helpers
    code = ("import sys; before = set(sys.modules); "
            "import multibus.worker, multibus.bus, multibus.transport.bridge; "
            "print(sorted(m for m in ('dataclasses', 'inspect', 'logging', 'argparse', "
            "'tempfile', 'zmq.auth', 'psutil') if m in set(sys.modules) - before))")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                       timeout=10)
    assert r.stdout.strip() == "[]", r.stderr


def test_heartbeat_none_turns_heartbeats_off():
    from multibus.worker import _parse

    base = ["--name", "w.0", "--target", "a.b:c"]
    assert _parse([*base, "--heartbeat", "none"])["heartbeat"] is None
    assert _parse([*base, "--heartbeat", "2.5"])["heartbeat"] == 2.5
