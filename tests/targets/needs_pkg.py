"""A worker module that needs a third-party package which is not installed."""

import no_such_dependency_xyz  # noqa: F401


def worker(bus) -> None:
    """Never reached: the import above fails."""
