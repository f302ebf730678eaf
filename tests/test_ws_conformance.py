"""RFC 6455 conformance: Autobahn|Testsuite's cases 1-7 and 9, for the server and the dialing client.

Autobahn's fuzzingclient needs Python 2 (and usually Docker); neither is here. So its case list,
read from crossbario/autobahn-testsuite (autobahntestsuite/case/*.py), is written again below as
a table: one Case per Autobahn case, named by its number, with the frames the peer sends and what
RFC 6455 requires of the endpoint. gelf is a binary-only endpoint that does not echo, so where
Autobahn expects an echo the table expects what applies instead: a binary message is taken (and
handed on), a text message is counted as a `text` drop once its UTF-8 is checked, a ping gets a
pong with the same payload, a valid Close gets a Close with the same code, and a connection
that should stay open still answers a probe ping afterwards.

The same table runs three ways:
1. against the sans-I/O fastws.Connection, in both roles (server: masked frames in; client:
   unmasked frames in), delivered all at once, frame by frame and in small chops;
2. over real sockets against a gelf server (a representative subset of every section, as root),
   and against a DialLink in an in-process LinkLoop, dialing a raw server the test runs, which
   does the opening handshake by hand and then writes the case's frames;
3. standard peers: the `websockets` and `wsproto` clients against a gelf server, and a
   `websockets` server dialed by a DialLink, close handshake both ways. Chromium, the third
   standard peer, is covered by the page tests (test_e2e_browser.py, test_page.py).

The oracles are independent of gelf: frames are built and parsed here from RFC 6455 section 5.2,
masking from section 5.3, and UTF-8 validity comes from RFC 3629's table (`utf8_first_invalid`).

Not applicable: Autobahn's sections 10 (auto-fragmentation of sent messages: gelf sends each
message as one frame) and 12/13 (permessage-deflate: gelf negotiates no extension, checked in
test_case_12_13_*). Section 9's sizes (up to 16 MiB) are scaled to gelf's message limit,
wire.max_message(1500), about 128 KiB: messages up to it are taken, bigger ones fail with 1009.
"""

import base64
import hashlib
import os
import signal
import socket
import struct
import threading
import time
from collections import Counter
from typing import NamedTuple, Optional

import pytest

import helpers
import wsclient
from gelf import wire
from gelf.client import DialLink
from gelf.fastws import Connection, Event, State
from gelf.links import LinkSet
from gelf.loop import LinkLoop
from gelf.stats import Drops

WAIT = 30  # seconds: generous bounds for things that must happen (the machine is small and busy)
LIMIT = wire.max_message(1500)  # gelf's message limit at MTU 1500 (131387 bytes)
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
PROBE = b"still open?"

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


# ---------------------------------------------------------------- frames by hand (RFC 6455 5.2, 5.3)

_XOR = [bytes(b ^ k for b in range(256)) for k in range(256)]


def mask_reference(data, key):
    """RFC 6455 section 5.3: octet i is XORed with key[i % 4] (here one stride of four at a time)."""
    out = bytearray(data)
    for i in range(4):
        out[i::4] = bytes(data[i::4]).translate(_XOR[key[i]])
    return bytes(out)


class F(NamedTuple):
    """A frame a peer sends. `length` announces more payload than is sent: a frame cut short,
    for limits that must be enforced from the header alone."""
    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    length: Optional[int] = None


def raw_frame(frame, masked):
    """The frame's bytes: masked as a client sends them, unmasked as a server does."""
    n = len(frame.payload) if frame.length is None else frame.length
    b0 = (0x80 if frame.fin else 0) | frame.rsv << 4 | frame.opcode
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes([b0, bit | n])
    elif n < 65536:
        head = bytes([b0, bit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([b0, bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + frame.payload
    key = os.urandom(4)
    return head + key + mask_reference(frame.payload, key)


def stream(frames, masked):
    return b"".join(raw_frame(f, masked) for f in frames)


class Got(NamedTuple):
    """A frame the endpoint sent, parsed by hand."""
    fin: bool
    rsv: int
    opcode: int
    payload: bytes


def parse_frames(data, masked):
    """(complete frames, the incomplete rest) of what an endpoint sent. A client must mask every
    frame it sends and a server must not (RFC 6455 5.1)."""
    frames, pos = [], 0
    while len(data) - pos >= 2:
        b0, b1 = data[pos], data[pos + 1]
        assert bool(b1 & 0x80) == masked, "frame masked wrongly for its direction: %r" % data[pos:pos + 16]
        n, head = b1 & 0x7F, 2
        if n == 126:
            if len(data) - pos < 4:
                break
            (n,), head = struct.unpack_from("!H", data, pos + 2), 4
        elif n == 127:
            if len(data) - pos < 10:
                break
            (n,), head = struct.unpack_from("!Q", data, pos + 2), 10
        start = pos + head + (4 if masked else 0)
        if len(data) - start < n:
            break
        payload = bytes(data[start:start + n])
        if masked:
            payload = mask_reference(payload, data[start - 4:start])
        frames.append(Got(bool(b0 & 0x80), b0 >> 4 & 7, b0 & 0x0F, payload))
        pos = start + n
    return frames, bytes(data[pos:])


def close_body(code, reason=b""):
    return struct.pack("!H", code) + reason


def replies_of(frames):
    """What an endpoint answered, comparable with a Case's `replies`: ("pong", payload) and
    ("close", code or None). Its own traffic (binary messages from a server's tap, keepalive
    pings) is left out; anything sent after its Close is kept, so that it fails the comparison."""
    out, closed = [], False
    for f in frames:
        assert f.fin and f.rsv == 0, "the endpoint sent a fragment or reserved bits: %r" % (f,)
        if closed:
            out.append(("after close", f.opcode, f.payload))
        elif f.opcode == PONG:
            out.append(("pong", f.payload))
        elif f.opcode == CLOSE:
            assert len(f.payload) != 1 and len(f.payload) <= 125, "invalid Close body %r" % f.payload
            f.payload[2:].decode("utf-8")  # the reason must be UTF-8 (RFC 6455 5.5.1)
            out.append(("close", struct.unpack("!H", f.payload[:2])[0] if f.payload else None))
            closed = True
        elif f.opcode not in (BINARY, PING):
            out.append(("frame", f.opcode, f.payload))
    return out


# ---------------------------------------------------------------- UTF-8 by hand (RFC 3629, section 4)

_TAIL = (0x80, 0xBF)


def _continuations(lead):
    """The byte ranges that must follow `lead` in UTF-8, or None if it can never start a character."""
    if lead <= 0x7F:
        return []
    if 0xC2 <= lead <= 0xDF:
        return [_TAIL]
    if lead == 0xE0:
        return [(0xA0, 0xBF), _TAIL]
    if 0xE1 <= lead <= 0xEC or 0xEE <= lead <= 0xEF:
        return [_TAIL, _TAIL]
    if lead == 0xED:
        return [(0x80, 0x9F), _TAIL]  # not U+D800-U+DFFF, the UTF-16 surrogates
    if lead == 0xF0:
        return [(0x90, 0xBF), _TAIL, _TAIL]
    if 0xF1 <= lead <= 0xF3:
        return [_TAIL, _TAIL, _TAIL]
    if lead == 0xF4:
        return [(0x80, 0x8F), _TAIL, _TAIL]  # not above U+10FFFF
    return None


def utf8_first_invalid(data):
    """None if `data` is UTF-8; else the index of the first byte no UTF-8 text can have there
    (len(data) if the text is only cut short): where a fail-fast decoder fails."""
    i = 0
    while i < len(data):
        ranges = _continuations(data[i])
        if ranges is None:
            return i
        for k, (lo, hi) in enumerate(ranges, 1):
            if i + k == len(data):
                return len(data)
            if not lo <= data[i + k] <= hi:
                return i + k
        i += 1 + len(ranges)
    return None


# ---------------------------------------------------------------- the case table

class Case(NamedTuple):
    key: str  # Autobahn's case number; gelf's own additions carry a suffix ("9.2/limit")
    name: str
    frames: tuple  # what the peer sends, in order
    messages: tuple  # what the endpoint takes: ("binary", payload) or ("text", size in bytes)
    replies: tuple  # what it answers: ("pong", payload), ("close", code)
    ends: Optional[str]  # None: stays open; "close": the peer's Close is answered; "fail": failed
    at: Optional[int]  # the frame on whose arrival it fails (fail fast)
    late: Optional[int]  # a later frame it may fail on instead (see utf8_case)
    chop: object  # how Autobahn writes it: 0 all at once, "frame" frame by frame, n bytes at a time

    @property
    def id(self):
        return "%s-%s" % (self.key.replace("/", "_"), "-".join(self.name.split()))

    @property
    def code(self):
        return self.replies[-1][1] if self.ends else None


def B(payload):
    return ("binary", payload)


def T(payload):
    return ("text", len(payload))


CASES = {}


def _add(key, name, frames, messages, replies, ends, at, chop, late=None):
    assert key not in CASES, key
    CASES[key] = Case(key, name, tuple(frames), tuple(messages), tuple(replies), ends, at, late, chop)


def ok(key, name, frames, messages=(), pongs=(), chop=0):
    """The endpoint takes the messages, answers the pings and stays open."""
    _add(key, name, frames, messages, [("pong", p) for p in pongs], None, None, chop)


def fail(key, name, frames, code, at, messages=(), pongs=(), chop=0, late=None):
    """The endpoint fails the connection with `code` when frame `at` arrives: its Close, then nothing."""
    _add(key, name, frames, messages, [("pong", p) for p in pongs] + [("close", code)], "fail", at, chop, late)


def echo(key, name, frames, code, messages=(), chop=0):
    """The endpoint answers the peer's Close with its code (none for an empty Close)."""
    _add(key, name, frames, messages, [("close", code)], "close", None, chop)


HELLO = b"Hello, world!"
STAR, FE = b"*", b"\xfe"  # Autobahn's payload bytes; 0xFE is never a gelf message's version byte
SIZES = (0, 125, 126, 127, 128, 65535, 65536)

# 1 Framing: text and binary messages of every length encoding, in one write or in chops.
for i, n in enumerate(SIZES, 1):
    ok("1.1.%d" % i, "text message of %d bytes" % n, [F(TEXT, STAR * n)], [T(STAR * n)])
    ok("1.2.%d" % i, "binary message of %d bytes" % n, [F(BINARY, FE * n)], [B(FE * n)])
ok("1.1.8", "text message of 65536 bytes in chops of 997", [F(TEXT, STAR * 65536)], [T(STAR * 65536)], chop=997)
ok("1.2.8", "binary message of 65536 bytes in chops of 997", [F(BINARY, FE * 65536)], [B(FE * 65536)], chop=997)

# 2 Pings and pongs.
BIN8 = b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff"
ok("2.1", "ping without payload", [F(PING)], pongs=[b""])
ok("2.2", "ping with text payload", [F(PING, HELLO)], pongs=[HELLO])
ok("2.3", "ping with binary payload", [F(PING, BIN8)], pongs=[BIN8])
ok("2.4", "ping with 125 byte payload", [F(PING, FE * 125)], pongs=[FE * 125])
fail("2.5", "ping with 126 byte payload fails 1002", [F(PING, FE * 126)], 1002, at=0)
ok("2.6", "ping with 125 byte payload in chops of 1", [F(PING, FE * 125)], pongs=[FE * 125], chop=1)
ok("2.7", "unsolicited pong without payload is ignored", [F(PONG)])
ok("2.8", "unsolicited pong with payload is ignored", [F(PONG, b"unsolicited pong payload")])
ok("2.9", "unsolicited pong then ping", [F(PONG, b"unsolicited pong payload"), F(PING, b"ping payload")],
   pongs=[b"ping payload"])
TEN = [b"payload-%d" % i for i in range(10)]
ok("2.10", "10 pings get 10 pongs", [F(PING, p) for p in TEN], pongs=TEN)
ok("2.11", "10 pings in chops of 1 get 10 pongs", [F(PING, p) for p in TEN], pongs=TEN, chop=1)

# 3 Reserved bits: no extension was negotiated, so any RSV bit fails the connection, and
# frames behind the bad one are not acted on.
fail("3.1", "text with RSV 1 fails 1002", [F(TEXT, HELLO, rsv=1)], 1002, at=0)
fail("3.2", "text then text with RSV 2 then ping", [F(TEXT, HELLO), F(TEXT, HELLO, rsv=2), F(PING, HELLO)],
     1002, at=1, messages=[T(HELLO)])
fail("3.3", "text then text with RSV 3 then ping frame by frame",
     [F(TEXT, HELLO), F(TEXT, HELLO, rsv=3), F(PING, HELLO)], 1002, at=1, messages=[T(HELLO)], chop="frame")
fail("3.4", "text then text with RSV 4 then ping in chops of 1",
     [F(TEXT, HELLO), F(TEXT, HELLO, rsv=4), F(PING, HELLO)], 1002, at=1, messages=[T(HELLO)], chop=1)
fail("3.5", "binary with RSV 5 fails 1002", [F(BINARY, BIN8, rsv=5)], 1002, at=0)
fail("3.6", "ping with RSV 6 fails 1002 without pong", [F(PING, HELLO, rsv=6)], 1002, at=0)
fail("3.7", "close with RSV 7 fails 1002", [F(CLOSE, close_body(1000), rsv=7)], 1002, at=0)

# 4 Reserved opcodes: 3-7 (data) and 0xB-0xF (control) fail the connection.
for section, opcodes in (("4.1", (3, 4, 5, 6, 7)), ("4.2", (11, 12, 13, 14, 15))):
    a, b, c, d, e = opcodes
    fail(section + ".1", "opcode %d fails 1002" % a, [F(a)], 1002, at=0)
    fail(section + ".2", "opcode %d with payload fails 1002" % b, [F(b, b"reserved opcode payload")], 1002, at=0)
    fail(section + ".3", "text then opcode %d then ping" % c, [F(TEXT, HELLO), F(c), F(PING, HELLO)],
         1002, at=1, messages=[T(HELLO)])
    fail(section + ".4", "text then opcode %d with payload then ping" % d,
         [F(TEXT, HELLO), F(d, b"reserved opcode payload"), F(PING, HELLO)], 1002, at=1, messages=[T(HELLO)])
    fail(section + ".5", "text then opcode %d then ping in chops of 1" % e,
         [F(TEXT, HELLO), F(e, b"reserved opcode payload"), F(PING, HELLO)], 1002, at=1,
         messages=[T(HELLO)], chop=1)

# 5 Fragmentation.
FRAG = [F(TEXT, b"fragment1", fin=False), F(CONT, b"fragment2")]
WITH_PING = [FRAG[0], F(PING, b"ping payload"), FRAG[1]]
fail("5.1", "fragmented ping fails 1002", [F(PING, b"fragment1", fin=False), F(CONT, b"fragment2")], 1002, at=0)
fail("5.2", "fragmented pong fails 1002", [F(PONG, b"fragment1", fin=False), F(CONT, b"fragment2")], 1002, at=0)
for key, chop, how in (("5.3", 0, ""), ("5.4", "frame", " frame by frame"), ("5.5", 1, " in chops of 1")):
    ok(key, "text in 2 fragments" + how, FRAG, [T(b"fragment1fragment2")], chop=chop)
for key, chop, how in (("5.6", 0, ""), ("5.7", "frame", " frame by frame"), ("5.8", 1, " in chops of 1")):
    ok(key, "text in 2 fragments with a ping between" + how, WITH_PING, [T(b"fragment1fragment2")],
       pongs=[b"ping payload"], chop=chop)
for first, fin in ((9, True), (12, False)):
    for key, chop, how in ((first, 0, ""), (first + 1, "frame", " frame by frame"), (first + 2, 1, " in chops of 1")):
        fail("5.%d" % key, "continuation with FIN %s and nothing to continue then text%s" % (fin, how),
             [F(CONT, b"non-continuation payload", fin=fin), F(TEXT, HELLO)], 1002, at=0, chop=chop)
fail("5.15", "text in 2 fragments then continuation with nothing to continue",
     FRAG + [F(CONT, b"fragment3", fin=False), F(TEXT, b"fragment4")], 1002, at=2,
     messages=[T(b"fragment1fragment2")])
for key, fin in (("5.16", False), ("5.17", True)):
    fail(key, "continuation with FIN %s first then a fragmented text twice" % fin,
         [F(CONT, b"fragment1", fin=fin), F(TEXT, b"fragment2", fin=False), F(CONT, b"fragment3")] * 2,
         1002, at=0)
fail("5.18", "text in 2 fragments both with opcode text fails 1002",
     [F(TEXT, b"fragment1", fin=False), F(TEXT, b"fragment2")], 1002, at=1)
FIVE = [b"fragment%d" % i for i in range(1, 6)]
NINETEEN = [F(TEXT, FIVE[0], fin=False), F(CONT, FIVE[1], fin=False), F(PING, b"pongme 1!"),
            F(CONT, FIVE[2], fin=False), F(CONT, FIVE[3], fin=False), F(PING, b"pongme 2!"), F(CONT, FIVE[4])]
ok("5.19", "text in 5 fragments with 2 pings between", NINETEEN, [T(b"".join(FIVE))],
   pongs=[b"pongme 1!", b"pongme 2!"])
ok("5.20", "text in 5 fragments with 2 pings between frame by frame", NINETEEN, [T(b"".join(FIVE))],
   pongs=[b"pongme 1!", b"pongme 2!"], chop="frame")


# 6 UTF-8 in text messages: valid text is taken, invalid text fails with 1007, on the fragment
# that makes it invalid (fail fast: the fragments before it are not enough to know).
def octet_frames(payload):
    """A text message in fragments of one byte each."""
    return [F(TEXT if i == 0 else CONT, payload[i:i + 1], fin=i == len(payload) - 1) for i in range(len(payload))]


def utf8_case(key, name, frames, chop=0):
    """A text message: taken if its bytes are UTF-8, else failed with 1007 on the first fragment
    that holds an invalid byte (or, if the text is only cut short, on the last one).

    One exception: CPython's UTF-8 decoder (which fastws uses) rejects a UTF-16 surrogate
    (ED A0-BF ..) when it has the whole 3-byte sequence, one byte after a strict decoder could.
    RFC 6455 8.1 asks only that invalid text fails the connection, and Autobahn rates a later
    failure as passing (non-strict), so the fragment with that third byte is allowed too."""
    payload = b"".join(f.payload for f in frames)
    bad = utf8_first_invalid(payload)
    if bad is None:
        ok(key, name, frames, [T(payload)], chop=chop)
        return
    ends, seen = [], 0
    for f in frames:
        seen += len(f.payload)
        ends.append(seen)

    def frame_of(index):
        return next(i for i, end in enumerate(ends) if end > min(index, len(payload) - 1))

    surrogate = 0 < bad < len(payload) and payload[bad - 1] == 0xED and 0xA0 <= payload[bad] <= 0xBF
    fail(key, name, frames, 1007, at=frame_of(bad), late=frame_of(bad + 1) if surrogate else None, chop=chop)


KOSME = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5"  # "κόσμε", with U+1F79 for its ό
UMLAUTS = "Hello-µ@ßöäüàá-UTF-8!!".encode()
SURROGATE = KOSME + b"\xed\xa0\x80" + b"edited"  # U+D800 in the middle
OUT_OF_RANGE = KOSME + b"\xf4\x90\x80\x80" + b"edited"  # U+110000 in the middle
ok("6.1.1", "text of 0 bytes", [F(TEXT)], [T(b"")])
ok("6.1.2", "text in 3 empty fragments", [F(TEXT, fin=False), F(CONT, fin=False), F(CONT)], [T(b"")])
ok("6.1.3", "text in 3 fragments with an empty first and last",
   [F(TEXT, fin=False), F(CONT, b"middle frame payload", fin=False), F(CONT)], [T(b"middle frame payload")])
utf8_case("6.2.1", "valid UTF-8 in one frame", [F(TEXT, UMLAUTS)])
utf8_case("6.2.2", "valid UTF-8 in 2 fragments split between characters",
          [F(TEXT, UMLAUTS[:8], fin=False), F(CONT, UMLAUTS[8:])])
utf8_case("6.2.3", "valid UTF-8 in 1 byte fragments", octet_frames(UMLAUTS))
utf8_case("6.2.4", "valid UTF-8 in 1 byte fragments split inside characters", octet_frames(KOSME))
utf8_case("6.3.1", "invalid UTF-8 in one frame fails 1007", [F(TEXT, SURROGATE)])
utf8_case("6.3.2", "invalid UTF-8 in 1 byte fragments fails 1007", octet_frames(SURROGATE))
utf8_case("6.4.1", "invalid code point in the 2nd of 3 fragments fails on it",
          [F(TEXT, KOSME, fin=False), F(CONT, OUT_OF_RANGE[11:15], fin=False), F(CONT, OUT_OF_RANGE[15:])])
utf8_case("6.4.2", "the byte that makes the text invalid alone in the 2nd fragment fails on it",
          [F(TEXT, OUT_OF_RANGE[:12], fin=False), F(CONT, OUT_OF_RANGE[12:13], fin=False),
           F(CONT, OUT_OF_RANGE[13:])])
# 6.4.3/6.4.4 write one frame in chops: fastws unmasks and checks a frame once it is whole, so it
# fails when the frame is complete, which Autobahn rates as passing (non-strict), not sooner.
utf8_case("6.4.3", "invalid code point in one frame written in chops of 5", [F(TEXT, OUT_OF_RANGE)], chop=5)
utf8_case("6.4.4", "invalid code point in one frame written in chops of 1", [F(TEXT, OUT_OF_RANGE)], chop=1)

# 6.5-6.23: Markus Kuhn's UTF-8 decoder stress test, as Autobahn groups and numbers it
# (case6_x_x.py). Each text goes in one frame (Autobahn's case) and in 1-byte fragments (gelf's
# addition, "/octets"), so every sequence is also split at every byte.
CUT_SHORT = [b"\xc0", b"\xe0\x80", b"\xf0\x80\x80", b"\xf8\x80\x80\x80", b"\xfc\x80\x80\x80\x80",
             b"\xdf", b"\xef\xbf", b"\xf7\xbf\xbf", b"\xfb\xbf\xbf\xbf", b"\xfd\xbf\xbf\xbf\xbf"]
HIGH_SURROGATES = [b"\xed\xa0\x80", b"\xed\xad\xbf", b"\xed\xae\x80", b"\xed\xaf\xbf"]
LOW_SURROGATES = [b"\xed\xb0\x80", b"\xed\xbe\x80", b"\xed\xbf\xbf"]
NONCHARACTERS = [b"\xef\xbf\xbe", b"\xef\xbf\xbf"] + [
    bytes([lead, second, 0xBF, last])
    for lead in (0xF0, 0xF1, 0xF2, 0xF3, 0xF4) for second in (0x8F, 0x9F, 0xAF, 0xBF)
    if not (lead == 0xF4 and second != 0x8F) and not (lead == 0xF0 and second == 0x8F)
    for last in (0xBE, 0xBF)]
UTF8_GROUPS = [
    ("6.5", "valid UTF-8", [b"hello\x24world", b"hello\xc2\xa2world", b"hello\xe2\x82\xacworld",
                            b"hello\xf0\xa4\xad\xa2world", KOSME]),
    ("6.6", "prefix of valid UTF-8", [KOSME[:i] for i in range(1, len(KOSME) + 1)]),
    ("6.7", "first sequence of its length", [b"\x00", b"\xc2\x80", b"\xe0\xa0\x80", b"\xf0\x90\x80\x80"]),
    ("6.8", "first 5 or 6 byte sequence", [b"\xf8\x88\x80\x80\x80", b"\xfc\x84\x80\x80\x80\x80"]),
    ("6.9", "last sequence of its length", [b"\x7f", b"\xdf\xbf", b"\xef\xbf\xbf", b"\xf4\x8f\xbf\xbf"]),
    ("6.10", "last 4 5 or 6 byte sequence",
     [b"\xf7\xbf\xbf\xbf", b"\xfb\xbf\xbf\xbf\xbf", b"\xfd\xbf\xbf\xbf\xbf\xbf"]),
    ("6.11", "boundary",
     [b"\xed\x9f\xbf", b"\xee\x80\x80", b"\xef\xbf\xbd", b"\xf4\x8f\xbf\xbf", b"\xf4\x90\x80\x80"]),
    ("6.12", "unexpected continuation bytes",
     [b"\x80", b"\xbf"] + [b"\x80\xbf\x80\xbf\x80\xbf"[:n] for n in range(2, 7)] + [bytes(range(0x80, 0xBF))]),
    ("6.13", "lonely start bytes", [b"".join(bytes([b, 0x20]) for b in range(lo, hi))
                                    for lo, hi in ((0xC0, 0xDF), (0xE0, 0xEF), (0xF0, 0xF7), (0xF8, 0xFB),
                                                   (0xFC, 0xFD))]),
    ("6.14", "last continuation byte missing", CUT_SHORT),
    ("6.15", "incomplete sequences concatenated", [b"".join(CUT_SHORT)]),
    ("6.16", "impossible bytes", [b"\xfe", b"\xff", b"\xfe\xfe\xff\xff"]),
    ("6.17", "overlong slash", [b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf", b"\xf8\x80\x80\x80\xaf",
                                b"\xfc\x80\x80\x80\x80\xaf"]),
    ("6.18", "maximum overlong sequence", [b"\xc1\xbf", b"\xe0\x9f\xbf", b"\xf0\x8f\xbf\xbf",
                                          b"\xf8\x87\xbf\xbf\xbf", b"\xfc\x83\xbf\xbf\xbf\xbf"]),
    ("6.19", "overlong NUL", [b"\xc0\x80", b"\xe0\x80\x80", b"\xf0\x80\x80\x80", b"\xf8\x80\x80\x80\x80",
                              b"\xfc\x80\x80\x80\x80\x80"]),
    ("6.20", "single UTF-16 surrogate", HIGH_SURROGATES + LOW_SURROGATES),
    ("6.21", "paired UTF-16 surrogates",
     [high + low for high in HIGH_SURROGATES for low in (LOW_SURROGATES[0], LOW_SURROGATES[-1])]),
    ("6.22", "noncharacter", NONCHARACTERS),
    ("6.23", "special", [b"\xef\xbf" + bytes([b]) for b in range(0xB9, 0xC0)]),
]
for group, what, texts in UTF8_GROUPS:
    for j, text in enumerate(texts, 1):
        verdict = "valid" if utf8_first_invalid(text) is None else "invalid"
        utf8_case("%s.%d" % (group, j), "%s %s in one frame" % (verdict, what), [F(TEXT, text)])
        utf8_case("%s.%d/octets" % (group, j), "%s %s in 1 byte fragments" % (verdict, what), octet_frames(text))

# 7 Closing. The endpoint answers a valid Close with a Close carrying the same code (none for
# an empty one), reads nothing after it, and fails on an invalid Close.
BYE = close_body(1000)
echo("7.1.1", "text then close", [F(TEXT, HELLO), F(CLOSE, BYE)], 1000, messages=[T(HELLO)])
echo("7.1.2", "close twice is answered once", [F(CLOSE, BYE), F(CLOSE, BYE)], 1000)
echo("7.1.3", "ping after close is not answered", [F(CLOSE, BYE), F(PING, HELLO)], 1000)
echo("7.1.4", "text after close is not taken", [F(CLOSE, BYE), F(TEXT, HELLO)], 1000)
echo("7.1.5", "close between two fragments ends the message",
     [F(TEXT, b"fragment1", fin=False), F(CLOSE, BYE), F(CONT, b"fragment2")], 1000)
# Autobahn sends 256 KiB of text here; gelf's limit is about 128 KiB, so the message is as big
# as gelf takes, and binary (a binary message is what gelf hands on).
echo("7.1.6", "message at the limit then text then close then ping",
     [F(BINARY, FE * LIMIT), F(TEXT, HELLO), F(CLOSE, BYE), F(PING)], 1000, messages=[B(FE * LIMIT), T(HELLO)])
echo("7.3.1", "close without payload is answered without payload", [F(CLOSE)], None)
fail("7.3.2", "close with 1 byte payload fails 1002", [F(CLOSE, b"\x03")], 1002, at=0)
echo("7.3.3", "close with code", [F(CLOSE, BYE)], 1000)
echo("7.3.4", "close with code and reason", [F(CLOSE, close_body(1000, b"Hello World!"))], 1000)
echo("7.3.5", "close with a 123 byte reason", [F(CLOSE, close_body(1000, STAR * 123))], 1000)
fail("7.3.6", "close with a 124 byte reason fails 1002", [F(CLOSE, close_body(1000, STAR * 124))], 1002, at=0)
fail("7.5.1", "close reason not UTF-8 fails 1007", [F(CLOSE, close_body(1000, SURROGATE))], 1007, at=0)
for j, code in enumerate((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999), 1):
    echo("7.7.%d" % j, "valid close code %d is answered" % code, [F(CLOSE, close_body(code))], code)
# Autobahn's list of valid codes stops at 1011. 1012-1014 were registered with IANA after RFC
# 6455 (service restart, try again later, bad gateway); websockets and wsproto accept them, and
# so does gelf. Older Autobahn versions listed them (and 1015) among the invalid codes.
for code in (1012, 1013, 1014):
    echo("7.7/%d" % code, "IANA close code %d is answered" % code, [F(CLOSE, close_body(code))], code)
for j, code in enumerate((0, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999), 1):
    fail("7.9.%d" % j, "invalid close code %d fails 1002" % code, [F(CLOSE, close_body(code))], 1002, at=0)
# 1015 (TLS handshake failure) is, like 1005 and 1006, reserved for reports and never sent.
fail("7.9/1015", "reserved close code 1015 fails 1002", [F(CLOSE, close_body(1015))], 1002, at=0)
# 7.13: codes above 4999; "undefined by the spec" for Autobahn, a protocol error for gelf.
fail("7.13.1", "close code 5000 fails 1002", [F(CLOSE, close_body(5000))], 1002, at=0)
fail("7.13.2", "close code 65535 fails 1002", [F(CLOSE, close_body(65535))], 1002, at=0)

# 9 Limits, scaled to gelf's limit. Autobahn's messages of 256 KiB to 16 MiB are over it: the
# endpoint must fail with 1009 from the frame header alone, so the payload is not even sent.
OVER = (256 << 10, 1 << 20, 4 << 20, 8 << 20, 16 << 20)
for section, opcode, byte, kind in (("9.1", TEXT, STAR, T), ("9.2", BINARY, FE, B)):
    what = "text" if opcode == TEXT else "binary"
    ok(section + ".1", "%s message of 64 KiB" % what, [F(opcode, byte * 65536)], [kind(byte * 65536)])
    for j, n in enumerate(OVER, 2):
        fail("%s.%d" % (section, j), "%s message of %d KiB fails 1009 from its header" % (what, n >> 10),
             [F(opcode, length=n)], 1009, at=0)
    ok(section + "/limit", "%s message at the limit" % what, [F(opcode, byte * LIMIT)], [kind(byte * LIMIT)])
    fail(section + "/limit+1", "%s message 1 byte over the limit fails 1009" % what,
         [F(opcode, byte * (LIMIT + 1))], 1009, at=0)


def fragments(opcode, payload, size):
    parts = [payload[i:i + size] for i in range(0, len(payload), size)] or [b""]
    return [F(opcode if i == 0 else CONT, part, fin=i == len(parts) - 1) for i, part in enumerate(parts)]


for section, opcode, byte, kind in (("9.3", TEXT, STAR, T), ("9.4", BINARY, FE, B)):
    what = "text" if opcode == TEXT else "binary"
    big = byte * LIMIT
    for j, size in enumerate((64, 256, 1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20), 1):
        ok("%s.%d" % (section, j), "%s message at the limit in fragments of %d bytes" % (what, size),
           fragments(opcode, big, size), [kind(big)])
    over = fragments(opcode, byte * (LIMIT + 1), 64 << 10)
    fail(section + "/over", "%s message over the limit in 64 KiB fragments fails 1009" % what,
         over, 1009, at=len(over) - 1)
# Fragments whose sum crosses the limit: the endpoint must fail on the header of the fragment that
# crosses it, before it buffers that fragment (the last one here: it would hold the whole message).
fail("9.4/cut", "binary fragment crossing the limit fails 1009 from its header",
     [F(BINARY, FE * 65536, fin=False), F(CONT, FE * 65536, fin=False), F(CONT, length=65536)], 1009, at=2)
for section, opcode, byte, kind in (("9.5", TEXT, STAR, T), ("9.6", BINARY, FE, B)):
    what = "text" if opcode == TEXT else "binary"
    for j, chop in enumerate((64, 128, 256, 512, 1024, 2048), 1):
        ok("%s.%d" % (section, j), "%s message at the limit in chops of %d" % (what, chop),
           [F(opcode, byte * LIMIT)], [kind(byte * LIMIT)], chop=chop)
for section, opcode, byte, kind in (("9.7", TEXT, STAR, T), ("9.8", BINARY, FE, B)):
    what = "text" if opcode == TEXT else "binary"
    for j, size in enumerate((0, 16, 64, 256, 1024, 4096), 1):
        ok("%s.%d" % (section, j), "1000 %s messages of %d bytes" % (what, size),
           [F(opcode, byte * size)] * 1000, [kind(byte * size)] * 1000)


def cases(*keys):
    return [pytest.param(CASES[k], id=CASES[k].id) for k in keys]


ALL = cases(*CASES)


# ---------------------------------------------------------------- 1. the sans-I/O connection

def deliveries(case, masked):
    """The case's bytes in three deliveries: at once, frame by frame, and in chops (Autobahn's
    own chop size, else 1 byte, or 997 bytes for big streams)."""
    frames = [raw_frame(f, masked) for f in case.frames]
    data = b"".join(frames)
    size = case.chop if isinstance(case.chop, int) and case.chop else (1 if len(data) <= 8192 else 997)
    return {"whole": [data], "frames": frames, "chopped": [data[i:i + size] for i in range(0, len(data), size)]}


def took(events):
    out = []
    for kind, value in events:
        if kind is Event.BINARY:
            out.append(("binary", bytes(value)))
        elif kind is Event.TEXT:
            out.append(("text", value))
    return out


@pytest.mark.parametrize("delivery", ["whole", "frames", "chopped"])
@pytest.mark.parametrize("role", ["server", "client"])
@pytest.mark.parametrize("case", ALL)
def test_case_sans_io(case, role, delivery):
    """Bytes in, events and bytes out: what the endpoint takes and answers, and whether it stays open."""
    client = role == "client"
    conn = Connection(client=client, max_message=LIMIT)
    events, out = [], bytearray()
    for i, chunk in enumerate(deliveries(case, masked=not client)[delivery]):
        got = conn.receive_data(chunk)
        out += conn.data_to_send()
        if delivery == "frames" and case.ends == "fail":  # fail fast: on frame `at`, not before
            failed = any(kind is Event.FAILED for kind, _ in got)
            assert not failed or i in (case.at, case.late), "failed on frame %d, not %d" % (i, case.at)
        events += got
    frames, rest = parse_frames(out, masked=client)
    assert rest == b""
    assert took(events) == list(case.messages)
    assert replies_of(frames) == list(case.replies)
    probe = conn.receive_data(raw_frame(F(PING, PROBE), masked=not client))
    answer = conn.data_to_send()
    if case.ends is None:
        assert conn.state is State.OPEN and probe == [(Event.PING, PROBE)]
        assert parse_frames(answer, masked=client)[0] == [Got(True, 0, PONG, PROBE)]
        return
    assert conn.state is State.CLOSED and probe == [] and answer == b""  # nothing after a Close
    kind, (code, _) = events[-1]
    assert kind is (Event.FAILED if case.ends == "fail" else Event.CLOSE)
    if case.ends == "fail":
        assert code == case.code
    else:  # the peer's code, or 1005 ("no status") for an empty Close
        assert code == (1005 if case.code is None else case.code)


def test_the_utf8_oracle_agrees_with_autobahns_labels():
    """The groups Autobahn labels all valid or all invalid (case6_x_x.py) agree with the oracle."""
    valid = {"6.5", "6.7", "6.9", "6.22", "6.23"}
    invalid = {"6.8", "6.10", "6.12", "6.13", "6.14", "6.15", "6.16", "6.17", "6.18", "6.19", "6.20", "6.21"}
    for group, _, texts in UTF8_GROUPS:
        verdicts = {utf8_first_invalid(t) is None for t in texts}
        if group in valid:
            assert verdicts == {True}, group
        if group in invalid:
            assert verdicts == {False}, group
    assert [utf8_first_invalid(KOSME[:i]) is None for i in range(1, 12)] == \
        [False, True, False, False, True, False, True, False, True, False, True]  # 6.6.x
    assert [utf8_first_invalid(t) is None for t in UTF8_GROUPS[6][2]] == [True, True, True, True, False]  # 6.11.x
    assert len(NONCHARACTERS) == 34  # 6.22.1-6.22.34


# ---------------------------------------------------------------- real sockets: a peer by hand

class Peer:
    """The test's end of a real socket: writes crafted bytes, reads the frames the endpoint sends
    (masked if the endpoint is a client) until a condition holds or it closes the connection."""

    def __init__(self, sock, masked):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # chops go out as chops
        self.sock = sock
        self.masked = masked
        self.frames = []
        self.eof = None  # "fin" or "reset" once the endpoint closed the connection
        self._rest = b""

    def send(self, data):
        try:
            self.sock.sendall(data)
        except OSError:
            pass  # the endpoint failed the connection part way: what it answered is still there

    def send_case(self, case, frames=None):
        frames = case.frames if frames is None else frames
        if case.chop == "frame":
            for f in frames:
                self.send(raw_frame(f, not self.masked))
            return
        data = stream(frames, not self.masked)
        size = case.chop or len(data) or 1
        for i in range(0, len(data), size):
            self.send(data[i:i + size])

    def read_until(self, pred, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while not pred() and self.eof is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the endpoint sent %r" % (replies_of(self.frames),))
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 18)
            except ConnectionResetError:
                data, self.eof = b"", "reset"
            if not data:
                self.eof = self.eof or "fin"
                break
            frames, self._rest = parse_frames(self._rest + data, self.masked)
            self.frames += frames

    def replies(self):
        return replies_of(self.frames)

    def closed(self):
        return any(r[0] == "close" for r in self.replies())

    def probe(self):
        """Send a ping; its pong proves the connection is open and everything before it was read."""
        self.send(raw_frame(F(PING, PROBE), not self.masked))
        self.read_until(lambda: ("pong", PROBE) in self.replies())
        replies = self.replies()
        assert replies and replies[-1] == ("pong", PROBE), replies
        self.frames = [f for f in self.frames if (f.opcode, f.payload) != (PONG, PROBE)]

    def quiet(self, seconds):
        """True if the endpoint sends nothing and keeps the connection for `seconds`."""
        self.sock.settimeout(seconds)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            return True
        except OSError:
            pass
        return False


def exchange(peer, case, endpoint_closes_tcp):
    """Play the case; read the answers up to the Close (then to the end of the connection if the
    endpoint is to close it), or up to the pong to a probe ping if it should stay open."""
    peer.send_case(case)
    if case.ends is None:
        peer.probe()
    else:
        peer.read_until(peer.closed)
        if endpoint_closes_tcp or case.ends == "fail":
            peer.read_until(lambda: False)
    assert peer.replies() == list(case.replies)


# ---------------------------------------------------------------- 2a. a real gelf server

@pytest.fixture(scope="module")
def shared_server(need_root, tmp_path_factory):
    """One gelf server for the module's server cases (starting one per case would take minutes)."""
    srv = helpers.GelfServer(helpers.tap_name(), helpers.free_port(), log_dir=tmp_path_factory.mktemp("conformance"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def server(request, need_root, shared_server):
    request.node._gelf_servers = [shared_server]  # conftest puts its log in a failing test's report
    assert shared_server.alive(), "the shared gelf server died:\n" + shared_server.log_text()
    return shared_server


def link_of(server, name):
    return next((link for link in server.stats()["links"] if link["peer"] == name), None)


COUNTED = ("text", "empty", "malformed", "oversize")


def expected_drops(case):
    """How the server counts the case's messages: text is dropped as `text`; the table's binary
    messages are not gelf messages, so they reach the data path and are dropped as `empty` or
    `malformed` there; a failure counts as `oversize` (1009) or `malformed`."""
    expected = Counter()
    for kind, value in case.messages:
        expected["text" if kind == "text" else "empty" if not value else "malformed"] += 1
    if case.ends == "fail":
        expected["oversize" if case.code == 1009 else "malformed"] += 1
    return {reason: expected[reason] for reason in COUNTED}


SERVER_CASES = cases(
    "1.1.1", "1.1.8", "1.2.1", "1.2.4", "1.2.7", "1.2.8",
    "2.1", "2.4", "2.5", "2.6", "2.7", "2.9", "2.10", "2.11",
    "3.1", "3.2", "3.3", "3.4", "3.6", "3.7",
    "4.1.1", "4.1.3", "4.1.5", "4.2.1", "4.2.4",
    "5.1", "5.2", "5.5", "5.6", "5.8", "5.9", "5.12", "5.15", "5.16", "5.18", "5.19", "5.20",
    "6.1.2", "6.1.3", "6.2.3", "6.2.4", "6.3.1", "6.3.2", "6.4.3", "6.4.4", "6.6.4/octets", "6.12.8",
    "6.20.1/octets", "6.22.34", "6.23.5/octets",
    "7.1.1", "7.1.2", "7.1.3", "7.1.4", "7.1.5", "7.1.6", "7.3.1", "7.3.2", "7.3.3", "7.3.4", "7.3.5",
    "7.3.6", "7.5.1", "7.7.1", "7.7.2", "7.7.9", "7.7.13", "7.7/1012", "7.9.1", "7.9.4", "7.9.5",
    "7.9.9", "7.9/1015", "7.13.1",
    "9.1.1", "9.1.6", "9.1/limit", "9.2/limit", "9.2/limit+1", "9.2.2", "9.3.1", "9.4.4", "9.4/over",
    "9.4/cut", "9.6.1", "9.8.1", "9.8.3",
)


@pytest.mark.parametrize("case", SERVER_CASES)
def test_case_on_the_server(server, case):
    before = server.stats()["drops"]
    peer = Peer(wsclient.upgrade(server.port, timeout=WAIT), masked=False)
    name = "127.0.0.1:%d" % peer.sock.getsockname()[1]
    try:
        exchange(peer, case, endpoint_closes_tcp=True)
        if case.ends is None:
            link = link_of(server, name)
            assert link["state"] == "open" and link["rx_messages"] == len(case.messages)
            peer.send(raw_frame(F(CLOSE, BYE), masked=True))  # then a clean close
            peer.read_until(lambda: False)
            assert peer.replies()[-1] == ("close", 1000)
        assert peer.eof, "the server did not close the TCP connection"
        if case.ends == "close" or case.ends is None:
            assert peer.eof == "fin", "a clean close ends with a FIN, not a reset"
    finally:
        peer.sock.close()
    helpers.wait_for(lambda: link_of(server, name) is None, WAIT, what="the link to leave /stats")
    after = server.stats()["drops"]
    assert {r: after[r] - before[r] for r in COUNTED} == expected_drops(case)


@pytest.mark.parametrize("case", cases("6.4.1", "6.4.2", "6.17.2/octets"))
def test_case_6_4_the_server_fails_fast_on_invalid_utf8(server, case):
    """Everything before the bad fragment is accepted (a ping is still answered); the fragment
    with the byte that makes the text invalid is failed at once, before the rest is sent."""
    peer = Peer(wsclient.upgrade(server.port, timeout=WAIT), masked=False)
    try:
        peer.send_case(case, case.frames[:case.at])
        peer.probe()
        peer.send_case(case, case.frames[case.at:case.at + 1])
        peer.read_until(lambda: False)
        assert peer.replies() == [("close", 1007)] and peer.eof
    finally:
        peer.sock.close()


def test_the_server_closes_when_asked_and_forgets_the_link(server):
    """A client's Close 1000: the server answers Close 1000 and closes TCP; /stats drops the link."""
    peer = Peer(wsclient.upgrade(server.port, timeout=WAIT), masked=False)
    name = "127.0.0.1:%d" % peer.sock.getsockname()[1]
    try:
        peer.probe()
        assert link_of(server, name)["state"] == "open"
        peer.send(raw_frame(F(CLOSE, close_body(1000, b"done")), masked=True))
        peer.read_until(lambda: False)
        assert peer.replies() == [("close", 1000)] and peer.eof == "fin"
    finally:
        peer.sock.close()
    helpers.wait_for(lambda: link_of(server, name) is None, WAIT, what="the link to leave /stats")


def handshake(port, lines):
    """The status line and headers the server answers a hand-written upgrade request with."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(("\r\n".join(["GET /ws HTTP/1.1", "Host: 127.0.0.1:%d" % port] + lines) + "\r\n\r\n").encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(4096)
            if not chunk:
                break
            response += chunk
    head = response.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return head[0], {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:])}


RFC_KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's example
UPGRADE = ["Upgrade: websocket", "Connection: Upgrade"]


def test_handshake_the_server_answers_with_the_rfc_accept_value(server):
    status, headers = handshake(server.port, UPGRADE + [RFC_KEY, "Sec-WebSocket-Version: 13"])
    assert status.startswith("HTTP/1.1 101 ")
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert headers["upgrade"].lower() == "websocket" and "upgrade" in headers["connection"].lower()


def test_case_12_13_permessage_deflate_is_not_negotiated(server):
    """gelf implements no extension: an offer of permessage-deflate gets a 101 without one."""
    status, headers = handshake(server.port, UPGRADE + [
        RFC_KEY, "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, x-webkit-deflate-frame"])
    assert status.startswith("HTTP/1.1 101 ") and "sec-websocket-extensions" not in headers


@pytest.mark.parametrize("lines, lists_versions", [
    pytest.param(UPGRADE + ["Sec-WebSocket-Version: 13"], False, id="no-key"),
    pytest.param(UPGRADE + ["Sec-WebSocket-Key: c2hvcnQ=", "Sec-WebSocket-Version: 13"], False, id="key-not-16-bytes"),
    pytest.param(["Connection: Upgrade", RFC_KEY, "Sec-WebSocket-Version: 13"], False, id="no-upgrade-header"),
    pytest.param(UPGRADE + [RFC_KEY], False, id="no-version"),
    pytest.param(UPGRADE + [RFC_KEY, "Sec-WebSocket-Version: 14"], True, id="unknown-version"),
])
def test_handshake_the_server_refuses_a_bad_request_with_a_client_error(server, lines, lists_versions):
    """RFC 6455 4.2.1: a request that is not a valid handshake gets "an appropriate error code
    (such as 400 Bad Request)"; a version the server does not speak gets one (such as 426) and
    the versions it does speak in Sec-WebSocket-Version (4.2.2). The client's mistake is not a 500."""
    status, headers = handshake(server.port, lines)
    assert 400 <= int(status.split()[1]) < 500, status
    if lists_versions:
        assert "13" in headers.get("sec-websocket-version", "").replace(" ", "").split(",")


# ---------------------------------------------------------------- 2b. the dialing client

class RecordingDial(DialLink):
    """A DialLink that records what it delivers, its connections' protocol state and its endings."""

    def __init__(self, url, loop, max_message=LIMIT):
        self.delivered = []
        self.connections = []
        self.endings = []
        self.is_open = threading.Event()
        self.is_over = threading.Event()
        super().__init__(url, LinkSet(), self._record, Drops(), loop, max_message=max_message)

    def _record(self, payload, link):
        self.delivered.append(bytes(payload))

    def attach(self, sock, ws, loop):
        self.connections.append(ws)
        super().attach(sock, ws, loop)

    def opened(self):
        super().opened()
        self.is_open.set()

    def ended(self, code, why):
        self.endings.append((code, why))
        super().ended(code, why)
        self.is_over.set()


class RawServer:
    """A WebSocket server written by hand for one DialLink: it answers the opening handshake (or
    crafts a bad answer), then the test writes frames (unmasked) and reads the client's (masked)."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "ws://127.0.0.1:%d/ws" % self.listener.getsockname()[1]
        self.sock = None
        self.headers = None

    def accept(self, answer=None, after=b""):
        """Take one connection (redials are refused after it); answer(accept value) -> response."""
        self.listener.settimeout(WAIT)
        sock, _ = self.listener.accept()
        self.listener.close()
        self.sock = sock
        sock.settimeout(WAIT)
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = sock.recv(1)
            assert chunk, "the client closed during its handshake: %r" % request
            request += chunk
        lines = request.decode("latin-1").split("\r\n")
        self.request_line = lines[0]
        self.headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
        key = self.headers["sec-websocket-key"].encode()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        response = answer(accept) if answer else (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Accept: %s\r\n\r\n" % accept)
        sock.sendall(response.encode() + after)
        return Peer(sock, masked=True)

    def close(self):
        self.listener.close()
        if self.sock is not None:
            self.sock.close()


@pytest.fixture
def dialer():
    """Factory: dialer(answer=None, after=b"", **loop options) -> (RecordingDial, Peer or None):
    a DialLink in its own LinkLoop (no keepalive pings) dialing a RawServer. Everything is
    stopped and closed at teardown."""
    made = []

    def make(answer=None, after=b"", wait_open=True, **options):
        options.setdefault("keepalive", 0)
        loop = LinkLoop(**options)
        loop.start()
        raw = RawServer()
        link = RecordingDial(raw.url, loop)
        made.append((loop, link, raw))
        link.start()
        peer = raw.accept(answer, after)
        if wait_open:
            assert link.is_open.wait(WAIT), "the DialLink did not open: %s" % link.error
        return link, peer, raw

    yield make
    for loop, link, raw in made:
        link.stop()
        link.join(WAIT)
        raw.close()
        loop.stop(grace=0.2)
        loop.join(WAIT)


CLIENT_CASES = cases(
    "1.1.8", "1.2.7", "1.2.8",
    "2.1", "2.3", "2.5", "2.6", "2.8", "2.9", "2.10", "2.11",
    "3.1", "3.2", "3.3", "3.4", "3.5", "3.6", "3.7",
    "4.1.1", "4.1.2", "4.1.4", "4.1.5", "4.2.2", "4.2.3", "4.2.5",
    "5.1", "5.2", "5.4", "5.6", "5.7", "5.8", "5.10", "5.14", "5.15", "5.17", "5.18", "5.19", "5.20",
    "6.1.2", "6.2.4", "6.3.1", "6.3.2", "6.4.4", "6.8.2/octets", "6.11.5", "6.21.8/octets", "6.22.1",
    "7.1.1", "7.1.2", "7.1.3", "7.1.4", "7.1.5", "7.1.6", "7.3.1", "7.3.2", "7.3.3", "7.3.5", "7.3.6",
    "7.5.1", "7.7.2", "7.7.10", "7.7/1014", "7.9.2", "7.9.3", "7.9.6", "7.9/1015", "7.13.2",
    "9.1/limit+1", "9.2.1", "9.2.6", "9.2/limit", "9.3.2", "9.4.5", "9.3/over", "9.4/cut", "9.5.6", "9.7.2",
    "9.8.5",
)


@pytest.mark.parametrize("case", CLIENT_CASES)
def test_case_on_the_dialing_client(dialer, case):
    link, peer, raw = dialer()
    exchange(peer, case, endpoint_closes_tcp=False)
    if case.ends is None:  # then the server closes: the client answers and waits for TCP's end
        peer.send(raw_frame(F(CLOSE, BYE), masked=False))
        peer.read_until(peer.closed)
        assert peer.replies()[-1] == ("close", 1000)
    if case.ends != "fail":
        assert not link.is_over.is_set(), "a client leaves closing TCP to the server (RFC 6455 7.1.1)"
        raw.sock.close()
    else:  # a client that fails the connection closes it at once
        assert peer.eof
    assert link.is_over.wait(WAIT)
    assert link.delivered == [value for kind, value in case.messages if kind == "binary"]
    drops = link.drops.snapshot()
    failure = Counter({"oversize" if case.code == 1009 else "malformed": 1} if case.ends == "fail" else {})
    assert drops["text"] == sum(kind == "text" for kind, _ in case.messages)
    assert (drops["malformed"], drops["oversize"]) == (failure["malformed"], failure["oversize"])


@pytest.mark.parametrize("case", cases("6.4.1", "6.4.2", "6.17.2/octets"))
def test_case_6_4_the_dialing_client_fails_fast_on_invalid_utf8(dialer, case):
    link, peer, _ = dialer()
    peer.send_case(case, case.frames[:case.at])
    peer.probe()
    peer.send_case(case, case.frames[case.at:case.at + 1])
    peer.read_until(lambda: False)
    assert peer.replies() == [("close", 1007)] and peer.eof
    assert link.is_over.wait(WAIT)


def test_the_dialing_client_answers_a_close_and_waits_for_the_server_to_close_tcp(dialer):
    """RFC 6455 7.1.1: after the Close handshake the server closes TCP first; the client waits
    (up to its close timeout) and then ends the link as a clean close."""
    link, peer, raw = dialer(close_timeout=WAIT)
    peer.send(raw_frame(F(CLOSE, close_body(1001, b"restarting")), masked=False))
    peer.read_until(peer.closed)
    assert peer.replies() == [("close", 1001)]
    assert peer.quiet(1.0) and not link.is_over.is_set(), "the client closed TCP before the server"
    raw.sock.close()
    assert link.is_over.wait(WAIT)
    conn = link.connections[-1]
    assert conn.close_received and conn.close_sent and not conn.failed and conn.close_code == 1001


def test_the_dialing_client_closes_with_1001_when_stopped(dialer):
    """Stopping a DialLink starts the handshake: Close 1001; the server's answer completes it and
    the client waits for the server to close TCP."""
    link, peer, raw = dialer(close_timeout=WAIT)
    peer.probe()
    link.stop()
    peer.read_until(peer.closed)
    assert peer.replies() == [("close", 1001)] and peer.eof is None
    peer.send(raw_frame(F(CLOSE, close_body(1001)), masked=False))
    assert peer.quiet(1.0) and not link.is_over.is_set(), "the client closed TCP before the server"
    raw.sock.close()
    assert link.is_over.wait(WAIT)
    conn = link.connections[-1]
    assert conn.close_received and not conn.failed


def test_handshake_the_dialing_client_asks_for_version_13_and_no_extension(dialer):
    _, _, raw = dialer()
    assert raw.request_line.startswith("GET /ws HTTP/1.1")
    headers = raw.headers
    assert headers["upgrade"].lower() == "websocket" and "upgrade" in headers["connection"].lower()
    assert headers["sec-websocket-version"] == "13" and len(base64.b64decode(headers["sec-websocket-key"])) == 16
    assert "sec-websocket-extensions" not in headers  # sections 12 and 13 do not apply


def test_handshake_frames_right_behind_the_101_are_not_lost(dialer):
    """The server may send frames in the same write as its 101 response."""
    after = stream([F(BINARY, b"first"), F(PING, b"early")], masked=False)
    link, peer, _ = dialer(after=after)
    peer.read_until(lambda: ("pong", b"early") in peer.replies())
    helpers.wait_for(lambda: link.delivered, WAIT, what="the first message")
    assert link.delivered == [b"first"]


def _response(*lines):
    return lambda accept: "\r\n".join(line.replace("ACCEPT", accept) for line in lines) + "\r\n\r\n"


OK101 = "HTTP/1.1 101 Switching Protocols"


@pytest.mark.parametrize("answer", [
    pytest.param(_response(OK101, "Upgrade: websocket", "Connection: Upgrade",
                           "Sec-WebSocket-Accept: x3JJHMbDL1EzLkh9GBhXDw=="), id="wrong-accept"),
    pytest.param(_response(OK101, "Upgrade: websocket", "Connection: Upgrade"), id="no-accept"),
    pytest.param(_response(OK101, "Connection: Upgrade", "Sec-WebSocket-Accept: ACCEPT"), id="no-upgrade-header"),
    pytest.param(_response(OK101, "Upgrade: websocket", "Sec-WebSocket-Accept: ACCEPT"), id="no-connection-header"),
    pytest.param(_response(OK101, "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Accept: ACCEPT",
                           "Sec-WebSocket-Extensions: permessage-deflate"), id="extension-not-offered"),
    pytest.param(_response("HTTP/1.1 200 OK", "Content-Length: 0"), id="not-101"),
])
def test_handshake_the_dialing_client_refuses_a_bad_response(dialer, answer):
    """RFC 6455 4.1: the client MUST fail the connection if the response is not a 101, lacks
    Upgrade: websocket or Connection: Upgrade, lacks the right Sec-WebSocket-Accept, or names an
    extension it did not ask for."""
    link, _, _ = dialer(answer=answer, wait_open=False)
    helpers.wait_for(lambda: link.error or link.is_open.is_set(), WAIT, what="the handshake's outcome")
    assert not link.is_open.is_set(), "the DialLink accepted a bad handshake response"


@pytest.mark.parametrize("answer", [
    pytest.param(_response(OK101, "Upgrade: WebSocket", "Connection: keep-alive, Upgrade",
                           "Sec-WebSocket-Accept: ACCEPT"), id="connection-with-two-tokens"),
    pytest.param(_response(OK101, "upgrade: websocket", "connection: upgrade", "sec-websocket-accept: ACCEPT",
                           "Server: hand-written"), id="lower-case-names"),
])
def test_handshake_the_dialing_client_accepts_a_valid_response(dialer, answer):
    """Connection must contain the token "Upgrade" (ASCII case-insensitive), not be only it."""
    link, _, _ = dialer(answer=answer, wait_open=False)
    helpers.wait_for(lambda: link.error or link.is_open.is_set(), WAIT, what="the handshake's outcome")
    assert link.is_open.is_set(), "the DialLink refused a valid handshake response: %s" % link.error


# ---------------------------------------------------------------- 3. standard peers

def gelf_message(text):
    return helpers.encode([helpers.eth_frame(text)], int.from_bytes(os.urandom(4), "big"), time.time_ns())


def test_websockets_client_against_the_server(server):
    """The `websockets` client: it offers permessage-deflate (refused), sends a message, pings,
    and closes; the server answers Close 1000 and closes TCP, so close() does not wait out its
    timeout."""
    from websockets.sync.client import connect

    with connect(server.ws_url, proxy=None, open_timeout=WAIT, close_timeout=WAIT, ping_interval=None) as ws:
        name = "127.0.0.1:%d" % ws.local_address[1]
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        written = server.stats()["tap"]["written_frames"]
        ws.send(gelf_message(b"from websockets"))
        assert ws.ping(b"standard peer").wait(WAIT), "no pong"
        assert link_of(server, name)["rx_messages"] == 1
        helpers.wait_for(lambda: server.stats()["tap"]["written_frames"] > written, WAIT, what="the frame on the tap")
        started = time.monotonic()
        ws.close()
        assert time.monotonic() - started < WAIT / 2, "the server did not close TCP after the handshake"
        assert ws.protocol.close_rcvd.code == 1000 and ws.protocol.close_sent.code == 1000
    helpers.wait_for(lambda: link_of(server, name) is None, WAIT, what="the link to leave /stats")


class WsprotoClient:
    """The `wsproto` client driven over a socket by hand."""

    def __init__(self, port):
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, Request
        from wsproto.extensions import PerMessageDeflate

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events = []
        self.eof = False
        self.send(Request(host="127.0.0.1:%d" % port, target="/ws", extensions=[PerMessageDeflate()]))
        accepted = self.read_until(AcceptConnection)
        assert accepted.extensions == []

    def send(self, event):
        self.sock.sendall(self.ws.send(event))

    def read_until(self, kind=None, timeout=WAIT):
        """The first event of `kind` (taken from the list), or None once the server has closed
        the connection (kind None: read to that end)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if kind is not None and isinstance(event, kind):
                    self.events.remove(event)
                    return event
            if self.eof:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("wsproto saw %r" % self.events)
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            self.eof = not data
            self.ws.receive_data(data or None)
            self.events += list(self.ws.events())


def test_wsproto_client_against_the_server(server):
    from wsproto.events import CloseConnection, Message, Ping, Pong

    client = WsprotoClient(server.port)
    name = "127.0.0.1:%d" % client.sock.getsockname()[1]
    try:
        client.send(Message(data=gelf_message(b"from wsproto")))
        client.send(Ping(payload=b"standard peer"))
        assert client.read_until(Pong).payload == b"standard peer"
        assert link_of(server, name)["rx_messages"] == 1
        client.send(CloseConnection(code=1000, reason="done"))
        assert client.read_until(CloseConnection).code == 1000
        client.read_until()  # nothing more: read to the end of the connection
        assert client.eof, "the server did not close TCP after the handshake"
    finally:
        client.sock.close()
    helpers.wait_for(lambda: link_of(server, name) is None, WAIT, what="the link to leave /stats")


def test_stopping_the_server_closes_standard_clients_with_1001(gelf_server):
    """SIGTERM: the server's Close 1001 reaches both clients and the handshake completes."""
    from websockets.exceptions import ConnectionClosedOK
    from websockets.sync.client import connect
    from wsproto.events import CloseConnection

    srv = gelf_server()
    with connect(srv.ws_url, proxy=None, open_timeout=WAIT, close_timeout=WAIT, ping_interval=None) as ws:
        other = WsprotoClient(srv.port)
        try:
            assert ws.ping(b"ready?").wait(WAIT)
            srv.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosedOK) as closed:
                while True:  # frames from the server's tap may come first
                    ws.recv(timeout=WAIT)
            assert closed.value.rcvd.code == 1001 and closed.value.sent.code == 1001
            close = other.read_until(CloseConnection)
            assert close is not None and close.code == 1001
            other.send(close.response())
            other.read_until()
            assert other.eof, "the server did not close TCP after the handshake"
        finally:
            other.sock.close()
    assert srv.proc.wait(WAIT) == 0


@pytest.fixture
def websockets_server():
    """Factory: websockets_server(handler) -> ws:// URL of a `websockets` server in a thread."""
    from websockets.sync.server import serve

    servers = []

    def start(handler):
        srv = serve(handler, "127.0.0.1", 0, ping_interval=None, close_timeout=WAIT)
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        servers.append((srv, thread))
        return "ws://127.0.0.1:%d/ws" % srv.socket.getsockname()[1]

    yield start
    for srv, thread in servers:
        srv.shutdown()
        thread.join(WAIT)


@pytest.fixture
def loop():
    lp = LinkLoop(keepalive=0, close_timeout=WAIT)
    lp.start()
    yield lp
    lp.stop(grace=0.2)
    lp.join(WAIT)


@pytest.mark.parametrize("who_closes", ["server", "client"])
def test_dial_link_and_a_websockets_server(websockets_server, loop, who_closes):
    """Messages both ways, then the close handshake started by either side; the `websockets`
    server sees a clean close with the right code either way."""
    from websockets.exceptions import ConnectionClosed

    seen = {"connections": 0}
    done = threading.Event()

    def handler(ws):
        seen["connections"] += 1
        if seen["connections"] > 1:  # a redial after the test's close: just let it go
            return
        ws.send(b"from websockets")
        seen["message"] = ws.recv(timeout=WAIT)
        if who_closes == "server":
            ws.close(1000, "bye")
        else:
            try:
                ws.recv(timeout=WAIT)
            except ConnectionClosed:
                pass
        seen["rcvd"], seen["sent"] = ws.protocol.close_rcvd, ws.protocol.close_sent
        done.set()

    link = RecordingDial(websockets_server(handler), loop)
    link.start()
    try:
        assert link.is_open.wait(WAIT), link.error
        helpers.wait_for(lambda: link.delivered, WAIT, what="the server's message")
        assert link.delivered == [b"from websockets"]
        link.offer(b"from gelf")
        if who_closes == "client":
            helpers.wait_for(lambda: "message" in seen, WAIT, what="the server to take the message")
            link.stop()
        assert done.wait(WAIT) and link.is_over.wait(WAIT)
        assert seen["message"] == b"from gelf"
        code = 1000 if who_closes == "server" else 1001
        assert seen["rcvd"].code == code and seen["sent"].code == code
        conn = link.connections[0]
        assert conn.close_sent and conn.close_received and not conn.failed and conn.close_code == code
        assert link.endings[0][0] == code
    finally:
        link.stop()
        link.join(WAIT)
