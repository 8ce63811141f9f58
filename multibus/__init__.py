"""multibus: CherryPy's Web Site Process Bus, faster, and extended across processes.

``multibus.Bus`` is a drop-in for ``cherrypy.process.wspbus.Bus``; plugins live in
``multibus.plugins``, the ZeroMQ bridge in ``multibus.transport``.
"""

from multibus.bus import Bus, ChannelFailures, State, states
from multibus.sockets import inherited_sockets

__all__ = ["Bus", "ChannelFailures", "State", "states", "inherited_sockets"]
__version__ = "0.1.0"
