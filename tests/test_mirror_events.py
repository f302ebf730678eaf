"""The stream event codec (gelf/mirror/events.py) against docs/mirror.md's bytes, a hand-written
encoder, and garbage: nothing but events.EventError ever comes out of decoding."""

import io
import re

import pytest
from hypothesis import given, settings, strategies as st
from Crypto.Cipher import AES

from gelf import wire
from gelf.mirror import events
from gelf.mirror.events import Event, Kind, TO_CLIENT, TO_SERVER
from helpers import REPO


def doc_example():
    """The worked example's bytes, read from docs/mirror.md (the oracle is the document)."""
    text = (REPO / "docs" / "mirror.md").read_text()
    block = text.split("### Worked example (events)", 1)[1].split("```", 2)[1]
    data = bytearray()
    for line in block.strip().splitlines():
        for token in line.split():
            if not re.fullmatch(r"[0-9a-f]{2}", token):
                break
            data.append(int(token, 16))
    return bytes(data)


EXAMPLE_EVENTS = [
    Event(Kind.OPEN, 1, 1700000000.000001, TO_SERVER,
          events.address(4, ("192.0.2.1", 40000), ("192.0.2.80", 80))),
    Event(Kind.DATA, 1, 1700000000.25, TO_SERVER, b"GET /\r\n"),
    Event(Kind.CLOSE, 1, 1700000000.25, TO_SERVER, b"fin"),
]


def hand_encode(kind, direction, conn, micros, data):
    """An independent encoder: the table in docs/mirror.md, field by field."""
    return (bytes([kind, direction, 0, 0]) + conn.to_bytes(8, "big") + micros.to_bytes(8, "big")
            + len(data).to_bytes(4, "big") + data)


def test_worked_example_encodes_to_the_documented_bytes():
    data = doc_example()
    assert len(data) == 96
    assert events.encode_all(EXAMPLE_EVENTS) == data


def test_worked_example_decodes():
    decoded = events.decode_all(doc_example())
    assert [(e.kind, e.conn, e.direction, e.data) for e in decoded] == \
        [(e.kind, e.conn, e.direction, e.data) for e in EXAMPLE_EVENTS]
    assert [round(e.ts * 1e6) for e in decoded] == [1700000000000001, 1700000000250000, 1700000000250000]
    assert events.parse_address(decoded[0].data) == (4, ("192.0.2.1", 40000), ("192.0.2.80", 80))
    assert decoded[0].kind is Kind.OPEN


def test_ipv6_address_round_trip():
    data = events.address(6, ("2001:db8::1", 5), ("2001:db8::80", 443))
    assert data == bytes([6, 0, 0, 5, 1, 187]) + bytes.fromhex("20010db8" + "00" * 11 + "01") \
        + bytes.fromhex("20010db8" + "00" * 11 + "80")
    assert events.parse_address(data) == (6, ("2001:db8::1", 5), ("2001:db8::80", 443))
    with pytest.raises(ValueError):
        events.address(4, ("2001:db8::1", 5), ("192.0.2.1", 1))


@given(st.lists(st.tuples(st.sampled_from([2]), st.sampled_from([TO_SERVER, TO_CLIENT]),
                          st.integers(0, 2**64 - 1), st.integers(0, 2**63), st.binary(min_size=1, max_size=300)),
                min_size=1, max_size=8))
def test_data_events_match_the_hand_encoder(items):
    expected = b"".join(hand_encode(*item) for item in items)
    built = [Event(Kind.DATA, conn, micros / 1e6, direction, data) for _, direction, conn, micros, data in items]
    decoded = events.decode_all(expected)
    assert [(e.conn, e.direction, e.data) for e in decoded] == [(c, d, x) for _, d, c, _, x in items]
    # encoding goes through float seconds: exact to the microsecond for today's clock values
    if all(m < 2**52 for *_, m, _ in items):
        assert events.encode_all(built) == expected


@pytest.mark.parametrize("mutate, why", [
    (lambda b: b[:-1], "data runs past"),
    (lambda b: b[:10], "truncated"),
    (lambda b: b"\x09" + b[1:], "kind"),
    (lambda b: b[:1] + b"\x01" + b[2:], "direction"),  # OPEN to the client
    (lambda b: b[:2] + b"\x00\x01" + b[4:], "reserved"),
    (lambda b: b[:24] + b"\x05" + b[25:], "family"),
    (lambda b: b"", "no event"),
])
def test_garbage_is_refused(mutate, why):
    with pytest.raises(events.EventError, match=why) as err:
        events.decode_all(mutate(doc_example()))
    assert err.value.reason == "malformed"
    assert isinstance(err.value, wire.WireError)


def test_bad_close_reason_and_empty_data():
    with pytest.raises(events.EventError, match="UTF-8"):
        events.decode_all(hand_encode(3, 0, 1, 0, b"\xff\xfe"))
    with pytest.raises(events.EventError, match="empty DATA"):
        events.decode_all(hand_encode(2, 0, 1, 0, b""))


@settings(max_examples=400)
@given(st.binary(max_size=200))
def test_fuzz_only_event_errors(data):
    try:
        events.decode_all(data)
    except events.EventError:
        pass


@settings(max_examples=200)
@given(st.integers(0, 95), st.integers(0, 255))
def test_fuzz_flipped_example_byte(pos, value):
    data = bytearray(doc_example())
    data[pos] = value
    try:
        events.decode_all(bytes(data))
    except events.EventError:
        pass


def test_chunks_split_large_data():
    big = Event(Kind.DATA, 3, 1.0, TO_SERVER, bytes(range(256)) * 1000)
    parts = events.chunks(big)
    assert all(len(p.data) <= events.CHUNK for p in parts) and len(parts) == 4
    assert b"".join(p.data for p in parts) == big.data


def test_stream_message_plain_and_sealed():
    body = doc_example()
    plain = events.seal(body, 0x0A0B0C0D, 1)
    assert plain[:16] == bytes.fromhex("01020000" "0a0b0c0d" "0000000000000001")
    assert events.unseal(plain)[1] == events.decode_all(body)
    key = bytes(range(16))
    sealed = events.seal(body, 0x0A0B0C0D, 2, wire.Sealer(key))
    assert sealed[2] == wire.FLAG_SEALED
    # a second AES-GCM library opens it: nonce = header bytes 4..16, associated data = header
    cipher = AES.new(key, AES.MODE_GCM, nonce=sealed[4:16])
    cipher.update(sealed[:16])
    assert cipher.decrypt_and_verify(sealed[16:-16], sealed[-16:]) == body
    assert events.unseal(sealed, wire.Sealer(key))[1] == events.decode_all(body)
    reasons = {}
    for data, sealer in ((sealed, wire.Sealer(bytes(16))), (sealed, None), (plain, wire.Sealer(key)),
                         (wire.encode([b"\0" * 60], 1, 1), None), (b"", None)):
        with pytest.raises(wire.WireError) as err:
            events.unseal(data, sealer)
        reasons[err.value.reason] = True
    assert set(reasons) == {"auth", "no_key", "not_sealed", "unknown_type", "empty"}


def test_tap_server_drops_stream_messages():
    """wire.decode, what a gelf tap server runs, refuses TYPE_STREAM as unknown_type."""
    with pytest.raises(wire.WireError) as err:
        wire.decode(events.seal(doc_example(), 1, 1))
    assert err.value.reason == "unknown_type"


def test_record_file_round_trip_and_garbage():
    buf = io.BytesIO()
    events.write_header(buf)
    buf.write(doc_example())
    assert buf.getvalue()[:8] == b"GELFMIR1"
    buf.seek(0)
    assert list(events.read_file(buf)) == events.decode_all(doc_example())
    for bad in (b"GELFMIR2" + doc_example(), b"GELFMIR1" + doc_example()[:-2], b"GELFMIR1\x02\x00"):
        with pytest.raises(events.EventError):
            list(events.read_file(io.BytesIO(bad)))
    assert list(events.read_file(io.BytesIO(b"GELFMIR1"))) == []
