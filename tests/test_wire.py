"""wire: envelopes round-trip; everything else is refused with a reason to count."""

from __future__ import annotations

import msgpack
import pytest

from multibus.transport import wire


def test_control_frames_round_trip_and_validate_on_encode():
    frame = wire.encode("hello", name="w1", pid=42, epoch=7, state="STARTED", down=False)
    kind, msg = wire.decode(frame)
    assert kind == "hello" and msg["name"] == "w1" and msg["pid"] == 42 and msg["down"] is False
    with pytest.raises(ValueError, match="needs fields"):
        wire.encode("hello", name="w1")
    with pytest.raises(ValueError, match="invalid state"):
        wire.encode("state", state="DANCING")
    with pytest.raises(ValueError, match="unknown frame kind"):
        wire.encode("nope")


def test_pub_batch_runs_round_trip_in_order():
    packer = msgpack.Packer()
    items = [("order", ("BUY", 20, "DXBZ"), {}), ("order", ("SELL", 1, "X"), {}),
             ("quote", (1.5,), {"venue": "x"}), ("order", (None, True, b"\x00", [1], {"a": 2}), {})]
    runs = []
    for ch, args, kw in items:
        data = wire.pack_entry(packer, ch, args, kw, 1000)
        if runs and runs[-1][0] == ch and runs[-1][1] == bool(kw):
            runs[-1][2].append(data)
        else:
            runs.append((ch, bool(kw), [data]))
    frame = wire.encode_pub("hub", 5, 100, runs)
    assert frame.startswith(wire.origin_prefix("pub", "hub"), 1)
    kind, msg = wire.decode(frame)
    assert kind == "pub" and msg["seq"] == 100 and msg["epoch"] == 5
    assert msg["runs"] == [
        ["order", False, [["BUY", 20, "DXBZ"], ["SELL", 1, "X"]]],
        ["quote", True, [[[1.5], {"venue": "x"}]]],
        ["order", False, [[None, True, b"\x00", [1], {"a": 2}]]],
    ]


def test_log_frames_and_truncation():
    packer = msgpack.Packer()
    long = "é" * 5000
    rec = wire.pack_log(packer, long, 40, 1000)
    assert len(rec) <= 1000
    frame = wire.encode_logs("w1", [wire.pack_log(packer, "hi", 20, 1000), rec])
    _, msg = wire.decode(frame)
    assert msg["msgs"][0] == ["hi", 20]
    text, level = msg["msgs"][1]
    assert level == 40 and text.startswith("éé") and "[truncated" in text


def test_sender_refuses_bad_types_and_oversized_messages_clearly():
    packer = msgpack.Packer()
    with pytest.raises(TypeError, match=r"cannot mirror publish on 'order'.*msgpack|must be"):
        wire.pack_entry(packer, "order", (object(),), {}, 1000)
    with pytest.raises(TypeError, match="cannot mirror publish on 'order'"):
        wire.pack_entry(packer, "order", (1 << 70,), {}, 1000)
    with pytest.raises(ValueError, match="over the 1000-byte limit.*max_message"):
        wire.pack_entry(packer, "order", (b"x" * 2000,), {}, 1000)
    # the packer is still usable after a failure
    assert msgpack.unpackb(wire.pack_entry(packer, "o", (1,), {}, 1000)) == [1]


GOOD = {"v": 1, "k": "pub", "origin": "x", "epoch": 1, "seq": 0,
        "runs": [["data", False, [[1]]]]}


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "decode"),
        (b"\xc1", "decode"),
        (msgpack.packb(GOOD)[:-3], "decode"),
        (msgpack.packb(GOOD) + b"\x00", "decode"),  # trailing data
        (b"\x91" * 5000 + b"\xc0", "decode"),  # nesting bomb
        (b"\xdd\xff\xff\xff\xff", "decode"),  # 4G elements announced
        (msgpack.packb(msgpack.ExtType(1, b"x")), "decode"),
        (msgpack.packb({**GOOD, "seq": msgpack.Timestamp(1, 0)}), "decode"),
        (b"\xa2\xff\xfe", "decode"),  # bad utf-8
        (msgpack.packb({1: 2}), "decode"),  # int map key
        (msgpack.packb([1, 2]), "schema"),
        (msgpack.packb({**GOOD, "v": 2}), "version"),
        (msgpack.packb({k: v for k, v in GOOD.items() if k != "v"}), "version"),
        (msgpack.packb({**GOOD, "k": "nope"}), "kind"),
        (msgpack.packb({**GOOD, "k": ["pub"]}), "kind"),
        (msgpack.packb({**GOOD, "extra": 1}), "schema"),
        (msgpack.packb({k: v for k, v in GOOD.items() if k != "seq"}), "schema"),
        (msgpack.packb({**GOOD, "seq": -1}), "schema"),
        (msgpack.packb({**GOOD, "seq": 1.0}), "schema"),
        (msgpack.packb({**GOOD, "origin": "../etc"}), "schema"),
        (msgpack.packb({**GOOD, "runs": []}), "schema"),
        (msgpack.packb({**GOOD, "runs": [["data", False, []]]}), "schema"),
        (msgpack.packb({**GOOD, "runs": [["data", False, [{"a": 1}]]]}), "schema"),
        (msgpack.packb({**GOOD, "runs": [["data", True, [[[1], {b"k": 1}]]]]}), "schema"),
        (msgpack.packb({**GOOD, "runs": [["data", True, [[[1]]]]]}), "schema"),
        (msgpack.packb({**GOOD, "runs": [["data", 1, [[1]]]]}), "schema"),
        (msgpack.packb({**GOOD, "runs": [["abc"]]}), "schema"),
        (msgpack.packb({**GOOD, "runs": ["abc"]}), "schema"),
        (msgpack.packb({"v": 1, "k": "state", "state": []}), "schema"),
        (msgpack.packb({"v": 1, "k": "hello", "name": "w", "pid": 0, "epoch": 1,
                        "state": "STOPPED", "down": True}), "schema"),
        (msgpack.packb({"v": 1, "k": "hello", "name": "w", "pid": 1, "epoch": 1,
                        "state": "STOPPED", "down": 1}), "schema"),
    ],
)
def test_decode_refuses_with_reason(frame, reason):
    with pytest.raises(wire.WireError) as info:
        wire.decode(frame)
    assert info.value.reason == reason


def test_decode_refuses_frames_over_the_limit():
    with pytest.raises(wire.WireError) as info:
        wire.decode(b"\xc0" * 5000, max_message=4096)
    assert info.value.reason == "size"


def test_random_bytes_never_escape_as_anything_but_wire_error():
    import random

    rng = random.Random(7)
    for _ in range(5000):
        data = rng.randbytes(rng.randint(0, 64))
        try:
            wire.decode(data)
        except wire.WireError:
            pass
