"""The name grammar, written once (multibus.names)."""

from __future__ import annotations

import pytest

from multibus.names import WorkerName, check_name, valid_group, valid_name


@pytest.mark.parametrize("name", ["multibus", "a", "job_1", "web-2", "x.y", "0", "a" * 64])
def test_valid_names(name):
    assert valid_name(name)
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "-flag", "a/b", "a b", "é", "a" * 65, None, 3])
def test_invalid_names_are_refused_with_the_rule(name):
    assert not valid_name(name)
    with pytest.raises(ValueError, match=r"1-64 characters from \[A-Za-z0-9_.-\]"):
        check_name(name, "fleet name")


def test_groups_have_no_dot():
    assert valid_group("job-1_a")
    assert not valid_group("job.1")
    assert not valid_group("")


def test_worker_names_parse_and_print_back():
    assert WorkerName.parse("job.3") == WorkerName("job", 3)
    assert str(WorkerName("job", 3)) == "job.3"
    for bad in ("job", "job.", ".3", "a.b.3", "job.x", "job.1234567890", None):
        assert WorkerName.parse(bad) is None


# -- the modules that take names apart use this grammar ------------------------------------


def test_worker_specs_take_group_names():
    from multibus.specs import SpecError, WorkerSpec

    spec = WorkerSpec("job", "m:f", count=2)
    assert spec.instance_names() == ["job.0", "job.1"]
    assert [WorkerName.parse(n) for n in spec.instance_names()] == [("job", 0), ("job", 1)]
    for bad in ("job.1", "job\n", "", "a" * 65):
        with pytest.raises(SpecError, match="worker spec name .* is invalid"):
            WorkerSpec(bad, "m:f")


def test_log_records_name_their_worker():
    import json

    from multibus.logview import SUPERVISOR, format_json, split_source

    assert split_source("job.12 | done | ok") == ("job.12", "done | ok")
    assert split_source("job.x | done") == (SUPERVISOR, "job.x | done")
    obj = json.loads(format_json((1, 0.0, 20, "web-1.12", "x")))
    assert (obj["group"], obj["index"]) == ("web-1", 12)
    obj = json.loads(format_json((1, 0.0, 20, "not a worker", "x")))
    assert (obj["group"], obj["index"]) == (None, None)


@pytest.mark.parametrize("cmd, group, ok", [
    ("scale", "job", True), ("scale", "job.1", False), ("scale", "a b", False),
    ("logs", "job", True), ("logs", "job.1", True), ("logs", "supervisor", True),
    ("logs", "h:job.1", True),  # a worker of host h, on a parent of hosts
    # "job.1.2" is well-formed: it could name a host; unknown names fail when looked up
    ("logs", "job.1.2", True), ("logs", "a b", False), ("logs", "h:job.1.2", False),
    ("logs", ":job", False),
])
def test_control_requests_take_group_and_worker_names(cmd, group, ok):
    import msgpack

    from multibus.control import decode_request

    extra = {"count": 1} if cmd == "scale" else {"since": 0, "limit": 1, "wait": 0}
    frame = msgpack.packb({"v": 1, "id": 1, "cmd": cmd, "group": group, **extra})
    if ok:
        assert decode_request(frame)["group"] == group
    else:
        with pytest.raises(ValueError, match="group"):
            decode_request(frame)


def test_wire_uses_the_name_grammar():
    from multibus import names
    from multibus.transport import wire

    assert wire.valid_name is names.valid_name and wire.MAX_NAME == names.NAME_MAX
