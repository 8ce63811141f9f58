"""In-process plugins for a multibus.Bus (or any WSPBus, including cherrypy.engine).

Same class names and constructor arguments as ``cherrypy.process.plugins``, with CherryPy's
weak spots fixed; each lives in its own small module.
"""

from .autoreload import Autoreloader
from .base import SimplePlugin
from .daemon import Daemonizer
from .logbridge import LogBridge
from .pidfile import PIDFile, PIDFileError, read_pidfile
from .privileges import DropPrivileges
from .signals import SignalHandler
from .tasks import BackgroundTask, Monitor, PerpetualTimer, ThreadManager

__all__ = [
    "Autoreloader",
    "BackgroundTask",
    "Daemonizer",
    "DropPrivileges",
    "LogBridge",
    "Monitor",
    "PIDFile",
    "PIDFileError",
    "PerpetualTimer",
    "SignalHandler",
    "SimplePlugin",
    "ThreadManager",
    "read_pidfile",
]
