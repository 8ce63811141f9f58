"""Fleet files: validation errors are one line naming file, key and expectation."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from multibus.config import ConfigError, from_target, load, parse_level
from multibus.preflight import check_targets

ROOT = Path(__file__).resolve().parent.parent
TARGETS = Path(__file__).resolve().parent  # holds the 'targets' package


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(path) + ": ")
    return msg


def test_full_file(tmp_path):
    path = write(tmp_path, """
        [supervisor]
        name = "shop"
        pidfile = "run/shop.pid"
        stop_timeout = 7
        term_timeout = 1.5
        max_restarts = 3
        restart_period = 30
        log_level = "WARNING"
        log_format = "json"
        pythonpath = ["lib"]
        zygote = true

        [groups.web]
        target = "app:serve"
        count = 2
        env = { PORT = "8080" }
        cwd = "srv"

        [groups.jobs]
        target = "jobs:worker"
        channels = ["orders"]
        restart = "transient"
        stop_timeout = 2
        start_timeout = 4.5
        pythonpath = ["more"]
    """)
    cfg = load(path)
    assert cfg.name == "shop"
    assert cfg.pidfile == str(tmp_path / "run/shop.pid")
    assert cfg.term_timeout == 1.5
    assert (cfg.intensity.max_restarts, cfg.intensity.period) == (3, 30.0)
    assert (cfg.log_level, cfg.log_format, cfg.zygote) == (30, "json", True)
    assert [s.name for s in cfg.specs] == ["web", "jobs"]  # file order: web is the default
    assert cfg.default_group == "web"
    web, jobs = cfg.specs
    assert (web.target, web.count, web.stop_timeout, web.cwd) == (
        "app:serve", 2, 7.0, str(tmp_path / "srv"))
    assert web.env["PORT"] == "8080"
    assert web.env["PYTHONPATH"] == str(tmp_path / "lib")
    assert (jobs.channels, jobs.restart, jobs.stop_timeout, jobs.start_timeout) == (
        ("orders",), "transient", 2.0, 4.5)
    assert jobs.env["PYTHONPATH"] == os.pathsep.join([str(tmp_path / "lib"),
                                                       str(tmp_path / "more")])
    assert cfg.with_name("other").name == "other" and cfg.with_name(None) is cfg


def test_defaults(tmp_path):
    cfg = load(write(tmp_path, '[groups.w]\ntarget = "m:f"\n'))
    assert cfg.name == "multibus" and cfg.pidfile is None and cfg.log_format == "text"
    assert cfg.zygote is True and cfg.zygote_preload == ()  # issue 18: the zygote by default
    (spec,) = cfg.specs
    assert (spec.count, spec.restart, spec.env) == (1, "permanent", {})


@pytest.mark.parametrize("text, expected", [
    ('[groups.w]\ntarget = "m:f"\ncuont = 2\n',
     "groups.w.cuont: unknown key; expected one of target, count"),
    ('colour = true\n[groups.w]\ntarget = "m:f"\n', "colour: unknown key"),
    ('[supervisor]\nnmae = "x"\n[groups.w]\ntarget = "m:f"\n', "supervisor.nmae: unknown key"),
    ('[groups.w]\ntarget = "m:f"\ncount = "3"\n',
     "groups.w.count: expected an integer >= 0, got '3' (string)"),
    ('[groups.w]\ntarget = "m:f"\ncount = -1\n', "groups.w.count: expected an integer >= 0"),
    ('[groups.w]\ntarget = "m:f"\ncount = true\n', "got True (boolean)"),
    ('[groups.w]\ntarget = "m:f"\nstop_timeout = 0\n',
     "groups.w.stop_timeout: expected a number of seconds > 0"),
    ('[groups.w]\ntarget = "m:f"\nchannels = "orders"\n',
     "groups.w.channels: expected an array of non-empty strings"),
    ('[groups.w]\ntarget = "m:f"\nenv = { PORT = 8080 }\n',
     "groups.w.env.PORT: expected a string (quote numbers), got 8080 (integer)"),
    ('[groups.w]\ntarget = "m:f"\nrestart = "always"\n',
     "groups.w.restart: expected one of 'permanent', 'transient', 'temporary'"),
    ('[groups.w]\ncount = 2\n', "groups.w.target: missing"),
    ('[groups.w]\ntarget = "no colon"\n', "target 'no colon' must look like"),
    ('[groups.w]\ntarget = "m:f"\nchannels = ["main"]\n', "cannot be mirrored"),
    ('[supervisor]\nname = "a b"\n[groups.w]\ntarget = "m:f"\n',
     "supervisor.name: invalid hub name 'a b'"),
    ('[supervisor]\nlog_level = "loud"\n[groups.w]\ntarget = "m:f"\n',
     "supervisor.log_level: expected one of 'debug'"),
    ('[supervisor]\nlog_format = "xml"\n[groups.w]\ntarget = "m:f"\n',
     "supervisor.log_format: expected one of 'text', 'json'"),
    ('[supervisor]\npidfile = true\n[groups.w]\ntarget = "m:f"\n',
     "supervisor.pidfile: expected a path string or false"),
    ('[supervisor]\nmax_restarts = 2.5\n[groups.w]\ntarget = "m:f"\n',
     "supervisor.max_restarts: expected an integer >= 0, got 2.5 (float)"),
    ('[supervisor]\nzygote = "yes"\n[groups.w]\ntarget = "m:f"\n',
     "supervisor.zygote: expected true or false, got 'yes' (string)"),
    ('[supervisor]\nzygote_preload = ["app-jobs"]\n[groups.w]\ntarget = "m:f"\n',
     "supervisor.zygote_preload: expected module names like 'app.jobs', got 'app-jobs'"),
    ('[supervisor]\nzygote = false\nzygote_preload = ["app"]\n[groups.w]\ntarget = "m:f"\n',
     "supervisor.zygote_preload: needs the zygote; remove 'zygote = false' or the preload"),
    ('supervisor = 3\n', "supervisor: expected a table, got 3 (integer)"),
    ('[supervisor]\nname = "x"\n', "groups: missing"),
    ('groups = {}\n', "groups: empty"),
    ('[groups.w]\ntarget = "m:f"\n[groups.w.env]\nA = ["x"]\n', "groups.w.env.A: expected"),
    ('[groups.w\ntarget = "m:f"\n', "invalid TOML"),
])
def test_errors_name_file_and_key(tmp_path, text, expected):
    assert expected in error_of(write(tmp_path, text))


def test_zygote_false_opts_out(tmp_path):
    cfg = load(write(tmp_path, '[supervisor]\nzygote = false\n[groups.w]\ntarget = "m:f"\n'))
    assert cfg.zygote is False


def test_zygote_preload_implies_the_zygote(tmp_path):
    cfg = load(write(tmp_path, '[supervisor]\nzygote_preload = ["app.jobs", "lib"]\n'
                               '[groups.w]\ntarget = "app.jobs:f"\n'))
    assert cfg.zygote is True and cfg.zygote_preload == ("app.jobs", "lib")


def test_missing_file(tmp_path):
    assert "no such file" in error_of(tmp_path / "fleet.toml")


def test_from_target():
    cfg = from_target("targets.jobs:job", 3, ["orders"], name="x")
    assert (cfg.name, cfg.specs[0].name, cfg.specs[0].count, cfg.specs[0].channels) == (
        "x", "jobs", 3, ("orders",))
    with pytest.raises(ConfigError, match="must look like"):
        from_target("nonsense")
    with pytest.raises(ConfigError, match="--name: invalid hub name"):
        from_target("m:f", name="a/b")


def test_parse_level():
    assert parse_level("INFO") == 20 and parse_level("debug") == 10 and parse_level("25") == 25
    with pytest.raises(ConfigError, match="expected one of debug"):
        parse_level("verbose")


@pytest.mark.timeout(30)
def test_check_targets(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(f'[supervisor]\npythonpath = ["{TARGETS}"]\n'
                    '[groups.a]\ntarget = "targets.jobs:job"\n'
                    '[groups.b]\ntarget = "targets.jobs:stubborn"\n')
    check_targets(load(good))  # importable: no error

    for target, expected in [
        ("nosuchmodule_xyz:job", "No module named 'nosuchmodule_xyz'"),
        ("targets.jobs:nothere", "has no 'nothere'"),
        ("targets.jobs:RAN", "is not callable"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(f'[supervisor]\npythonpath = ["{TARGETS}"]\n'
                       '[groups.a]\ntarget = "targets.jobs:job"\n'
                       f'[groups.b]\ntarget = "{target}"\n')
        with pytest.raises(ConfigError) as info:
            check_targets(load(bad))
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"{bad}: groups.b.target: ")
        assert expected in msg


def test_cwd_must_exist(tmp_path):
    path = write(tmp_path, '[groups.w]\ntarget = "m:f"\ncwd = "nowhere"\n')
    with pytest.raises(ConfigError, match="groups.w.cwd: no such directory"):
        check_targets(load(path))


_FORKED = """\
import json, sys
from multibus.config import ConfigError, load
from multibus.preflight import start_checks

out = {}
for path in sys.argv[1:]:
    checks = start_checks(load(path), fork=True)
    kinds = [type(p).__name__ for _, p in checks.procs]
    try:
        checks.wait()
        out[path] = [kinds, None]
    except ConfigError as e:
        out[path] = [kinds, str(e)]
print(json.dumps(out))
"""


@pytest.mark.timeout(60)
def test_check_targets_forked_as_the_zygote_forks_workers(tmp_path):
    """`multibus run` with the zygote checks by forking (no interpreter start): the same
    verdicts and messages; the group's cwd and pythonpath apply in the child; a group a
    zygote would exec (a start-up variable of its own) is checked in an interpreter."""
    import json
    import subprocess
    import sys

    app = tmp_path / "app"
    app.mkdir()
    (app / "here_only.py").write_text("def serve(bus):\n    pass\n")
    files = {}
    for key, groups in {
        "good": '[groups.a]\ntarget = "targets.jobs:job"\n'
                f'[groups.c]\ntarget = "here_only:serve"\ncwd = "{app}"\n'
                '[groups.e]\ntarget = "targets.jobs:job"\nenv = { PYTHONHASHSEED = "1" }\n',
        "module": '[groups.a]\ntarget = "targets.jobs:job"\n'
                  '[groups.b]\ntarget = "nosuchmodule_xyz:job"\n',
        "attr": '[groups.b]\ntarget = "targets.jobs:nothere"\n',
        "notcwd": '[groups.b]\ntarget = "here_only:serve"\n',
    }.items():
        files[key] = tmp_path / f"{key}.toml"
        files[key].write_text(f'[supervisor]\npythonpath = ["{TARGETS}"]\n{groups}')
    r = subprocess.run([sys.executable, "-c", _FORKED, *map(str, files.values())],
                       capture_output=True, text=True, timeout=50)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    kinds, error = got[str(files["good"])]
    assert error is None and kinds == ["_ForkedCheck", "_ForkedCheck", "Popen"]
    for key, said in (("module", "No module named 'nosuchmodule_xyz'"),
                      ("attr", "has no 'nothere'"), ("notcwd", "No module named 'here_only'")):
        kinds, error = got[str(files[key])]
        assert set(kinds) == {"_ForkedCheck"}, key
        assert error.startswith(f"{files[key]}: groups.b.target: ") and said in error, error
        assert "\n" not in error
