"""Log records of a fleet as lines for people (text) or programs (JSON lines).

A record is ``(seq, time, level, source, message)``: ``source`` is the worker
(``group.index``) a line came from, or ``"supervisor"``. The supervisor's bus carries worker
output and worker bus logs as ``"job.0 | message"`` (see the Bridge and the Supervisor);
:func:`split_source` takes that prefix apart. Text lines look like::

    09:41:02.123  job.0 | job 3 done

with the source coloured (and warnings/errors marked) only when writing to a terminal.
JSON lines have the keys ``time`` (ISO 8601, local, with offset), ``level`` (name),
``source``, ``group``, ``index`` (int or null) and ``message``.
"""

from __future__ import annotations

import datetime
import itertools
import json
import json.encoder
import os
import re
from collections.abc import Sequence
from typing import IO, Any

from multibus.names import WORKER_PREFIX, WorkerName

__all__ = ["Record", "SUPERVISOR", "escape_controls", "format_json", "format_json_lines",
           "format_lines", "format_text", "level_name", "split_source", "use_colour"]

SUPERVISOR = "supervisor"
Record = tuple[int, float, int, str, str]

_LEVELS = {10: "DEBUG", 20: "INFO", 30: "WARNING", 40: "ERROR", 50: "CRITICAL"}
_PALETTE = (36, 32, 33, 35, 34, 96, 92, 93, 95, 94)  # per source, stable within a run
_RESET = "\x1b[0m"
# a str as json.dumps(ensure_ascii=False) writes it (the C encoder when there is one)
_encode_string = json.encoder.encode_basestring


_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """``text`` as one line without control characters: newlines, escape sequences (ANSI
    colours, cursor moves) and the like become their Python escapes (``\\n``, ``\\x1b``).
    For text another process sends (a worker's log records): it cannot fake other lines, or
    their source, on our output. Tabs stay."""
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


def split_source(msg: str) -> tuple[str, str]:
    """``"job.0 | text"`` -> ``("job.0", "text")``; anything else is the supervisor's."""
    m = WORKER_PREFIX.match(msg)
    if m:
        return msg[:m.end(2)], msg[m.end():]
    return SUPERVISOR, msg


def level_name(level: int) -> str:
    return _LEVELS.get(level, f"LEVEL{level}")


def use_colour(stream: IO[str]) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _colour_of(source: str) -> int:
    if source == SUPERVISOR:
        return 1  # bold
    return _PALETTE[sum(source.encode()) % len(_PALETTE)]


_SECONDS: dict[tuple[datetime.datetime, bool], str] = {}  # strftime of the latest seconds


def _stamp(t: float, date: bool) -> str:
    """``09:41:02.123`` (``2025-11-23 09:41:02.123`` with ``date``): strftime once per
    second, the writers' main cost when it was once per line."""
    dt = datetime.datetime.fromtimestamp(t)
    key = (dt.replace(microsecond=0), date)
    prefix = _SECONDS.get(key)
    if prefix is None:
        if len(_SECONDS) > 8:
            _SECONDS.clear()
        prefix = _SECONDS[key] = dt.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")
    return f"{prefix}.{dt.microsecond // 1000:03d}"


def format_text(rec: Record, colour: bool = False, width: int = 0, date: bool = False) -> str:
    """One or more lines (a multi-line message repeats the prefix on every line). ``date``:
    the stamp starts with the date (``2025-11-23 09:41:02.123``), for files."""
    _, t, level, source, msg = rec
    return format_lines(t, level, source, (msg,), colour, width, date)


# what str.splitlines() breaks on besides "\n" (the ASCII ones, then the others)
_BREAKS_ASCII = "\r\x0b\x0c\x1c\x1d\x1e"
_BREAKS_OTHER = "\x85\u2028\u2029"


def _split(texts: Sequence[str]) -> list[str]:
    """The lines of ``texts`` as :func:`format_text` shows each (``splitlines()``, an empty
    text one empty line), in one ``split`` when nothing but "\\n" breaks them (the common
    case: output lines) instead of one call per text."""
    if len(texts) == 1:
        return texts[0].splitlines() or [""]
    joined = "\n".join(texts)
    plain = not any(map(str.endswith, texts, _NEWLINE)) and not any(
        c in joined for c in (_BREAKS_ASCII if joined.isascii() else
                              _BREAKS_ASCII + _BREAKS_OTHER))
    if plain:
        return joined.split("\n")
    lines: list[str] = []
    for text in texts:
        lines += text.splitlines() or [""]
    return lines


_NEWLINE = itertools.repeat("\n")


def format_lines(t: float, level: int, source: str, texts: Sequence[str],
                 colour: bool = False, width: int = 0, date: bool = False) -> str:
    """The records ``(t, level, source, text)`` for each of ``texts`` as :func:`format_text`
    writes them one by one, joined by newlines: the prefix is made once (a worker's
    output comes in chunks of lines; formatting each line was the printer's main cost)."""
    stamp = _stamp(t, date)
    label = source.ljust(width)
    mark = f"{level_name(level)} " if level >= 30 else ""
    if colour:
        label = f"\x1b[{_colour_of(source)}m{label}{_RESET}"
        if level >= 40:
            mark = f"\x1b[31m{mark}{_RESET}"
        elif level >= 30:
            mark = f"\x1b[33m{mark}{_RESET}"
    prefix = f"{stamp}  {label} | {mark}"
    return prefix + ("\n" + prefix).join(_split(texts))


def format_json(rec: Record, **extra: Any) -> str:
    """One JSON object on one line (stable keys, see the module docstring); ``extra`` keys
    (a log file's ``pid``) come before ``message``."""
    _, t, level, source, msg = rec
    return format_json_lines(t, level, source, (msg,), **extra)


def format_json_lines(t: float, level: int, source: str, texts: Sequence[str],
                      **extra: Any) -> str:
    """:func:`format_json` of ``(t, level, source, text)`` for each of ``texts``, joined by
    newlines; everything but the message is encoded once."""
    worker = WorkerName.parse(source)
    obj: dict[str, Any] = {
        "time": datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds"),
        "level": level_name(level),
        "source": source,
        "group": worker.group if worker else None,
        "index": worker.index if worker else None,
        **extra,
    }
    if len(texts) == 1:  # one record (the bus's own lines): one dumps
        obj["message"] = texts[0]
        return json.dumps(obj, ensure_ascii=False)
    head = json.dumps(obj, ensure_ascii=False)[:-1] + ', "message": '
    return "\n".join([f"{head}{_encode_string(text)}}}" for text in texts])
