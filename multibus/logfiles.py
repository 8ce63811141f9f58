"""Log files of a fleet: every record in the supervisor's file, each group's in its own.

:class:`LogFiles` is a 'log' listener beside the terminal's :class:`~multibus.logprinter.
LogPrinter` and works like it (its queue, its thread, its drop count; the terminal keeps its
own, so a stalled terminal costs the files nothing and the other way round): the listener
only queues, one daemon thread (``multibus-logfile``) writes, in arrival order, so a slow
disk never blocks a bus and each worker's lines keep their order. A queue past
``max_queue`` drops records, counted, and says so in every file
(``N log lines dropped (output too slow)``).

Routing: the fleet's file (``[supervisor] log_file``) takes every record; a group's file
(``[groups.NAME] log_file``) the records whose source is one of its workers (their bus logs
and output lines). Two keys naming the same path share one file.

Lines: text as on the terminal, with the date (``2025-11-23 09:41:02.123  job.0 | done``,
never coloured), or JSON lines with the terminal's keys plus the ``pid`` of the process that
logged (the worker's; the supervisor's for its own records).

Rotation is the stdlib's :class:`logging.handlers.RotatingFileHandler`: before a line would
take a file past ``max_bytes``, ``NAME`` becomes ``NAME.1`` (``.1`` becomes ``.2``..., at
most ``backups`` kept). :meth:`LogFiles.reopen` (SIGUSR1 in ``multibus run``) reopens every
file by its path, as ``WatchedFileHandler`` would: after logrotate moved a file, the lines
written before the signal are in the moved file and those after in a new one; none is lost.
"""

from __future__ import annotations

import io
import logging.handlers
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from multibus.logprinter import MAX_WIDTH, Lines, LogPrinter, fleet_sources
from multibus.logview import SUPERVISOR, format_json_lines, format_lines

__all__ = ["LogFile", "LogFileError", "LogFiles", "RotatingFile"]

_REOPEN = object()  # queued by reopen(): files are reopened in order with the records
_NOWHERE = io.StringIO()  # LogPrinter's stream: LogFiles writes to its files only


@dataclass(frozen=True)
class LogFile:
    """One log file as configured: ``path`` (absolute), rotated once a line would take it
    past ``max_bytes`` (0: never), keeping ``backups`` rotated files; ``key`` says where it
    was set (``supervisor.log_file``), for messages."""

    path: str
    max_bytes: int = 0
    backups: int = 5
    key: str = "log_file"


class LogFileError(OSError):
    """A log file cannot be opened; the message is one line naming it and the fix."""


class RotatingFile:
    """One log file, appended to by one thread: rotated at ``max_bytes`` (0: never) keeping
    ``backups`` files, by the stdlib's RotatingFileHandler; reopened on request. Opening it
    raises OSError at once (an unwritable path)."""

    def __init__(self, path: str, max_bytes: int = 0, backups: int = 5) -> None:
        self.handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8",
            errors="backslashreplace")
        self.path = self.handler.baseFilename
        self.max_bytes = max_bytes
        self.size = self._tell()
        self.width = 0  # the text source column, as the terminal's
        self.error: str | None = None  # the last write error (None once writing works)

    def _tell(self) -> int:
        stream = self.handler.stream
        return 0 if stream is None else stream.seek(0, io.SEEK_END)

    def write(self, line: str) -> str | None:
        """Append ``line`` (buffered: :meth:`flush` writes it out); the error text if it
        failed and had not failed since the last successful flush. Several lines (a chunk
        of output) are written at once, or one by one where the file rotates among them."""
        data = line + "\n"
        size = len(data) if data.isascii() else len(data.encode("utf-8", "backslashreplace"))
        if self.max_bytes and self.size + size > self.max_bytes and "\n" in line:
            errors = [self.write(one) for one in line.split("\n")]
            return next((e for e in errors if e is not None), None)
        try:
            if self.handler.stream is None:  # a failed rollover or reopen: try again
                self.handler.stream = self.handler._open()
                self.size = self._tell()
            if self.max_bytes and self.size and self.size + size > self.max_bytes:
                self.handler.stream.flush()
                self.handler.doRollover()
                self.size = self._tell()
            self.handler.stream.write(data)
            self.size += size
        except (OSError, ValueError) as e:
            return self._failed(e)
        return None

    def _failed(self, e: Exception) -> str | None:
        said = self.error is None
        self.error = f"cannot write log file {self.path}: {getattr(e, 'strerror', None) or e}"
        return self.error if said else None

    def flush(self) -> str | None:
        try:
            if self.handler.stream is not None:
                self.handler.stream.flush()
        except (OSError, ValueError) as e:
            return self._failed(e)
        self.error = None  # written out: a later failure is news again
        return None

    def reopen(self) -> str | None:
        """Close the file and open its path again (logrotate moved or removed it)."""
        self.flush()
        stream, self.handler.stream = self.handler.stream, None
        if stream is not None:
            try:
                stream.close()
            except (OSError, ValueError):
                pass  # its error was said by flush()
        try:
            self.handler.stream = self.handler._open()
            self.size = self._tell()
        except OSError as e:
            return self._failed(e)
        return None

    def close(self) -> None:
        try:
            self.handler.close()
        except (OSError, ValueError):
            pass  # a failing file was said already


class LogFiles(LogPrinter):
    """The 'log' listener that writes the fleet's log files (see the module docstring).

    ``fleet``: the file that takes every record, or None; ``groups``: group name -> its
    file (a :class:`LogFile` each); ``counts``: group ->
    worker count (the text source column's width, as :func:`fleet_sources`). ``pid_of
    (source)``: the pid of a worker's process (set once the supervisor has a fleet).
    ``on_error(text)``: told once when writing a file starts failing (never through the
    bus: that would log into the files again). Raises :class:`LogFileError` when a file
    cannot be opened.
    """

    def __init__(self, level: int, fmt: str, fleet: LogFile | None,
                 groups: Mapping[str, LogFile], *,
                 counts: Mapping[str, int] | None = None, max_queue: int = 10000,
                 on_error: Callable[[str], Any] | None = None) -> None:
        super().__init__(level, fmt, _NOWHERE, max_queue)
        self.colour = False
        self.pid_of: Callable[[str], int | None] = lambda source: None
        self.on_error = on_error
        self.files: list[RotatingFile] = []
        by_path: dict[str, RotatingFile] = {}

        def opened(spec: LogFile) -> RotatingFile:
            real = os.path.abspath(spec.path)
            if real not in by_path:
                try:
                    by_path[real] = RotatingFile(real, spec.max_bytes, spec.backups)
                except OSError as e:
                    self.close_files()
                    raise LogFileError(
                        f"{spec.key}: cannot open log file {real}: {e.strerror or e} (check "
                        "that its directory exists and is writable)") from None
                self.files.append(by_path[real])
            return by_path[real]

        self.fleet = None if fleet is None else opened(fleet)
        self.groups = {g: opened(spec) for g, spec in groups.items()}
        counts = counts or {}
        if self.fleet is not None:
            self.fleet.width = self._width(fleet_sources(counts))
        for g, f in self.groups.items():
            width = self._width(fleet_sources({g: counts.get(g, 1)})[1:])
            f.width = max(f.width, width)

    @staticmethod
    def _width(sources: Iterable[str]) -> int:
        return min(max((len(s) for s in sources), default=0), MAX_WIDTH)

    def item(self, lines: Lines) -> tuple[Lines, int | None]:
        """Lines and their process: looked up when they are logged, not when written."""
        source = lines[2]
        return lines, (os.getpid() if source == SUPERVISOR else self.pid_of(source))

    def reopen(self) -> None:
        """Reopen every file (by its path) once the records queued before are written."""
        self.put(_REOPEN, always=True)

    def emit(self, item: Any, flush: bool = True) -> None:
        if item is _REOPEN:
            for f in self.files:
                self._said(f.reopen())
            return
        rec, pid = item
        source = rec[2]
        targets = [self.fleet] if self.fleet is not None else []
        if source != SUPERVISOR:
            group = self.groups.get(source.partition(".")[0])
            if group is not None and group is not self.fleet:
                targets.append(group)
        self._write(targets, rec, pid)
        if flush:
            self._flush()

    def notice(self, text: str) -> None:
        """Lines were dropped: every file says so (any of them may have lost some)."""
        self._write(self.files, (time.time(), 30, SUPERVISOR, (text,)), os.getpid())

    def _write(self, targets: list[RotatingFile], lines: Lines, pid: int | None) -> None:
        t, level, source, texts = lines
        line = format_json_lines(t, level, source, texts, pid=pid) if self.fmt == "json" else None
        for f in targets:
            if line is None:  # text: each file has its own source column
                f.width = max(f.width, min(len(source), MAX_WIDTH))
                self._said(f.write(format_lines(t, level, source, texts, False, f.width,
                                                date=True)))
            else:
                self._said(f.write(line))

    def _flush(self) -> None:
        for f in self.files:
            self._said(f.flush())

    def _said(self, error: str | None) -> None:
        if error is not None and self.on_error is not None:
            try:
                self.on_error(error)
            except Exception:  # noqa: BLE001 - reporting must not stop the writer
                pass

    def close(self, timeout: float = 5.0) -> None:
        """Write out what is queued (bounded by ``timeout``), then close the files."""
        super().close(timeout)
        self.close_files()

    def close_files(self) -> None:
        for f in self.files:
            f.close()
