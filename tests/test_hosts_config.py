"""Several hosts, without namespaces: `multibus keygen`, and the [upstream] / [downstream]
tables and --join refused with one line (exit 2) before anything starts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from test_cli import mb

from multibus.config import load


def keys(tmp_path: Path, *names: str) -> Path:
    d = tmp_path / "keys"
    for n in names:
        r = mb("keygen", n, "--dir", str(d))
        assert r.returncode == 0, r.stderr
    return d


def test_keygen_writes_a_private_secret_and_never_overwrites(tmp_path):
    d = keys(tmp_path, "host-b")
    secret, public = d / "host-b.key_secret", d / "host-b.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    before = secret.read_bytes()
    r = mb("keygen", "host-b", "--dir", str(d))
    assert r.returncode == 2
    assert r.stderr.startswith("multibus: keygen: key ") and "already exists" in r.stderr
    assert secret.read_bytes() == before


def host_file(tmp_path: Path, upstream: str, groups: bool = True) -> Path:
    f = tmp_path / "host.toml"
    f.write_text(f"[upstream]\n{upstream}\n"
                 + ('[groups.job]\ntarget = "targets.jobs:job"\n' if groups else ""))
    return f


def test_a_secret_key_readable_by_others_is_refused_with_the_reason(tmp_path):
    d = keys(tmp_path, "parent", "hb")
    os.chmod(d / "hb.key_secret", 0o644)
    f = host_file(tmp_path, 'address = "tcp://10.0.0.1:7000"\nkey = "keys/hb.key_secret"\n'
                  'server_key = "keys/parent.key"')
    r = mb("run", str(f))
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and "upstream.key" in line and "readable by others" in line
    assert "chmod 600" in line


def test_upstream_needs_an_address_or_join_and_join_needs_upstream(tmp_path):
    keys(tmp_path, "parent", "hb")
    f = host_file(tmp_path, 'key = "keys/hb.key_secret"\nserver_key = "keys/parent.key"')
    r = mb("run", str(f))
    assert r.returncode == 2 and "upstream.address: missing" in r.stderr
    r = mb("run", str(f), "--join", "ipc:///tmp/x")
    assert r.returncode == 2 and "expected tcp://HOST:PORT" in r.stderr
    plain = tmp_path / "plain.toml"
    plain.write_text('[groups.job]\ntarget = "targets.jobs:job"\n')
    r = mb("run", str(plain), "--join", "tcp://10.0.0.1:7000")
    assert r.returncode == 2 and "needs an [upstream] table" in r.stderr


def test_downstream_keys_and_a_parent_without_groups(tmp_path):
    keys(tmp_path, "parent", "hb")
    f = tmp_path / "parent.toml"
    f.write_text('[downstream]\nlisten = "tcp://0.0.0.0:7000"\nkey = "keys/parent.key_secret"\n'
                 'allow = ["keys/hb.key"]\ntimeout = 3\n')
    cfg = load(f)
    assert cfg.specs == [] and cfg.downstream is not None and cfg.downstream.timeout == 3.0
    assert len(cfg.downstream.curve.allowed) == 1
    f.write_text('[downstream]\nlisten = "tcp://0.0.0.0:7000"\nkey = "keys/parent.key_secret"\n')
    r = mb("run", str(f))
    assert r.returncode == 2 and "downstream.allow" in r.stderr
    f.write_text('[downstream]\nlisten = "tcp://0.0.0.0:7000"\nkey = "keys/parent.key"\n'
                 'allow = ["keys/hb.key"]\n')
    r = mb("run", str(f))
    assert r.returncode == 2 and "a secret key file" in r.stderr
