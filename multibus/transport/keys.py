"""CURVE keys for tcp endpoints, and the ZAP allow-list that makes them mean something.

A tcp endpoint is reachable from the network, so a bridge refuses one without CURVE keys
*and* an allow-list of client keys enforced by a ZAP authenticator (CURVE without a ZAP
handler accepts any client key): :func:`require_security`. Keys are made with ``python -m
multibus.transport.endpoints keygen DIR`` (:func:`main`, :func:`make_keys`), kept 0600, and
travel to children over an inherited pipe or a 0600 file, never in argv (world-readable in
``/proc``). ``zmq.auth``, ``logging``, ``tempfile`` and ``argparse`` are imported where used,
so a worker that does not use CURVE pays nothing for them.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from multibus.names import check_name
from multibus.rundir import RunDirError, runtime_dir
from multibus.transport.endpoints import EndpointError, Endpoints, _Value
from multibus.transport.stats import RateLimit

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

__all__ = [
    "KEYGEN_HINT",
    "AllowList",
    "CurveConfig",
    "CurveKeys",
    "TransportSecurityError",
    "apply_client",
    "apply_server",
    "dump_curve",
    "key_pipe",
    "load_curve",
    "load_keys",
    "load_public_keys",
    "main",
    "make_keys",
    "read_key_fd",
    "read_key_file",
    "require_security",
    "start_authenticator",
    "write_key_file",
]

KEYGEN_HINT = "python -m multibus.transport.endpoints keygen DIR"
_Z85_KEY_LEN = 40


class TransportSecurityError(EndpointError):
    """A network endpoint without the CURVE keys and allow-list it needs."""


# --------------------------------------------------------------------------- CURVE keys


def _z85_key(value: bytes | str, what: str) -> bytes:
    key = value.encode("ascii") if isinstance(value, str) else bytes(value)
    if len(key) != _Z85_KEY_LEN:
        raise TransportSecurityError(
            f"invalid CURVE {what}: expected a {_Z85_KEY_LEN}-character z85 key, got "
            f"{len(key)} bytes; make keys with `{KEYGEN_HINT}`"
        )
    return key


class CurveKeys(_Value):
    """A CURVE keypair in z85 (40 ASCII bytes each); ``secret`` is None for a public key only."""

    __slots__ = ("public", "secret")
    public: bytes
    secret: bytes | None

    def __init__(self, public: bytes | str, secret: bytes | str | None = None) -> None:
        self._init(
            public=_z85_key(public, "public key"),
            secret=None if secret is None else _z85_key(secret, "secret key"),
        )

    @classmethod
    def generate(cls) -> CurveKeys:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    def __repr__(self) -> str:  # never print a secret into a log
        hidden = "None" if self.secret is None else "'<hidden>'"
        return f"CurveKeys(public={self.public.decode()!r}, secret={hidden})"


#: A hub's allowed client keys: a list, or a mapping key -> the peer name it may use (None: any).
AllowList = Iterable[bytes | str | CurveKeys] | Mapping[bytes | str | CurveKeys, str | None]


class CurveConfig(_Value):
    """What a bridge needs for CURVE: its own ``keys``; on a hub the ``allowed`` client public
    keys (an allow-list, enforced by ``start_authenticator``); on a peer the hub's public key
    ``server_public``.

    A hub's allow-list may bind a key to a peer name: ``allowed`` given as a mapping {public
    key: name or None}. A peer whose key is bound may use only that name (the hub refuses,
    and counts as ``name_refused``, every frame it sends under another one), so one allowed
    peer cannot pass itself off as another; a key bound to None (or given in a plain list)
    may use any name. ``names`` holds the bound (key, name) pairs, sorted."""

    __slots__ = ("keys", "server_public", "allowed", "names")
    keys: CurveKeys
    server_public: bytes | None
    allowed: frozenset[bytes]
    names: tuple[tuple[bytes, str], ...]

    def __init__(
        self,
        keys: CurveKeys,
        server_public: bytes | str | None = None,
        allowed: AllowList = frozenset(),
    ) -> None:
        allowed_keys, names = _allow_list(allowed, require=False)
        self._init(
            keys=keys,
            server_public=(None if server_public is None
                           else _z85_key(server_public, "server public key")),
            allowed=allowed_keys,
            names=names,
        )

    @classmethod
    def hub(cls, keys: CurveKeys, allowed: AllowList) -> CurveConfig:
        """A hub's config: ``allowed`` a list of client keys, or a mapping key -> the peer
        name that key may use (None: any)."""
        cfg = cls(keys, allowed=allowed)
        if not cfg.allowed:
            _allow_list((), require=True)  # raises, saying why
        return cfg

    @classmethod
    def peer(cls, keys: CurveKeys, server_public: bytes | str | CurveKeys) -> CurveConfig:
        if isinstance(server_public, CurveKeys):
            server_public = server_public.public
        return cls(keys, server_public=_z85_key(server_public, "server public key"))

    def key_names(self) -> dict[bytes, str | None]:
        """Every allowed key -> the one peer name it may use (None: any name)."""
        bound = dict(self.names)
        return {key: bound.get(key) for key in self.allowed}

    def __repr__(self) -> str:
        server = self.server_public.decode() if self.server_public else None
        return (
            f"CurveConfig(keys={self.keys!r}, server_public={server!r}, "
            f"allowed={len(self.allowed)} keys, {len(self.names)} bound to a name)"
        )


def _allow_list(keys: AllowList, require: bool
                ) -> tuple[frozenset[bytes], tuple[tuple[bytes, str], ...]]:
    """The allowed keys and the (key, name) pairs of those bound to a name."""
    if isinstance(keys, (bytes, str, CurveKeys)):
        keys = [keys]
    names: dict[bytes, str] = {}
    out: set[bytes] = set()
    for k, name in (keys.items() if isinstance(keys, Mapping) else ((k, None) for k in keys)):
        key = _z85_key(k.public if isinstance(k, CurveKeys) else k, "allowed public key")
        out.add(key)
        if name is not None:
            try:
                check_name(name, "peer name for an allowed key")
            except ValueError as exc:
                raise TransportSecurityError(str(exc)) from None
            names[key] = name
    if require and not out:
        raise TransportSecurityError(
            "empty CURVE allow-list: a hub must name the client public keys it accepts "
            f"(make a keypair per client with `{KEYGEN_HINT}`)"
        )
    return frozenset(out), tuple(sorted(names.items()))


def make_keys(
    directory: str | os.PathLike[str], name: str = "multibus", force: bool = False
) -> tuple[Path, Path]:
    """Write a new keypair ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (0600), the
    zmq.auth certificate format. The directory is created 0700 if missing. Files are written
    in a private temporary dir and renamed into place, so the secret is never readable by
    others, not even for an instant. Refuses to overwrite an existing key unless ``force``."""
    try:
        check_name(name, "key name")
    except ValueError as exc:
        raise EndpointError(str(exc)) from None
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public = directory / f"{name}.key"
    secret = directory / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise EndpointError(
            f"key {secret} already exists; pass --force to replace it (peers using the old "
            "public key will be refused)"
        )
    import tempfile

    import zmq.auth

    with tempfile.TemporaryDirectory(dir=directory, prefix=".keygen-") as tmp:  # mode 0700
        tmp_public, tmp_secret = zmq.auth.create_certificates(tmp, name)
        os.chmod(tmp_secret, 0o600)
        os.chmod(tmp_public, 0o644)
        os.replace(tmp_secret, secret)
        os.replace(tmp_public, public)
    return public, secret


def _check_secret_file(path: Path) -> None:
    st = os.stat(path)
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise TransportSecurityError(
            f"secret key file {path} is readable by others (mode {oct(stat.S_IMODE(st.st_mode))},"
            f" uid {st.st_uid}); run `chmod 600 {path}` as its owner or make new keys"
        )


def load_keys(path: str | os.PathLike[str], name: str = "multibus") -> CurveKeys:
    """Load a keypair from ``NAME.key_secret`` (a directory means ``DIR/NAME.key_secret``) or
    a public key only from a ``.key`` file. A secret file open to others is refused."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{name}.key_secret"
    if not path.exists():
        raise TransportSecurityError(f"no CURVE key at {path}; make one with `{KEYGEN_HINT}`")
    if path.suffix == ".key_secret":
        _check_secret_file(path)
    try:
        import zmq.auth

        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise TransportSecurityError(f"cannot read CURVE key {path}: {exc}") from None
    return CurveKeys(public, secret)


def load_public_keys(directory: str | os.PathLike[str]) -> frozenset[bytes]:
    """All public keys (``*.key``) in a directory: a hub's allow-list."""
    return frozenset(
        load_keys(p).public for p in sorted(Path(directory).glob("*.key")) if p.is_file()
    )


# --------------------------------------------------------------------------- passing keys


def dump_curve(curve: CurveConfig) -> bytes:
    """Serialise a CurveConfig (z85 text in JSON) for ``key_pipe``/``write_key_file``."""
    doc = {
        "public": curve.keys.public.decode(),
        "secret": curve.keys.secret.decode() if curve.keys.secret else None,
        "server_public": curve.server_public.decode() if curve.server_public else None,
        "allowed": sorted(k.decode() for k in curve.allowed),
        "names": {k.decode(): n for k, n in curve.names},
    }
    return json.dumps(doc).encode()


def load_curve(data: bytes) -> CurveConfig:
    try:
        doc = json.loads(data)
        names = doc.get("names", {})
        return CurveConfig(
            CurveKeys(doc["public"], doc["secret"]),
            server_public=doc["server_public"],
            allowed={k: names.get(k) for k in doc["allowed"]},
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TransportSecurityError(f"malformed CURVE key data: {exc}") from None


def key_pipe(curve: CurveConfig) -> int:
    """A pipe holding ``curve``; returns the read end (non-inheritable: hand it to the child
    with ``Popen(pass_fds=[fd])`` and tell it the fd number, then close it in the parent)."""
    data = dump_curve(curve)
    if len(data) > 60_000:  # must fit the pipe buffer, since nobody reads while we write
        raise TransportSecurityError(
            f"CURVE config is {len(data)} bytes, too big for a pipe; use write_key_file"
        )
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, data)
    finally:
        os.close(write_fd)
    return read_fd


def read_key_fd(fd: int) -> CurveConfig:
    """Read a CurveConfig from an inherited fd (see ``key_pipe``) and close it."""
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return load_curve(b"".join(chunks))


def write_key_file(curve: CurveConfig, path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``curve`` to a new 0600 file (default: a fresh one in ``runtime_dir()``) and
    return its path, for a child that cannot inherit an fd. The reader should remove it."""
    data = dump_curve(curve)
    if path is None:
        import tempfile

        fd, name = tempfile.mkstemp(prefix="keys-", suffix=".json", dir=runtime_dir())
        path = Path(name)
    else:
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def read_key_file(path: str | os.PathLike[str], remove: bool = True) -> CurveConfig:
    """Read a file written by ``write_key_file`` (refused if others can read it)."""
    path = Path(path)
    _check_secret_file(path)
    try:
        return load_curve(path.read_bytes())
    finally:
        if remove:
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- sockets


def require_security(
    endpoints: Endpoints | str, curve: CurveConfig | None, role: str = "hub"
) -> None:
    """Refuse network endpoints without CURVE: a hub needs its keypair and an allow-list, a peer
    its keypair and the hub's public key. ipc/inproc pass (their protection is the 0700 dir)."""
    endpoints = Endpoints.parse(endpoints)
    if role not in ("hub", "peer"):
        raise ValueError(f"role must be 'hub' or 'peer', not {role!r}")
    if not endpoints.is_network:
        return
    if curve is None or curve.keys.secret is None:
        raise TransportSecurityError(
            f"refusing tcp endpoints {endpoints} without CURVE keys: make a keypair with "
            f"`{KEYGEN_HINT}` and pass curve=CurveConfig.{role}(...), or use the default "
            "private ipc endpoints"
        )
    if role == "hub" and not curve.allowed:
        raise TransportSecurityError(
            f"refusing tcp endpoints {endpoints}: the hub's CURVE config has no allow-list; "
            "pass the client public keys with CurveConfig.hub(keys, allowed=...)"
        )
    if role == "peer" and curve.server_public is None:
        raise TransportSecurityError(
            f"refusing tcp endpoints {endpoints}: the peer needs the hub's public key; pass "
            "CurveConfig.peer(keys, server_public=...)"
        )


class _AllowList:
    """ZAP credentials provider: a client is let in only if its z85 public key is listed.

    Each refusal is counted (``refused``, and ``on_refused()`` if given: the hub's
    ``zap_refused`` counter); only some are logged (:class:`~multibus.transport.stats.
    RateLimit`: the first 3, then each power of two from 1024), so a flood of unknown keys
    cannot flood the log."""

    def __init__(self, keys: frozenset[bytes], log: Any,
                 on_refused: Callable[[], Any] | None = None) -> None:
        self.keys = keys
        self.log = log
        self.refused = 0
        self.on_refused = on_refused
        self._limit = RateLimit()

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self.keys
        if not allowed:
            self.refused += 1
            if self.on_refused is not None:
                self.on_refused()
            suffix = self._limit("refused")
            if suffix is not None:
                self.log.warning("CURVE client refused: unknown public key %s%s",
                                 key.decode("ascii", "replace"), suffix)
        return allowed


def start_authenticator(
    ctx: zmq.Context, allowed_public_keys: AllowList,
    on_refused: Callable[[], Any] | None = None,
) -> ThreadAuthenticator:
    """Start a ZAP handler on ``ctx`` that admits only CURVE clients whose public key is in
    the allow-list (without one, a CURVE server accepts any client key). One per context;
    call ``.stop()`` on it before ``ctx.term()``. The allow-list is configured before the
    handler starts, so no client slips in during start-up. ``on_refused()`` is called (on
    the handler's thread) for each client refused; their warnings are rate-limited."""
    import logging

    from zmq.auth.thread import ThreadAuthenticator

    allowed = _allow_list(allowed_public_keys, require=True)[0]
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("multibus.transport.auth"))
    auth.configure_curve_callback(
        "*", _AllowList(allowed, logging.getLogger("multibus.transport.keys"), on_refused)
    )
    auth.start()
    return auth


def apply_server(socket: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``socket`` a CURVE server with ``keys``; call before ``bind()``."""
    if keys.secret is None:
        raise TransportSecurityError(f"a CURVE server needs a secret key; `{KEYGEN_HINT}`")
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True


def apply_client(
    socket: zmq.Socket, keys: CurveKeys, server_public: bytes | str | CurveKeys
) -> None:
    """Make ``socket`` a CURVE client with ``keys`` talking to ``server_public``; call before
    ``connect()``."""
    if keys.secret is None:
        raise TransportSecurityError(f"a CURVE client needs a secret key; `{KEYGEN_HINT}`")
    if isinstance(server_public, CurveKeys):
        server_public = server_public.public
    socket.curve_serverkey = _z85_key(server_public, "server public key")
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m multibus.transport.endpoints keygen DIR | runtime-dir``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m multibus.transport.endpoints", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    keygen = sub.add_parser("keygen", help="write a CURVE keypair DIR/NAME.key(_secret)")
    keygen.add_argument("directory")
    keygen.add_argument("--name", default="multibus", help="file name stem (default multibus)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    sub.add_parser("runtime-dir", help="print (and create) the private ipc directory")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "keygen":
            public, secret = make_keys(args.directory, args.name, force=args.force)
            print(f"public key: {public}\nsecret key: {secret} (mode 0600, keep it private)")
            print(f"public key value: {load_keys(public).public.decode()}")
        else:
            print(runtime_dir())
    except (EndpointError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
