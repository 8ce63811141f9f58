"""tcp only with CURVE + an allow-list; keys made, loaded and passed to children safely."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest
import zmq
from progs.procio import wait_for
from zmq.utils.monitor import recv_monitor_message

from multibus.transport.endpoints import EndpointError
from multibus.transport.keys import (
    CurveConfig,
    CurveKeys,
    TransportSecurityError,
    apply_client,
    apply_server,
    dump_curve,
    key_pipe,
    load_curve,
    load_keys,
    load_public_keys,
    make_keys,
    read_key_fd,
    read_key_file,
    require_security,
    start_authenticator,
    write_key_file,
)

# --------------------------------------------------------------------------- policy


def test_tcp_without_keys_is_refused_with_a_keygen_hint():
    with pytest.raises(TransportSecurityError) as err:
        require_security("tcp://127.0.0.1:5550", None)
    msg = str(err.value)
    assert "python -m multibus.transport.endpoints keygen DIR" in msg
    assert "tcp://127.0.0.1:5550" in msg and "\n" not in msg


def test_tcp_with_a_public_key_only_is_refused():
    public_only = CurveKeys(CurveKeys.generate().public)
    with pytest.raises(TransportSecurityError, match="keygen"):
        require_security("tcp://127.0.0.1:5550", CurveConfig(public_only), role="peer")


def test_tcp_hub_needs_an_allow_list_and_peer_needs_the_server_key():
    keys = CurveKeys.generate()
    with pytest.raises(TransportSecurityError, match="allow-list"):
        require_security("tcp://127.0.0.1:5550", CurveConfig(keys), role="hub")
    with pytest.raises(TransportSecurityError, match="hub's public key"):
        require_security("tcp://127.0.0.1:5550", CurveConfig(keys), role="peer")
    client = CurveKeys.generate()
    require_security("tcp://127.0.0.1:5550", CurveConfig.hub(keys, [client]), role="hub")
    require_security("tcp://127.0.0.1:5550", CurveConfig.peer(client, keys), role="peer")
    # a mixed set is as exposed as its most exposed socket
    with pytest.raises(TransportSecurityError):
        require_security("ipc:///x/a.control,ipc:///x/a.down,tcp://127.0.0.1:9", None)


def test_local_endpoints_need_no_keys():
    require_security("ipc:///run/x/hub", None)
    require_security("inproc://hub", None, role="peer")


def test_empty_allow_list_is_refused():
    with pytest.raises(TransportSecurityError, match="allow-list"):
        CurveConfig.hub(CurveKeys.generate(), [])
    ctx = zmq.Context()
    try:
        with pytest.raises(TransportSecurityError, match="allow-list"):
            start_authenticator(ctx, [])
    finally:
        ctx.term()


def test_malformed_keys_are_refused():
    with pytest.raises(TransportSecurityError, match="40-character z85"):
        CurveKeys(b"short")
    with pytest.raises(TransportSecurityError, match="40-character z85"):
        CurveConfig.peer(CurveKeys.generate(), "x" * 39)


def test_secrets_never_show_in_repr():
    keys = CurveKeys.generate()
    cfg = CurveConfig.hub(keys, [keys])
    for text in (repr(keys), repr(cfg), str(cfg)):
        assert keys.secret.decode() not in text
        assert keys.public.decode() in text


# --------------------------------------------------------------------------- key files


def test_make_and_load_keys(tmp_path):
    public, secret = make_keys(tmp_path / "keys", name="hub")
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert (public.name, secret.name) == ("hub.key", "hub.key_secret")
    pair = load_keys(tmp_path / "keys", name="hub")
    assert pair.secret is not None and load_keys(public) == CurveKeys(pair.public)
    assert load_public_keys(tmp_path / "keys") == {pair.public}
    assert not [p for p in (tmp_path / "keys").iterdir() if p.name.startswith(".keygen")]

    with pytest.raises(EndpointError, match="already exists.*--force"):
        make_keys(tmp_path / "keys", name="hub")
    make_keys(tmp_path / "keys", name="hub", force=True)
    assert load_keys(secret).public != pair.public


def test_a_key_name_must_be_a_file_name(tmp_path):
    with pytest.raises(EndpointError, match="invalid key name '../k'"):
        make_keys(tmp_path, name="../k")
    assert list(tmp_path.iterdir()) == []
    cmd = [sys.executable, "-m", "multibus.transport.endpoints", "keygen", str(tmp_path),
           "--name", "a/b"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    assert done.returncode == 2 and "invalid key name" in done.stderr
    assert "Traceback" not in done.stderr


def test_loose_secret_file_is_refused(tmp_path):
    _, secret = make_keys(tmp_path, name="k")
    secret.chmod(0o644)
    with pytest.raises(TransportSecurityError, match=f"chmod 600 {secret}"):
        load_keys(secret)


def test_missing_key_names_the_fix(tmp_path):
    with pytest.raises(TransportSecurityError, match="keygen"):
        load_keys(tmp_path)


@pytest.mark.timeout(30)
def test_keygen_command_line(tmp_path):
    cmd = [sys.executable, "-m", "multibus.transport.endpoints", "keygen", str(tmp_path / "k")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "k" / "multibus.key_secret").st_mode) == 0o600
    assert load_keys(tmp_path / "k").public.decode() in done.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    assert again.returncode == 2 and "--force" in again.stderr
    assert "Traceback" not in again.stderr


# --------------------------------------------------------------------------- passing keys


def _config() -> CurveConfig:
    hub = CurveKeys.generate()
    return CurveConfig(CurveKeys.generate(), server_public=hub.public,
                       allowed=frozenset({hub.public}))


def test_dump_and_load_round_trip():
    cfg = _config()
    back = load_curve(dump_curve(cfg))
    assert back == cfg and back.keys.secret == cfg.keys.secret
    assert read_key_fd(key_pipe(cfg)) == cfg
    with pytest.raises(TransportSecurityError, match="malformed"):
        load_curve(b'{"public": 1}')


@pytest.mark.timeout(30)
def test_keys_reach_an_exec_child_over_an_inherited_pipe_not_argv():
    cfg = _config()
    fd = key_pipe(cfg)
    assert not os.get_inheritable(fd)
    code = (
        "import sys\n"
        "from multibus.transport.keys import read_key_fd\n"
        "cfg = read_key_fd(int(sys.argv[1]))\n"
        "print(cfg.keys.public.decode(), cfg.keys.secret is not None)\n"
    )
    try:
        proc = subprocess.Popen([sys.executable, "-c", code, str(fd)], pass_fds=[fd],
                                stdout=subprocess.PIPE, text=True)
    finally:
        os.close(fd)
    try:
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert out.split() == [cfg.keys.public.decode(), "True"]
    assert cfg.keys.secret.decode() not in " ".join(proc.args)


def test_key_file_is_private_and_removed_after_reading(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    cfg = _config()
    path = write_key_file(cfg)
    assert path.parent == tmp_path / "multibus"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_key_file(path) == cfg
    assert not path.exists()

    explicit = write_key_file(cfg, tmp_path / "k.json")
    with pytest.raises(FileExistsError):
        write_key_file(cfg, explicit)  # never reuses (or follows) an existing file
    explicit.chmod(0o644)
    with pytest.raises(TransportSecurityError, match="chmod 600"):
        read_key_file(explicit)


# --------------------------------------------------------------------------- CURVE on the wire


def _wait_event(monitor: zmq.Socket, wanted: set[int], timeout: float) -> int | None:
    """Return the first monitor event in ``wanted`` within ``timeout`` seconds, else None."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if monitor.poll(int(left * 1000)):
            event = recv_monitor_message(monitor)["event"]
            if event in wanted:
                return event
    return None


class _Wire:
    """A CURVE ROUTER server on 127.0.0.1 and helpers to dial it; all sockets on this thread."""

    def __init__(self, allowed: list[CurveKeys] | None):
        self.ctx = zmq.Context()
        self.server_keys = CurveKeys.generate()
        self.auth = start_authenticator(self.ctx, allowed) if allowed is not None else None
        self.sockets: list[zmq.Socket] = []
        self.server = self._socket(zmq.ROUTER)
        apply_server(self.server, self.server_keys)
        self.server.bind("tcp://127.0.0.1:*")
        self.url = self.server.last_endpoint.decode()

    def _socket(self, kind: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.linger = 0
        self.sockets.append(s)
        return s

    def dial(self, keys: CurveKeys, server_public: bytes | None = None):
        client = self._socket(zmq.DEALER)
        apply_client(client, keys, server_public or self.server_keys.public)
        monitor = client.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        self.sockets.append(monitor)
        client.connect(self.url)
        return client, monitor

    def echo_once(self, timeout: float) -> bool:
        """Answer one request if one arrives within ``timeout``."""
        if not self.server.poll(int(timeout * 1000)):
            return False
        ident, body = self.server.recv_multipart()
        self.server.send_multipart([ident, b"pong:" + body])
        return True

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


FAILED = {zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
          zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}


@pytest.mark.timeout(20)
def test_allowed_client_gets_a_reply_unknown_client_never_does():
    good, stranger = CurveKeys.generate(), CurveKeys.generate()
    wire = _Wire(allowed=[good])
    try:
        bad_client, bad_monitor = wire.dial(stranger)
        bad_client.send(b"let me in")
        # the ZAP handler refuses the unknown key: the handshake fails with an auth error
        assert _wait_event(bad_monitor, FAILED | {zmq.EVENT_HANDSHAKE_SUCCEEDED}, 5) == \
            zmq.EVENT_HANDSHAKE_FAILED_AUTH

        good_client, good_monitor = wire.dial(good)
        good_client.send(b"ping")
        assert _wait_event(good_monitor, FAILED | {zmq.EVENT_HANDSHAKE_SUCCEEDED}, 5) == \
            zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert wire.echo_once(5)
        assert good_client.poll(5000) and good_client.recv() == b"pong:ping"
        # the server only ever saw the allowed client's message, and the stranger got nothing
        assert not wire.echo_once(0.2)
        assert not bad_client.poll(0)
    finally:
        wire.close()


@pytest.mark.timeout(20)
def test_client_with_the_wrong_server_key_does_not_connect():
    good = CurveKeys.generate()
    wire = _Wire(allowed=[good])
    try:
        client, monitor = wire.dial(good, server_public=CurveKeys.generate().public)
        client.send(b"ping")
        assert _wait_event(monitor, FAILED | {zmq.EVENT_HANDSHAKE_SUCCEEDED}, 5) in FAILED
        assert not wire.echo_once(0.3)
    finally:
        wire.close()


@pytest.mark.timeout(20)
def test_without_the_authenticator_curve_lets_any_key_in():
    """Why start_authenticator exists: plain CURVE encrypts but admits every client key."""
    wire = _Wire(allowed=None)
    try:
        client, monitor = wire.dial(CurveKeys.generate())
        client.send(b"anyone")
        assert _wait_event(monitor, FAILED | {zmq.EVENT_HANDSHAKE_SUCCEEDED}, 5) == \
            zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert wire.echo_once(5)
    finally:
        wire.close()


# --------------------------------------------------------------------------- Bridge over tcp


def test_bridge_refuses_tcp_without_keys():
    bridge = pytest.importorskip("multibus.transport.bridge")
    from multibus.bus import Bus

    hub = bridge.Bridge(Bus(), role="hub", name="open-hub", endpoints="tcp://127.0.0.1:*")
    with pytest.raises(TransportSecurityError, match="keygen"):
        hub.subscribe()


@pytest.mark.timeout(40)
def test_bridge_over_tcp_admits_only_allowed_peer_keys():
    bridge = pytest.importorskip("multibus.transport.bridge")
    from multibus.bus import Bus

    hub_keys, good, stranger = (CurveKeys.generate() for _ in range(3))
    buses: list = []
    joined: list[str] = []
    try:
        hub_bus = Bus()
        buses.append(hub_bus)
        hub_bus.subscribe("peer.joined", lambda name, pid: joined.append(name))
        hub = bridge.Bridge(hub_bus, role="hub", name="secure-hub",
                            endpoints="tcp://127.0.0.1:*",
                            curve=CurveConfig.hub(hub_keys, [good])).subscribe()
        assert hub.endpoints.is_network and "*" not in hub.endpoints.to_string()

        def peer(name: str, keys: CurveKeys):
            bus = Bus()
            buses.append(bus)
            return bridge.Bridge(bus, role="peer", name=name, endpoints=hub.endpoints,
                                 curve=CurveConfig.peer(keys, hub_keys)).subscribe()

        peer("stranger", stranger)
        # the stranger's handshakes are refused by the ZAP allow-list (counted on the hub)
        assert wait_for(lambda: hub.stats().get("handshake_failed", 0) >= 1, 10)
        peer("good", good)
        assert wait_for(lambda: "good" in joined, 10)
        assert "stranger" not in hub.peers() and joined == ["good"]
    finally:
        for bus in reversed(buses):
            bus.exit()


def _flood_unknown_keys(hub, hub_keys: CurveKeys, n: int) -> None:
    """``n`` connections with unknown CURVE keys to the hub's control socket, in batches of
    50 (each batch refused before the next: bounded descriptors), none reconnecting."""
    ctx = zmq.Context.instance()
    done = 0
    while done < n:
        batch = min(50, n - done)
        socks = []
        try:
            for _ in range(batch):
                sock = ctx.socket(zmq.DEALER)
                socks.append(sock)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RECONNECT_IVL, -1)  # one handshake each
                apply_client(sock, CurveKeys.generate(), hub_keys.public)
                sock.connect(hub.endpoints.control)
            done += batch
            assert wait_for(lambda want=done: hub.stats()["zap_refused"] >= want, 20)
        finally:
            for sock in socks:
                sock.close(0)


def _zap_flood(caplog, n: int) -> None:
    import logging

    from multibus.bus import Bus
    from multibus.transport.bridge import Bridge

    hub_keys, good = CurveKeys.generate(), CurveKeys.generate()
    bus = Bus()
    try:
        hub = Bridge(bus, role="hub", name="zap-hub", endpoints="tcp://127.0.0.1:*",
                     curve=CurveConfig.hub(hub_keys, [good])).subscribe()
        with caplog.at_level(logging.WARNING, logger="multibus.transport.keys"):
            t0 = time.monotonic()
            _flood_unknown_keys(hub, hub_keys, n)
            took = time.monotonic() - t0
        warnings = [r for r in caplog.records if "CURVE client refused" in r.getMessage()]
        assert hub.stats()["zap_refused"] >= n
        # the first 3, then each power of two from 1024: a flood cannot flood the log
        assert len(warnings) <= 3 + sum(1 for k in range(10, 20) if 2**k <= 2 * n), warnings
        print(f"{n} unknown keys refused in {took:.2f}s, {len(warnings)} warnings")
    finally:
        bus.exit()


@pytest.mark.timeout(60)
def test_zap_refusals_are_counted_and_their_warnings_rate_limited(caplog):
    """Connections with unknown CURVE keys: each refusal is counted in the hub's stats
    (``zap_refused``), only a few are logged (was one WARNING each; issue 14, part 6)."""
    _zap_flood(caplog, 120)


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_zap_flood_of_1000_unknown_keys(caplog):
    _zap_flood(caplog, 1000)
