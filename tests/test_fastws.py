"""The WebSocket fast path: masking, framing and parsing, and the link send path, against
the RFC's definitions and over real sockets."""

import os
import random
import socket
import struct
import threading
import time

import pytest

from gelf import fastws
from gelf.links import QUEUE_MESSAGES, Link
from gelf.stats import Drops


def mask_reference(data, key):
    """RFC 6455 section 5.3, byte by byte."""
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


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


def test_masking_interoperates_with_ws4py():
    """A frame built here parses in ws4py, and ws4py's frames parse here."""
    from ws4py.framing import Frame
    from ws4py.streaming import Stream

    payload = os.urandom(3000)
    stream = Stream(expect_masking=True)
    stream.parser.send(fastws.frame(payload, masked=True))
    assert bytes(stream.has_message and stream.message.data) == payload
    ws4py_frame = Frame(opcode=fastws.OP_BINARY, body=payload, masking_key=b"\x01\x02\x03\x04", fin=1).build()
    assert fastws.FrameReader(True, 10**6).feed(ws4py_frame) == [(fastws.OP_BINARY, payload)]


@pytest.mark.parametrize("masked", [False, True])
def test_reader_handles_any_split_of_the_stream(masked):
    rng = random.Random(5)
    messages = [rng.randbytes(n) for n in (0, 1, 125, 126, 127, 65535, 65536, 70000, 1514)]
    stream = b"".join(fastws.frame(m, masked=masked) for m in messages)
    reader = fastws.FrameReader(expect_masked=masked, max_message=100_000)
    got, pos = [], 0
    while pos < len(stream):
        step = rng.randint(1, 5000)
        got += reader.feed(stream[pos:pos + step])
        pos += step
    assert got == [(fastws.OP_BINARY, m) for m in messages]


def test_fragments_are_reassembled_and_control_frames_pass_between():
    parts = [b"abc", b"def", b"gh"]
    data = (struct.pack("!BB", 0x02, 0x80 | 3) + b"\0\0\0\0" + parts[0]
            + fastws.frame(b"ping!", fastws.OP_PING, masked=True)
            + struct.pack("!BB", 0x00, 0x80 | 3) + b"\0\0\0\0" + parts[1]
            + struct.pack("!BB", 0x80, 0x80 | 2) + b"\0\0\0\0" + parts[2])
    out = fastws.FrameReader(True, 1000).feed(data)
    assert out == [(fastws.OP_PING, b"ping!"), (fastws.OP_BINARY, b"abcdefgh")]


@pytest.mark.parametrize("data, code", [
    (fastws.frame(b"x" * 2000, masked=True), 1009),                        # over max_message
    (struct.pack("!BBQ", 0x82, 0xFF, 2**62), 1009),                         # giant announced length
    (fastws.frame(b"x", masked=False), 1002),                               # server needs masks
    (struct.pack("!BB", 0xC2, 0x80) + b"\0" * 4, 1002),                     # reserved bit
    (struct.pack("!BB", 0x80, 0x80) + b"\0" * 4, 1002),                     # lone continuation
    (struct.pack("!BB", 0x09, 0x80) + b"\0" * 4, 1002),                     # fragmented control
    (struct.pack("!BB", 0x83, 0x80) + b"\0" * 4, 1002),                     # unknown opcode
])
def test_protocol_errors_carry_their_close_code(data, code):
    with pytest.raises(fastws.ProtocolError) as err:
        fastws.FrameReader(expect_masked=True, max_message=1000).feed(data)
    assert err.value.code == code


class PairLink(Link):
    """A link writing into one end of a socketpair."""

    def __init__(self, sock):
        super().__init__("pair", Drops())
        self.sock = sock

    def _socket(self):
        return self.sock


def read_messages(sock, count, timeout=20):
    reader = fastws.FrameReader(expect_masked=False, max_message=1 << 20)
    got = []
    sock.settimeout(timeout)
    while len(got) < count:
        got += [payload for _, payload in reader.feed(sock.recv(1 << 16))]
    return got


def test_every_message_arrives_once_in_order_from_many_threads():
    a, b = socket.socketpair()
    link = PairLink(a)
    link.start()
    per_thread, threads = 400, 4
    sizes = [60, 1514, 9000, 70000]

    def produce(t):
        for i in range(per_thread):
            while link._backlog > QUEUE_MESSAGES // 2:  # pace: this test is about order, not drops
                time.sleep(0.001)
            link.offer(b"%d:%d:" % (t, i) + b"x" * sizes[i % 4])

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    reader = []
    consumer = threading.Thread(target=lambda: reader.extend(read_messages(b, per_thread * threads)))
    consumer.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    consumer.join(30)
    link.stop()
    assert link.drops.snapshot()["queue_full"] == 0
    assert len(reader) == per_thread * threads
    for t in range(threads):  # each producer's messages arrive complete and in its order
        mine = [m for m in reader if m.startswith(b"%d:" % t)]
        assert [int(m.split(b":")[1]) for m in mine] == list(range(per_thread))
        assert all(len(m) == len(b"%d:%d:" % (t, i)) + sizes[i % 4] for i, m in enumerate(mine))
    a.close()
    b.close()


def test_a_stuck_peer_drops_instead_of_growing_or_blocking():
    a, b = socket.socketpair()  # nobody ever reads b
    link = PairLink(a)
    link.start()
    for _ in range(QUEUE_MESSAGES * 4):
        link.offer(b"y" * 65536)  # returns at once even though the socket is full
    assert link.drops.snapshot()["queue_full"] > 0
    assert link._backlog <= QUEUE_MESSAGES
    link.stop()
    a.close()
    b.close()
