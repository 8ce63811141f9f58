"""CherryPy's own bus test suite, run unchanged against multibus.Bus.

The module ``cherrypy.test.test_bus`` reaches the bus only through its global ``wspbus``
(``wspbus.Bus()``, ``wspbus.ChannelFailures``); pointing that global at ``multibus`` makes
every one of its tests exercise our Bus. Its tests and fixtures are re-exported here so
pytest collects them.
"""

import cherrypy.test.test_bus as cherrypy_test_bus
import pytest

import multibus

cherrypy_test_bus.wspbus = multibus

from cherrypy.test.test_bus import *  # noqa: E402, F403


def test_suite_runs_against_multibus(bus):
    """The swapped global really gives CherryPy's tests our Bus."""
    assert type(bus) is multibus.Bus
    assert cherrypy_test_bus.wspbus.ChannelFailures is multibus.ChannelFailures


@pytest.fixture(autouse=True)
def _exit_bus_left_running(bus):
    """test_wait_publishes_periodically leaves its bus STARTED; exit it so the run ends clean."""
    yield
    if bus.state in (multibus.states.STARTING, multibus.states.STARTED):
        bus.exit()
