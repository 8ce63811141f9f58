"""SimplePlugin: subscribe every method named after a bus channel.

Drop-in for ``cherrypy.process.plugins.SimplePlugin``. Two differences, both on purpose:

* Late channels. CherryPy only subscribes methods whose name is a channel that exists in
  ``bus.listeners`` at ``subscribe()`` time, so a method for a channel created later (for example
  ``start_thread``, created by ThreadManager) is silently never called. We keep that default for
  compatibility and add an explicit ``channels`` class attribute: when it is set, exactly those
  channels are subscribed (created on the bus if missing), whether or not they exist yet. We do not
  watch the bus for new channels: the WSPBus protocol has no "channel created" event, and
  subscribing whatever methods happen to match a later name would be surprising.
* ``unsubscribe()`` removes exactly what ``subscribe()`` added, even if channels changed since.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, ClassVar


class SimplePlugin:
    """Plugin base class which subscribes its methods named after bus channels."""

    channels: ClassVar[Iterable[str] | None] = None
    """Channels to subscribe explicitly; None means "those in bus.listeners at subscribe()"."""

    bus: Any = None
    """The bus (a multibus.Bus or a cherrypy.engine)."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self._subscribed: list[tuple[str, Callable[..., Any]]] = []
        self._sub_lock = threading.Lock()

    def _wanted_channels(self) -> list[str]:
        if self.channels is not None:
            return list(self.channels)
        return list(self.bus.listeners)  # copy: another thread may add channels meanwhile

    def subscribe(self) -> SimplePlugin:
        """Subscribe each method named after a channel (see the class docstring). Returns self."""
        with self._sub_lock:
            for channel in self._wanted_channels():
                method = getattr(self, channel, None)
                if method is None or not callable(method):
                    continue
                if (channel, method) in self._subscribed:
                    continue
                self.bus.subscribe(channel, method)
                self._subscribed.append((channel, method))
        return self

    def unsubscribe(self) -> None:
        """Unsubscribe every method that subscribe() added."""
        with self._sub_lock:
            subscribed, self._subscribed = self._subscribed, []
        for channel, method in subscribed:
            self.bus.unsubscribe(channel, method)
