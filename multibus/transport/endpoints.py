"""Where a bridge's sockets live, and who may talk to them.

Two jobs, both about exposure:

* **ipc** (the default): sockets in a private runtime dir (0700, ours, not a symlink), so other
  users cannot reach them; one hub per name, enforced by an flock'd lock file next to the
  sockets, because a second ``bind()`` on an ipc path silently steals it from a live hub.
* **tcp**: only with CURVE keys *and* an allow-list of client keys enforced by a ZAP
  authenticator (CURVE without a ZAP handler accepts any client key). Keys travel to children
  over an inherited pipe or a 0600 file, never in argv (world-readable in ``/proc``).

This module knows nothing of buses or spawning. ``python -m multibus.transport.endpoints keygen
DIR`` makes a keypair.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

if TYPE_CHECKING:  # zmq.auth, logging, tempfile and argparse are imported where used: a
    # worker's start-up pays for them only when it uses CURVE, key files or the CLI (for the
    # same reason the value classes below are not dataclasses: that import costs a worker
    # ~1 MB, which every forked worker also has to unmap when it exits)
    from zmq.auth.thread import ThreadAuthenticator

__all__ = [
    "CurveConfig",
    "CurveKeys",
    "EndpointError",
    "Endpoints",
    "HubNameInUse",
    "InvalidEndpoint",
    "TransportSecurityError",
    "UnsafeRuntimeDir",
    "apply_client",
    "apply_server",
    "claim_ipc",
    "dump_curve",
    "ipc_owner",
    "key_pipe",
    "load_curve",
    "load_keys",
    "load_public_keys",
    "make_keys",
    "private_ipc",
    "read_key_fd",
    "read_key_file",
    "remove_ipc",
    "require_security",
    "runtime_dir",
    "start_authenticator",
    "sweep_stale",
    "write_key_file",
]

KEYGEN_HINT = "python -m multibus.transport.endpoints keygen DIR"
IPC_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes on Linux, including the NUL
NAME_MAX = 64
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_SUFFIXES = ("control", "down", "up")
_SCHEMES = ("ipc", "tcp", "inproc")
_LOCAL_SCHEMES = ("ipc", "inproc")
_Z85_KEY_LEN = 40


class _Value:
    """An immutable value: its fields are its ``__slots__``; equal and hashed by them."""

    __slots__: tuple[str, ...] = ()

    def _init(self, **fields: Any) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable (cannot set {name!r})")

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._fields() == other._fields()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({args})"


class EndpointError(Exception):
    """Base class for every error this module raises on purpose."""


class InvalidEndpoint(EndpointError, ValueError):
    """A malformed endpoint string, hub name or ipc path."""


class UnsafeRuntimeDir(EndpointError, PermissionError):
    """The runtime dir could be read or hijacked by another user."""


class HubNameInUse(EndpointError):
    """A live hub already owns this ipc name."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class TransportSecurityError(EndpointError):
    """A network endpoint without the CURVE keys and allow-list it needs."""


# --------------------------------------------------------------------------- endpoints


def _scheme(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or not rest or scheme not in _SCHEMES:
        raise InvalidEndpoint(
            f"invalid endpoint {url!r}: expected ipc://PATH, tcp://HOST:PORT or inproc://NAME"
        )
    return scheme


def _split_tcp(url: str) -> tuple[str, str]:
    host, sep, port = url[len("tcp://"):].rpartition(":")
    if not sep or not host:
        raise InvalidEndpoint(f"invalid tcp endpoint {url!r}: expected tcp://HOST:PORT")
    return host, port


class Endpoints(_Value):
    """The three sockets of one hub: ``control`` (ROUTER/DEALER: commands, acks, state,
    heartbeats), ``down`` (XPUB -> SUB: mirrored channels) and ``up`` (peers -> hub: mirrored
    publishes and logs, on their own socket so a log flood never delays a command).

    ``to_string()`` gives one string for argv/env; ``Endpoints.parse`` reads it back:
    ``ipc:///dir/NAME`` means ``NAME.control``/``NAME.down``/``NAME.up``; ``tcp://HOST:P`` means
    ports P, P+1, P+2 (``tcp://HOST:*`` = three ephemeral ports, for binding); anything else is
    the three URLs joined by commas.
    """

    __slots__ = ("control", "down", "up")
    control: str
    down: str
    up: str

    def __init__(self, control: str, down: str, up: str) -> None:
        for url in (control, down, up):
            _scheme(url)
            if "," in url:
                raise InvalidEndpoint(f"invalid endpoint {url!r}: commas are not allowed")
        self._init(control=control, down=down, up=up)

    def urls(self) -> tuple[str, str, str]:
        return (self.control, self.down, self.up)

    @property
    def is_network(self) -> bool:
        """True when any socket is reachable from the network (needs CURVE)."""
        return any(_scheme(u) not in _LOCAL_SCHEMES for u in self.urls())

    def ipc_paths(self) -> list[Path]:
        """Filesystem paths of the ipc sockets (empty for tcp/inproc)."""
        return [Path(u[len("ipc://"):]) for u in self.urls() if u.startswith("ipc://")]

    @classmethod
    def ipc(cls, base: str | os.PathLike[str]) -> Endpoints:
        return cls.parse(f"ipc://{os.fspath(base)}")

    @classmethod
    def tcp(cls, host: str = "127.0.0.1", port: int | str = "*") -> Endpoints:
        return cls.parse(f"tcp://{host}:{port}")

    def to_string(self) -> str:
        schemes = {_scheme(u) for u in self.urls()}
        if len(schemes) == 1 and schemes <= set(_LOCAL_SCHEMES):
            base = self.control.removesuffix(".control")
            if self.urls() == tuple(f"{base}.{s}" for s in _SUFFIXES):
                return base
        if schemes == {"tcp"}:
            parts = [_split_tcp(u) for u in self.urls()]
            hosts = {h for h, _ in parts}
            ports = [p for _, p in parts]
            if len(hosts) == 1 and ports == ["*"] * 3:
                return self.control
            if len(hosts) == 1 and all(p.isdigit() for p in ports):
                first = int(ports[0])
                if [int(p) for p in ports] == [first, first + 1, first + 2]:
                    return self.control
        return ",".join(self.urls())

    @classmethod
    def parse(cls, text: str | Endpoints) -> Endpoints:
        if isinstance(text, Endpoints):
            return text
        text = text.strip()
        if "," in text:
            parts = [p.strip() for p in text.split(",")]
            if len(parts) != 3:
                raise InvalidEndpoint(
                    f"invalid endpoints {text!r}: expected 3 comma-separated URLs "
                    "(control,down,up)"
                )
            return cls(*parts)
        scheme = _scheme(text)
        if scheme in _LOCAL_SCHEMES:
            return cls(*(f"{text}.{s}" for s in _SUFFIXES))
        host, port = _split_tcp(text)
        if port == "*":
            return cls(text, text, text)
        if not port.isdigit() or not 1 <= int(port) <= 65533:
            raise InvalidEndpoint(
                f"invalid tcp endpoint {text!r}: port must be 1..65533 (it uses PORT..PORT+2) "
                "or * for ephemeral ports"
            )
        first = int(port)
        return cls(*(f"tcp://{host}:{first + i}" for i in range(3)))

    def __str__(self) -> str:
        return self.to_string()


# --------------------------------------------------------------------------- runtime dir


def _usable_base(base: str, uid: int) -> bool:
    """$XDG_RUNTIME_DIR is only used when it is absolute, ours, a dir we can write, and not
    writable by others; otherwise we fall back to /tmp/multibus-<uid>."""
    if not os.path.isabs(base):
        return False
    try:
        st = os.stat(base)
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == uid
        and not st.st_mode & 0o022
        and os.access(base, os.W_OK | os.X_OK)
    )


def _runtime_path() -> Path:
    uid = os.getuid()
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and _usable_base(xdg, uid):
        return Path(xdg) / "multibus"
    return Path("/tmp") / f"multibus-{uid}"


def _unsafe(path: Path, why: str, fix: str) -> UnsafeRuntimeDir:
    return UnsafeRuntimeDir(f"unsafe runtime dir {path}: {why}; {fix}")


def _check_private_dir(path: Path, st: os.stat_result) -> None:
    uid = os.getuid()
    remove = f"remove it (rm -r {path}) or set XDG_RUNTIME_DIR to a private directory"
    if stat.S_ISLNK(st.st_mode):
        raise _unsafe(path, "it is a symlink", remove)
    if not stat.S_ISDIR(st.st_mode):
        raise _unsafe(path, "it is not a directory", remove)
    if st.st_uid != uid:
        raise _unsafe(path, f"owned by uid {st.st_uid}, not by us (uid {uid})", remove)
    if stat.S_IMODE(st.st_mode) & 0o077:
        mode = oct(stat.S_IMODE(st.st_mode))
        raise _unsafe(path, f"mode {mode} lets other users in", f"run `chmod 700 {path}`")


def runtime_dir(create: bool = True) -> Path:
    """The private dir for ipc sockets: ``$XDG_RUNTIME_DIR/multibus`` if that base is usable,
    else ``/tmp/multibus-<uid>``. Created 0700 when missing; refused (``UnsafeRuntimeDir``) when
    it is a symlink, not a dir, not ours, or open to others: anyone who can enter it can talk
    to our hubs or put their own socket in our place."""
    path = _runtime_path()
    created = False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:  # lost a race; check whoever won below
            pass
        st = os.lstat(path)
    if not created:
        _check_private_dir(path, st)
    # Re-check through an O_NOFOLLOW fd so nothing can be swapped in between check and use.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            st = os.lstat(path)
            _check_private_dir(path, st)
        raise
    try:
        if created:
            os.fchmod(fd, 0o700)  # undo a restrictive umask; we just made it, so it's ours
        _check_private_dir(path, os.fstat(fd))
    finally:
        os.close(fd)
    return path


# --------------------------------------------------------------------------- ipc names + locks

_CLAIM_TRIES = 8  # ~35 ms of retries before a held lock counts as a live hub
_held: dict[str, int] = {}  # lock path -> fd of the flock this process holds
_held_guard = threading.Lock()


def check_name(name: str) -> str:
    """Validate a hub name: 1-64 of [A-Za-z0-9_.-], not starting with '.' or '-'."""
    if not isinstance(name, str) or not name or len(name) > NAME_MAX or not _NAME_RE.match(name):
        raise InvalidEndpoint(
            f"invalid hub name {name!r}: use 1-{NAME_MAX} characters from [A-Za-z0-9_.-], "
            "not starting with '.' or '-'"
        )
    return name


def _lock_path(endpoints: Endpoints) -> Path:
    paths = endpoints.ipc_paths()
    if not paths:
        raise InvalidEndpoint(f"no ipc endpoint in {endpoints}: only ipc hubs take a lock")
    control = str(paths[0])
    return Path(control.removesuffix(".control") + ".lock")


def _read_pid(fd: int) -> int | None:
    try:
        data = os.pread(fd, 64, 0).split()
        return int(data[0]) if data else None
    except (OSError, ValueError):
        return None


def claim_ipc(endpoints: Endpoints) -> None:
    """Take the hub lock for ipc ``endpoints`` (a ``.lock`` file next to the sockets, flock'd
    for as long as this process holds it, with our pid in it). Raises ``HubNameInUse`` when a
    live hub holds it, this process included. Stale socket files of a dead hub are removed
    once the lock is ours."""
    path = _lock_path(endpoints)
    key = str(path)
    with _held_guard:
        if key in _held:
            raise HubNameInUse(
                f"hub endpoint {endpoints} is already in use by this process (pid "
                f"{os.getpid()}, lock {path}); remove_ipc() it first or choose another name",
                os.getpid(),
            )
        for attempt in range(_CLAIM_TRIES):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                if attempt < _CLAIM_TRIES - 1:
                    # maybe only sweep_stale() holding a dead hub's lock for a moment
                    time.sleep(0.005)
                    continue
                who = f"pid {pid}" if pid else "another process"
                raise HubNameInUse(
                    f"hub endpoint {endpoints} is in use by {who} (lock {path}); stop that hub "
                    "or choose another name",
                    pid,
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous owner may have unlinked the file between our open and flock.
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _held[key] = fd
            break
        else:
            raise HubNameInUse(f"could not lock {path}: it keeps being replaced; retry")
    for sock in endpoints.ipc_paths():
        _unlink_socket(sock)


def _unlink_socket(path: Path) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def ipc_owner(endpoints_or_name: Endpoints | str) -> int | None:
    """Pid of the live hub holding these ipc endpoints (or hub name), else None."""
    try:
        endpoints = _as_ipc(endpoints_or_name)
    except FileNotFoundError:  # no runtime dir yet: no hub either
        return None
    path = _lock_path(endpoints)
    with _held_guard:
        if str(path) in _held:
            return os.getpid()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except (FileNotFoundError, OSError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _as_ipc(endpoints_or_name: Endpoints | str) -> Endpoints:
    if isinstance(endpoints_or_name, Endpoints):
        return endpoints_or_name
    if "://" in endpoints_or_name:
        return Endpoints.parse(endpoints_or_name)
    return _ipc_for(check_name(endpoints_or_name), runtime_dir(create=False))


def _ipc_for(name: str, directory: Path) -> Endpoints:
    base = directory / name
    longest = f"{base}.control"
    if len(os.fsencode(longest)) > IPC_PATH_MAX:
        raise InvalidEndpoint(
            f"ipc path {longest} is {len(os.fsencode(longest))} bytes, over the "
            f"{IPC_PATH_MAX}-byte limit of unix sockets; use a shorter hub name or point "
            "XDG_RUNTIME_DIR at a shorter directory"
        )
    return Endpoints.ipc(base)


def private_ipc(name: str) -> Endpoints:
    """Default endpoints of the hub called ``name``: ipc sockets in ``runtime_dir()``, claimed
    for this process (``HubNameInUse`` names the live owner's pid otherwise). Give them back
    with ``remove_ipc``."""
    directory = runtime_dir()
    endpoints = _ipc_for(check_name(name), directory)
    claim_ipc(endpoints)
    sweep_stale(directory)
    return endpoints


def sweep_stale(directory: str | os.PathLike[str] | None = None) -> int:
    """Remove the sockets and lock of every hub in ``directory`` (default ``runtime_dir()``)
    whose owner is gone (a killed hub never ran ``remove_ipc``); returns how many. Only names
    with a lock file nobody holds are touched, so live hubs and foreign files are safe."""
    directory = Path(directory) if directory is not None else runtime_dir()
    removed = 0
    with _held_guard:
        held = set(_held)
    for lock in directory.glob("*.lock"):
        if str(lock) in held:
            continue
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.path.samestat(os.fstat(fd), os.lstat(lock)):
                continue  # replaced meanwhile: it belongs to someone else now
            base = str(lock).removesuffix(".lock")
            for suffix in _SUFFIXES:
                _unlink_socket(Path(f"{base}.{suffix}"))
            os.unlink(lock)  # still locked: a newcomer re-checks the inode and retries
            removed += 1
        except OSError:  # BlockingIOError: a live owner; anything else: leave it alone
            pass
        finally:
            os.close(fd)
    return removed


def remove_ipc(endpoints: Endpoints | str) -> bool:
    """Remove the ipc socket files of ``endpoints`` and release its hub lock. Only when this
    process holds the lock or nobody does: a live hub's sockets are never pulled from under
    it. Returns True when the files were removed."""
    endpoints = Endpoints.parse(endpoints)
    if not endpoints.ipc_paths():
        return False
    path = _lock_path(endpoints)
    with _held_guard:
        ours = str(path) in _held
    if not ours:
        try:
            claim_ipc(endpoints)  # refuses if a live hub holds it
        except HubNameInUse:
            return False
        except FileNotFoundError:  # the directory is gone: nothing to remove
            return False
    for sock in endpoints.ipc_paths():
        _unlink_socket(sock)
    with _held_guard:
        fd = _held.pop(str(path), None)
        if fd is not None:
            try:
                os.unlink(path)  # while still locked, so a newcomer cannot lock a dead inode
            except FileNotFoundError:
                pass
            os.close(fd)
    return True


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


class CurveConfig(_Value):
    """What a bridge needs for CURVE: its own ``keys``; on a hub the ``allowed`` client public
    keys (an allow-list, enforced by ``start_authenticator``); on a peer the hub's public key
    ``server_public``."""

    __slots__ = ("keys", "server_public", "allowed")
    keys: CurveKeys
    server_public: bytes | None
    allowed: frozenset[bytes]

    def __init__(
        self,
        keys: CurveKeys,
        server_public: bytes | str | None = None,
        allowed: Iterable[bytes | str | CurveKeys] = frozenset(),
    ) -> None:
        self._init(
            keys=keys,
            server_public=(None if server_public is None
                           else _z85_key(server_public, "server public key")),
            allowed=_allow_list(allowed, require=False),
        )

    @classmethod
    def hub(cls, keys: CurveKeys, allowed: Iterable[bytes | str | CurveKeys]) -> CurveConfig:
        return cls(keys, allowed=_allow_list(allowed, require=True))

    @classmethod
    def peer(cls, keys: CurveKeys, server_public: bytes | str | CurveKeys) -> CurveConfig:
        if isinstance(server_public, CurveKeys):
            server_public = server_public.public
        return cls(keys, server_public=_z85_key(server_public, "server public key"))

    def __repr__(self) -> str:
        server = self.server_public.decode() if self.server_public else None
        return (
            f"CurveConfig(keys={self.keys!r}, server_public={server!r}, "
            f"allowed={len(self.allowed)} keys)"
        )


def _allow_list(keys: Iterable[bytes | str | CurveKeys], require: bool) -> frozenset[bytes]:
    if isinstance(keys, (bytes, str, CurveKeys)):
        keys = [keys]
    out = frozenset(
        _z85_key(k.public if isinstance(k, CurveKeys) else k, "allowed public key") for k in keys
    )
    if require and not out:
        raise TransportSecurityError(
            "empty CURVE allow-list: a hub must name the client public keys it accepts "
            f"(make a keypair per client with `{KEYGEN_HINT}`)"
        )
    return out


def make_keys(
    directory: str | os.PathLike[str], name: str = "multibus", force: bool = False
) -> tuple[Path, Path]:
    """Write a new keypair ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (0600), the
    zmq.auth certificate format. The directory is created 0700 if missing. Files are written
    in a private temporary dir and renamed into place, so the secret is never readable by
    others, not even for an instant. Refuses to overwrite an existing key unless ``force``."""
    check_name(name)
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
    }
    return json.dumps(doc).encode()


def load_curve(data: bytes) -> CurveConfig:
    try:
        doc = json.loads(data)
        return CurveConfig(
            CurveKeys(doc["public"], doc["secret"]),
            server_public=doc["server_public"],
            allowed=frozenset(doc["allowed"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
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
    """ZAP credentials provider: a client is let in only if its z85 public key is listed."""

    def __init__(self, keys: frozenset[bytes], log: Any) -> None:
        self.keys = keys
        self.log = log

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self.keys
        if not allowed:
            self.log.warning("CURVE client refused: unknown public key %s",
                             key.decode("ascii"))
        return allowed


def start_authenticator(
    ctx: zmq.Context, allowed_public_keys: Iterable[bytes | str | CurveKeys]
) -> ThreadAuthenticator:
    """Start a ZAP handler on ``ctx`` that admits only CURVE clients whose public key is in
    the allow-list (without one, a CURVE server accepts any client key). One per context;
    call ``.stop()`` on it before ``ctx.term()``. The allow-list is configured before the
    handler starts, so no client slips in during start-up."""
    import logging

    from zmq.auth.thread import ThreadAuthenticator

    allowed = _allow_list(allowed_public_keys, require=True)
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("multibus.transport.auth"))
    auth.configure_curve_callback(
        "*", _AllowList(allowed, logging.getLogger("multibus.transport.endpoints"))
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
    except EndpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
