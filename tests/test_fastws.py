"""The WebSocket connection as bytes in, bytes out (no sockets): masking against the RFC's
definition, framing against ws4py's, any split of the stream, and the protocol's own replies.
Autobahn|Testsuite's cases are in test_ws_conformance.py."""

import os
import random
import struct

import pytest

from gelf import fastws
from gelf.fastws import CloseCode, Connection, Event, Opcode, State


def mask_reference(data, key):
    """RFC 6455 section 5.3, byte by byte."""
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def raw_frame(opcode, payload=b"", fin=True, masked=True, rsv=0, key=b"\x37\xfa\x21\x3d"):
    """A frame built by hand from RFC 6455 section 5.2 (independent of fastws.frame)."""
    b0 = (0x80 if fin else 0) | rsv << 4 | opcode
    n = len(payload)
    if n < 126:
        head = bytes([b0, (0x80 if masked else 0) | n])
    elif n < 65536:
        head = bytes([b0, (0x80 if masked else 0) | 126]) + struct.pack("!H", n)
    else:
        head = bytes([b0, (0x80 if masked else 0) | 127]) + struct.pack("!Q", n)
    return head + key + mask_reference(payload, key) if masked else head + payload


def unframe(data):
    """Frames the server sent (unmasked), as (opcode, payload), parsed by hand."""
    out, pos = [], 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert not b1 & 0x80, "a server must not mask"
        n, pos = b1 & 0x7F, pos + 2
        if n == 126:
            (n,), pos = struct.unpack_from("!H", data, pos), pos + 2
        elif n == 127:
            (n,), pos = struct.unpack_from("!Q", data, pos), pos + 8
        out.append((b0 & 0x0F, bytes(data[pos:pos + n])))
        pos += n
    return out


def server(max_message=1 << 20):
    return Connection(client=False, max_message=max_message)


@pytest.mark.parametrize("seed", range(60))
def test_fast_mask_matches_the_rfc_definition(seed):
    rng = random.Random(seed)
    data = rng.randbytes(rng.choice([0, 1, 2, 3, 4, 5, 125, 126, 1514, 2047, 2048, 2049, 2051, 65536, rng.randint(0, 70000)]))
    key = rng.randbytes(4)
    assert fastws.mask(data, key) == mask_reference(data, key)
    assert fastws.mask(fastws.mask(data, key), key) == data
    framed = bytearray(b"head" + data)
    fastws.mask_into(framed, key, start=4)  # in place, after a header
    assert framed == b"head" + mask_reference(data, key)


def test_framing_interoperates_with_ws4py():
    """A frame built here parses in ws4py, and ws4py's frames parse here."""
    from ws4py.framing import Frame
    from ws4py.streaming import Stream

    payload = os.urandom(3000)
    stream = Stream(expect_masking=True)
    stream.parser.send(bytes(Connection(client=True, max_message=10**6).send_binary(payload)))
    assert bytes(stream.has_message and stream.message.data) == payload
    ws4py_frame = Frame(opcode=Opcode.BINARY, body=payload, masking_key=b"\x01\x02\x03\x04", fin=1).build()
    assert server(10**6).receive_data(ws4py_frame) == [(Event.BINARY, payload)]


@pytest.mark.parametrize("client", [False, True])
def test_any_split_of_the_stream_gives_the_same_messages(client):
    rng = random.Random(5)
    messages = [rng.randbytes(n) for n in (0, 1, 125, 126, 127, 65535, 65536, 70000, 1514)]
    stream = b"".join(fastws.frame(m, masked=not client) for m in messages)
    conn = Connection(client=client, max_message=100_000)
    got, pos = [], 0
    while pos < len(stream):
        step = rng.randint(1, 5000)
        got += conn.receive_data(stream[pos:pos + step])
        pos += step
    assert got == [(Event.BINARY, m) for m in messages]
    assert conn.data_to_send() == b"" and conn.state is State.OPEN


def test_fragments_are_reassembled_and_a_ping_between_them_is_answered():
    conn = server(1000)
    data = (raw_frame(Opcode.BINARY, b"abc", fin=False) + raw_frame(Opcode.PING, b"ping!")
            + raw_frame(Opcode.CONT, b"def", fin=False) + raw_frame(Opcode.CONT, b"gh"))
    assert conn.receive_data(data) == [(Event.PING, b"ping!"), (Event.BINARY, b"abcdefgh")]
    assert unframe(conn.data_to_send()) == [(Opcode.PONG, b"ping!")]


def test_a_close_in_gives_a_close_out_with_the_same_code():
    conn = server()
    events = conn.receive_data(raw_frame(Opcode.CLOSE, struct.pack("!H", 1001) + b"bye"))
    assert events == [(Event.CLOSE, (1001, "bye"))]
    assert unframe(conn.data_to_send()) == [(Opcode.CLOSE, struct.pack("!H", 1001))]
    assert conn.state is State.CLOSED and conn.close_code == 1001
    # nothing after the peer's Close is parsed or answered
    assert conn.receive_data(raw_frame(Opcode.PING, b"late")) == [] and conn.data_to_send() == b""


def test_an_empty_close_is_answered_with_an_empty_close():
    conn = server()
    assert conn.receive_data(raw_frame(Opcode.CLOSE)) == [(Event.CLOSE, (CloseCode.NO_STATUS, ""))]
    assert unframe(conn.data_to_send()) == [(Opcode.CLOSE, b"")]


def test_our_close_then_the_peers_reply_completes_the_handshake():
    conn = server()
    ours = conn.send_close(CloseCode.GOING_AWAY, "shutting down")
    assert unframe(ours) == [(Opcode.CLOSE, struct.pack("!H", 1001) + b"shutting down")]
    assert conn.state is State.CLOSING and conn.send_close() == b""  # once only
    assert conn.receive_data(raw_frame(Opcode.PING, b"p")) == [(Event.PING, b"p")]
    assert conn.data_to_send() == b""  # no pong after our Close
    conn.receive_data(raw_frame(Opcode.CLOSE, struct.pack("!H", 1001)))
    assert conn.state is State.CLOSED and conn.data_to_send() == b""


def test_eof_without_a_close_is_abnormal():
    conn = server()
    conn.receive_eof()
    assert conn.state is State.CLOSED and conn.close_code == CloseCode.ABNORMAL


def test_a_client_masks_and_expects_unmasked_frames():
    conn = Connection(client=True, max_message=100)
    data = conn.send_binary(b"hello")
    assert data[1] & 0x80
    key = bytes(data[2:6])
    assert mask_reference(bytes(data[6:]), key) == b"hello"
    assert conn.receive_data(raw_frame(Opcode.BINARY, b"x", masked=True))[0][0] is Event.FAILED


@pytest.mark.parametrize("data, code", [
    (raw_frame(Opcode.BINARY, b"x" * 2000), 1009),                      # over max_message
    (struct.pack("!BBQ", 0x82, 0xFF, 2**62), 1009),                       # giant announced length
    (raw_frame(Opcode.BINARY, b"x", masked=False), 1002),               # a server needs masks
    (raw_frame(Opcode.BINARY, rsv=4), 1002),                            # reserved bit
    (raw_frame(Opcode.CONT), 1002),                                     # lone continuation
    (raw_frame(Opcode.PING, fin=False), 1002),                          # fragmented control
    (raw_frame(3), 1002),                                               # unknown opcode
    (raw_frame(Opcode.PING, b"x" * 126), 1002),                         # control over 125 bytes
    (struct.pack("!BBH", 0x82, 0xFE, 5) + b"\0" * 9, 1002),              # length not minimal
    (struct.pack("!BBQ", 0x82, 0xFF, 2**63) + b"\0" * 4, 1002),          # 64-bit length, top bit
    (raw_frame(Opcode.TEXT, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"), 1007),
    (raw_frame(Opcode.CLOSE, b"\x03"), 1002),                           # 1-byte close body
    (raw_frame(Opcode.CLOSE, struct.pack("!H", 1005)), 1002),           # a code never sent
    (raw_frame(Opcode.CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007),  # reason not UTF-8
])
def test_protocol_errors_fail_the_connection_with_their_code(data, code):
    conn = server(1000)
    events = conn.receive_data(data)
    assert events[-1][0] is Event.FAILED and events[-1][1][0] == code
    (opcode, body), = unframe(conn.data_to_send())
    assert opcode == Opcode.CLOSE and struct.unpack("!H", body[:2])[0] == code
    assert conn.state is State.CLOSED and conn.failed
    assert conn.receive_data(raw_frame(Opcode.BINARY, b"more")) == []  # nothing after a failure


def test_text_is_checked_as_utf8_as_soon_as_it_arrives():
    conn = server()
    good = "κόσμε gelf".encode()
    assert conn.receive_data(raw_frame(Opcode.TEXT, good[:3], fin=False)) == []
    assert conn.receive_data(raw_frame(Opcode.CONT, good[3:])) == [(Event.TEXT, len(good))]
    conn = server()
    # fails on the fragment with the invalid byte, before the message ends
    assert conn.receive_data(raw_frame(Opcode.TEXT, b"ok", fin=False)) == []
    assert conn.receive_data(raw_frame(Opcode.CONT, b"\xf8", fin=False))[0] == \
        (Event.FAILED, (1007, "text message is not UTF-8"))


def test_a_fragmented_message_over_the_limit_fails_before_it_is_all_buffered():
    conn = server(100)
    assert conn.receive_data(raw_frame(Opcode.BINARY, b"a" * 60, fin=False)) == []
    assert conn.receive_data(raw_frame(Opcode.CONT, b"b" * 60, fin=False))[0][1][0] == 1009
