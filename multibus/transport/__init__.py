"""Crossing a process boundary: a bus joined to other processes' buses over ZeroMQ.

- ``wire``: the msgpack frame format, its limits and its validation.
- ``endpoints``: where the sockets are (:class:`Endpoints`; private ipc in the runtime dir).
- ``keys``: CURVE keys and the ZAP allow-list (tcp only with both).
- ``bridge``: :class:`Bridge`, the plugin (a façade) that joins a bus to other processes'.
  Its parts: ``iothread`` (the one thread that owns the sockets), ``hub`` and ``peer`` (the two
  roles' sessions), ``outbox`` (mirrored publishes out), ``dispatch`` (what came in, onto the
  local bus), ``applier`` (a peer following commands), ``stats`` (the counters).

This package knows nothing of spawning processes (that is ``multibus.supervisor``).
"""

from multibus.transport.bridge import Bridge, BridgeError
from multibus.transport.endpoints import Endpoints
from multibus.transport.keys import CurveConfig, CurveKeys
from multibus.transport.wire import MAX_MESSAGE, WireError

__all__ = [
    "MAX_MESSAGE",
    "Bridge",
    "BridgeError",
    "CurveConfig",
    "CurveKeys",
    "Endpoints",
    "WireError",
]
