"""The bridge's wire format: msgpack frames with a version, validated field by field.

Every frame is one msgpack map ``{"v": VERSION, "k": KIND, ...fields}``. Each kind has an exact
set of keys with fixed types and bounds (``SCHEMAS``); :func:`decode` rejects anything else
with :class:`WireError` (its ``reason`` names the class of fault, for counting). No pickle, no
msgpack ext types (timestamps included): a value is None, bool, int, float, str, bytes, list
or dict with str keys.

Mirrored publishes travel in batches: a ``pub`` frame carries ``origin`` (sender name),
``epoch`` (random per sender instance), ``seq`` (sequence number of its first message; the
messages are numbered on in order) and ``runs``: ``[[channel, has_kwargs, [entry, ...]], ...]``
where consecutive publishes on one channel share a run (so the channel name is decoded once
per run, not per message) and an entry is the ``args`` list, or ``[args, kwargs]`` when the run
has kwargs. Each entry is packed on its own by :func:`pack_entry` in the publisher's thread, so
a bad argument is refused there, synchronously, and later mutations of the caller's objects
cannot leak into the copy on the wire; :func:`encode_pub` then only concatenates bytes.
``log`` frames carry ``msgs``: ``[msg, level]`` records, packed the same way.

Sizes: a frame is at most ``max_message`` bytes (every receiving socket sets ZMQ MAXMSGSIZE to
the same value, so a bigger frame never reaches Python); one message may use at most
``max_message - FRAME_OVERHEAD`` bytes; log messages are truncated to fit instead.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from multibus.bus import STATE_NAMES
from multibus.names import NAME_MAX as MAX_NAME
from multibus.names import valid_name

__all__ = [
    "FRAME_OVERHEAD",
    "MAX_ERROR",
    "MAX_MESSAGE",
    "MAX_NAME",
    "SCHEMAS",
    "VERSION",
    "WireError",
    "decode",
    "encode",
    "encode_logs",
    "encode_pub",
    "origin_prefix",
    "entry_limit",
    "pack_entry",
    "pack_log",
    "valid_name",
]

VERSION = 1
MAX_MESSAGE = 1 << 20  # default frame limit (bytes); MAXMSGSIZE on every receiving socket
MIN_MESSAGE = 4096
FRAME_OVERHEAD = 512  # header bytes reserved in a batch frame (keys, origin, epoch, seq)
MAX_CHANNEL = 128
MAX_BATCH = 65535  # messages per frame
DESIRED_STATES = frozenset(("STARTED", "STOPPED", "EXITING"))
MAX_ERROR = 4096  # characters of a 'failed' frame's error text
_U64 = (1 << 64) - 1


class WireError(ValueError):
    """A frame that is not a valid envelope. ``reason`` is one of: ``decode`` (not msgpack,
    truncated, too deep, ext types, bad UTF-8), ``version``, ``kind``, ``schema`` (keys, types,
    bounds), ``size``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"invalid frame ({reason}): {detail}")
        self.reason = reason


# -- field validators: value -> bool ----------------------------------------------------------


def _u64(v: object) -> bool:
    return type(v) is int and 0 <= v <= _U64


def _level(v: object) -> bool:
    return type(v) is int and 0 <= v <= 1000


def _bool(v: object) -> bool:
    return type(v) is bool


def _state(v: object) -> bool:
    return type(v) is str and v in STATE_NAMES


def _desired(v: object) -> bool:
    return v is None or (type(v) is str and v in DESIRED_STATES)


def _error(v: object) -> bool:
    return type(v) is str and len(v) <= MAX_ERROR


def _secret(v: object) -> bool:
    """A peer's proof of who it is: the secret its spawner gave it (hex, at most 64)."""
    return type(v) is str and 0 < len(v) <= 64


def _pid(v: object) -> bool:
    return type(v) is int and 0 < v < (1 << 32)


def _max_message(v: object) -> bool:
    return type(v) is int and MIN_MESSAGE <= v <= (1 << 31)


def _runs(v: object) -> bool:
    """``[[channel: str, has_kwargs: bool, [entry, ...]], ...]``; an entry is ``args: list`` or,
    with kwargs, ``[args: list, kwargs: dict[str, ...]]`` (the values are plain msgpack types
    already: ext types are refused by the decoder). Hot path: unpacking into names also rejects
    non-sequences and wrong lengths; a str, bytes or map of that length fails the type checks
    that follow."""
    if type(v) is not list or not v:
        return False
    total = 0
    try:
        for ch, haskw, entries in v:
            if type(ch) is not str or type(entries) is not list or not entries:
                return False
            total += len(entries)
            if haskw is False:
                for args in entries:
                    if type(args) is not list:
                        return False
            elif haskw is True:
                for args, kw in entries:
                    if type(args) is not list or type(kw) is not dict:
                        return False
                    for k in kw:
                        if type(k) is not str:
                            return False
            else:
                return False
    except (ValueError, TypeError):
        return False
    return total <= MAX_BATCH


def _logs(v: object) -> bool:
    """``[[msg: str, level: int], ...]``."""
    if type(v) is not list or not v or len(v) > MAX_BATCH:
        return False
    for e in v:
        if type(e) is not list or len(e) != 2 or type(e[0]) is not str or not _level(e[1]):
            return False
    return True


_Validator = Callable[[object], bool]

#: kind -> {field: validator}; every frame also has "v" (== VERSION) and "k" (== kind).
SCHEMAS: dict[str, dict[str, _Validator]] = {
    # control, peer -> hub; down: the peer mirrors channels, so it reads the down socket
    "hello": {"name": valid_name, "pid": _pid, "epoch": _u64, "state": _state, "down": _bool},
    "ready": {"token": _u64},
    "ack": {"epoch": _u64, "seq": _u64},
    "state": {"state": _state},
    # a command failed in the peer: the desired state it could not reach (None: a graceful)
    # and "ExcType: message". An older hub drops it (counted as 'kind'): hence no new version.
    "failed": {"state": _desired, "error": _error},
    # both ways: the hub epoch as the sender knows it (0: none yet), its own bus state, and
    # whether this answers an hb (a side without heartbeats answers each hb that is not one)
    "hb": {"epoch": _u64, "state": _state, "reply": _bool},
    "bye": {},
    # control, hub -> peer
    "welcome": {"name": valid_name, "epoch": _u64, "graceful": _u64, "max_message": _max_message},
    "cmd": {"epoch": _u64, "seq": _u64, "state": _desired, "graceful": _u64},
    "who": {},  # "I do not know you (any more): say hello"
    # down (hub ROUTER -> peer DEALER)
    "sync": {"target": valid_name, "token": _u64},
    # up and down: mirrored publishes; up only: log records
    "pub": {"origin": valid_name, "epoch": _u64, "seq": _u64, "runs": _runs},
    "log": {"origin": valid_name, "msgs": _logs},
}
#: kind -> {field: validator} of the fields a frame may leave out (older peers do).
OPTIONAL: dict[str, dict[str, _Validator]] = {
    # the secret a supervisor gave the worker it spawned (issue 14): a hub that expects one
    # for this name refuses a hello without it
    "hello": {"secret": _secret},
}
_KEYS = {kind: frozenset(schema) | {"v", "k"} for kind, schema in SCHEMAS.items()}
_ITEMS = {kind: tuple(schema.items()) for kind, schema in SCHEMAS.items()}
_OPTIONAL = {kind: OPTIONAL.get(kind, {}) for kind in SCHEMAS}


def _refuse_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def decode(frame: bytes, max_message: int = MAX_MESSAGE) -> tuple[str, dict[str, Any]]:
    """Decode and validate one frame; return ``(kind, fields)`` or raise :class:`WireError`.

    Bounded work: the frame is at most ``max_message`` bytes, nesting deeper than msgpack's
    stack (1024) fails, ext types (timestamps included) are refused, and no declared length
    may exceed the frame's size.
    """
    n = len(frame)
    if n > max_message:
        raise WireError("size", f"{n} bytes > limit {max_message}")
    try:
        msg = msgpack.unpackb(
            frame,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=0,
            ext_hook=_refuse_ext,
        )
    except Exception as exc:  # noqa: BLE001 - any decode fault is a WireError
        raise WireError("decode", f"{type(exc).__name__}: {exc}"[:200]) from None
    if type(msg) is not dict:
        raise WireError("schema", f"top level is {type(msg).__name__}, not a map")
    if msg.get("v") != VERSION:
        raise WireError("version", f"version {msg.get('v')!r}, expected {VERSION}")
    kind = msg.get("k")
    items = _ITEMS.get(kind) if type(kind) is str else None
    if items is None:
        raise WireError("kind", f"unknown kind {kind!r}"[:200])
    if msg.keys() != _KEYS[kind] and not _optional_ok(kind, msg):
        raise WireError("schema", f"{kind}: keys {sorted(msg)!r}"[:200])
    for key, ok in items:
        if not ok(msg[key]):
            raise WireError("schema", f"{kind}: bad {key!r}")
    return kind, msg


def _optional_ok(kind: str, fields: dict[str, Any]) -> bool:
    """``fields`` has the kind's keys plus valid optional ones only."""
    optional = _OPTIONAL[kind]
    extra = fields.keys() - _KEYS[kind]
    return (bool(optional) and _KEYS[kind] <= fields.keys() | {"v", "k"}
            and extra <= optional.keys()
            and all(optional[key](fields[key]) for key in extra))


def encode(kind: str, **fields: Any) -> bytes:
    """Encode one (small, control) frame, validating it against its schema: a bug on our side
    must fail here, not as a silent drop at the receiver."""
    items = _ITEMS.get(kind)
    if items is None:
        raise ValueError(f"unknown frame kind {kind!r}")
    if fields.keys() != SCHEMAS[kind].keys() and not _optional_ok(kind, fields):
        raise ValueError(f"{kind} frame needs fields {sorted(SCHEMAS[kind])}, got {sorted(fields)}")
    for key, ok in items:
        if not ok(fields[key]):
            raise ValueError(f"{kind} frame: invalid {key}={fields[key]!r}")
    return msgpack.packb({"v": VERSION, "k": kind, **fields})


# -- batches ------------------------------------------------------------------------------------


def entry_limit(max_message: int) -> int:
    """Largest packed message (bytes) that fits a frame of ``max_message`` bytes."""
    return max_message - FRAME_OVERHEAD


def pack_entry(
    packer: msgpack.Packer, channel: str, args: tuple, kwargs: dict, limit: int
) -> bytes:
    """Pack one mirrored publish; raise ``TypeError``/``ValueError`` with a clear message when
    an argument is not a msgpack type or the message is larger than ``limit`` bytes."""
    try:
        data = packer.pack((args, kwargs) if kwargs else args)
    except (TypeError, ValueError, OverflowError) as exc:
        packer.reset()
        raise TypeError(
            f"cannot mirror publish on {channel!r}: {exc}; mirrored arguments must be None, "
            "bool, int (64-bit), float, str, bytes, list or dict with str keys"
        ) from None
    if len(data) > limit:
        raise ValueError(
            f"cannot mirror publish on {channel!r}: message is {len(data)} bytes, over the "
            f"{limit}-byte limit; send less per publish or raise the bridge's max_message"
        )
    return data


def pack_log(packer: msgpack.Packer, msg: object, level: object, limit: int) -> bytes:
    """Pack one ``[msg, level]`` log record; a long message is truncated to fit ``limit``."""
    text = msg if type(msg) is str else str(msg)
    lvl = level if type(level) is int and 0 <= level <= 1000 else 20
    data = packer.pack([text, lvl])
    if len(data) <= limit:
        return data
    raw = text.encode("utf-8", "surrogatepass")
    keep = max(0, limit - 64)
    cut = raw[:keep].decode("utf-8", "ignore")
    text = f"{cut}... [truncated {len(raw) - len(cut.encode('utf-8'))} bytes]"
    return packer.pack([text, lvl])


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


_PUB_HEAD = msgpack.packb("v") + msgpack.packb(VERSION) + msgpack.packb("k")


def origin_prefix(kind: str, origin: str) -> bytes:
    """The first bytes of every ``pub``/``log`` frame from ``origin`` built by
    :func:`encode_pub`: lets a peer skip its own relayed frames without decoding them."""
    return _PUB_HEAD + msgpack.packb(kind) + msgpack.packb("origin") + msgpack.packb(origin)


def _header(kind: str, fields: dict[str, Any]) -> list[bytes]:
    parts = [bytes((0x80 | (len(fields) + 2),)), _PUB_HEAD, msgpack.packb(kind)]  # <= 15 keys
    for key, value in fields.items():
        parts.append(msgpack.packb(key))
        parts.append(msgpack.packb(value))
    return parts


def encode_pub(
    origin: str, epoch: int, seq: int, runs: Iterable[tuple[str, bool, list[bytes]]]
) -> bytes:
    """Assemble a ``pub`` frame from runs of entries already packed by :func:`pack_entry`
    (a msgpack array is its header followed by its items, so nothing is packed twice).
    ``origin`` comes first, see :func:`origin_prefix`."""
    runs = list(runs)
    parts = _header("pub", {"origin": origin, "epoch": epoch, "seq": seq, "runs": None})
    parts[-1] = _array_header(len(runs))  # replace the packed None placeholder
    for channel, haskw, entries in runs:
        parts.append(b"\x93")
        parts.append(msgpack.packb(channel))
        parts.append(b"\xc3" if haskw else b"\xc2")
        parts.append(_array_header(len(entries)))
        parts.extend(entries)
    return b"".join(parts)


def encode_logs(origin: str, records: list[bytes]) -> bytes:
    """Assemble a ``log`` frame from records packed by :func:`pack_log`."""
    parts = _header("log", {"origin": origin, "msgs": None})
    parts[-1] = _array_header(len(records))
    parts.extend(records)
    return b"".join(parts)
