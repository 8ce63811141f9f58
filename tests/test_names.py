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
