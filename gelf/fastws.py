"""The WebSocket connection (RFC 6455) as a state machine that never touches a socket.

`Connection.receive_data(bytes)` parses what the peer sent and returns events: binary
messages, text messages (gelf speaks binary only: they are counted and dropped, but still held
to the RFC: UTF-8 checked), pings, pongs, the peer's Close, or the failure the peer caused. The
frames the protocol answers with (a pong, the Close reply, the Close that fails a connection)
wait in `data_to_send()`; `send_binary`, `send_ping` and `send_close` return the bytes of the
frames the owner wants to send. Whoever owns the socket (links.py, driven by loop.py) writes
all of them through the link's one ordered sender, so a reply can never overtake or split a
data frame. Being free of I/O, every rule is tested as bytes in, bytes out
(tests/test_fastws.py, tests/test_ws_conformance.py with Autobahn|Testsuite's case numbers).

ws4py still does the opening handshake (its WebSocketTool, and its client for dialed links);
this module replaced its byte path, which profiles showed to be the bottleneck:
- ws4py (un)masks payloads byte by byte in Python (about 10 ms per 64 KiB); `mask_into` XORs
  32-bit words with numpy (about 11 us per 64 KiB; wsaccel's C loop and a whole-buffer integer
  XOR both took 130-300 us, which made masking 60 % of a direct link's CPU), and small
  payloads, where numpy's call overhead dominates, as one big integer;
- ws4py asks the socket for exactly the bytes its parser wants next (2, then the length, then
  the payload); `receive_data` takes whatever arrived, in big chunks, and parses every complete
  frame in it;
- `frame` builds a frame header with struct instead of ws4py's generic message objects.
"""

import codecs
import enum
import os
import struct

import numpy

NUMPY_FROM = 2048  # bytes: below this, the integer XOR is faster than a numpy call


class Opcode(enum.IntEnum):
    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never sent: "the Close frame had no code"
    ABNORMAL = 1006  # never sent: "the connection ended without a Close frame"
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # 1012-1014: registered with IANA after RFC 6455
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014


# Codes a peer may put in a Close frame: RFC 6455 7.4 and the IANA registry (as websockets and
# wsproto accept them); 3000-4999 belong to libraries and applications.
VALID_CLOSE_CODES = frozenset(CloseCode) - {CloseCode.NO_STATUS, CloseCode.ABNORMAL}

_CONTROL = frozenset((Opcode.CLOSE, Opcode.PING, Opcode.PONG))
_KNOWN = frozenset(Opcode)


class State(enum.Enum):
    OPEN = "open"  # messages flow both ways
    CLOSING = "closing"  # one side's Close is out: we sent ours, or the peer's is answered
    CLOSED = "closed"  # both Close frames exchanged, or the connection failed or ended


class Event(enum.Enum):
    BINARY = "binary"  # value: the payload
    TEXT = "text"  # value: its size in bytes (the text itself is not kept)
    PING = "ping"  # value: the payload (the pong is already in data_to_send())
    PONG = "pong"  # value: the payload
    CLOSE = "close"  # value: (code, reason) from the peer's Close frame
    FAILED = "failed"  # value: (code, reason) of the Close with which we failed the connection


class ProtocolError(Exception):
    """The peer broke RFC 6455; `code` is the Close code to fail the connection with."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def mask_into(buf, key, start=0):
    """RFC 6455 masking (its own inverse) of buf[start:] in place, with the 4-byte key repeated."""
    n = len(buf) - start
    if n <= 0:
        return
    if n < NUMPY_FROM:
        stream = (key * ((n >> 2) + 1))[:n]
        value = int.from_bytes(memoryview(buf)[start:], "little") ^ int.from_bytes(stream, "little")
        buf[start:] = value.to_bytes(n, "little")
        return
    words = n >> 2
    lanes = numpy.frombuffer(buf, dtype=numpy.uint32, count=words, offset=start)
    numpy.bitwise_xor(lanes, numpy.frombuffer(key, dtype=numpy.uint32)[0], out=lanes)
    for i in range(start + (words << 2), len(buf)):
        buf[i] ^= key[(i - start) & 3]


def mask(data, key):
    """A masked (or unmasked) copy of `data`."""
    out = bytearray(data)
    mask_into(out, key)
    return out


def frame(payload, opcode=Opcode.BINARY, masked=False):
    """One complete (FIN) frame. Clients must mask what they send, servers must not."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, n | (0x80 if masked else 0))
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 126 | (0x80 if masked else 0), n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127 | (0x80 if masked else 0), n)
    if not masked:
        return header + payload
    key = os.urandom(4)
    out = bytearray(header)
    out += key
    out += payload
    mask_into(out, key, len(header) + 4)
    return out


def close_payload(code, reason=""):
    """The body of a Close frame: the code, then the reason (UTF-8, cut to fit 125 bytes)."""
    text = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return struct.pack("!H", code) + text


def parse_close(payload):
    """(code, reason) of a received Close frame body; ProtocolError if it breaks RFC 6455 7.1.5."""
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "Close frame with a 1-byte body")
    (code,) = struct.unpack_from("!H", payload)
    if code not in VALID_CLOSE_CODES and not 3000 <= code <= 4999:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "invalid close code %d" % code)
    try:
        reason = bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(CloseCode.INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


class Connection:
    """One WebSocket connection's protocol state, for the server (`client=False`) or a client.

    Only the thread that owns the link calls `receive_*`, `send_close` and `send_ping`;
    `send_binary` only frames, so the link's sender may call it from any thread (links.py
    decides when data may still be sent).
    """

    def __init__(self, client, max_message):
        self.client = client
        self.max_message = max_message
        self.state = State.OPEN
        self.close_sent = False
        self.close_received = False
        self.failed = False
        self.close_code = None  # how it ended: the peer's code, our failure's code, or 1006
        self.close_reason = ""
        self._expect_masked = not client
        self._buf = bytearray()
        self._message = None  # [opcode, parts or None, size, UTF-8 decoder or None] while fragmented
        self._out = []

    # ---------------------------------------------------------------- sending

    def send_binary(self, payload):
        """The frame carrying one binary message."""
        return frame(payload, Opcode.BINARY, masked=self.client)

    def send_ping(self, payload=b""):
        return frame(payload, Opcode.PING, masked=self.client)

    def send_close(self, code=CloseCode.NORMAL, reason=""):
        """Start the closing handshake (or answer the peer's): the Close frame, once; b"" after."""
        if self.close_sent:
            return b""
        self.close_sent = True
        self.state = State.CLOSED if self.close_received else State.CLOSING
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        return frame(close_payload(code, reason), Opcode.CLOSE, masked=self.client)

    def data_to_send(self):
        """Frames the protocol itself answered with since the last call (pongs, Close)."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    # ---------------------------------------------------------------- receiving

    def receive_eof(self):
        """The peer closed the TCP connection (or it broke)."""
        if self.close_code is None or not self.close_received and not self.failed:
            self.close_code, self.close_reason = CloseCode.ABNORMAL, "connection ended without a Close frame"
        self.state = State.CLOSED

    def receive_data(self, data):
        """Events for every complete frame in the bytes received so far; the incomplete rest
        waits for the next call. Nothing is parsed after the peer's Close or a failure."""
        if self.close_received or self.failed:
            return []
        buf = self._buf
        buf += data
        events = []
        pos = 0
        end = len(buf)
        try:
            # The hot path: one plain loop over the frames in the buffer.
            while end - pos >= 2:
                b0, b1 = buf[pos], buf[pos + 1]
                if b0 & 0x70:
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, "reserved bits set")
                fin, opcode = b0 & 0x80, b0 & 0x0F
                if opcode not in _KNOWN:
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, "unknown opcode %d" % opcode)
                if bool(b1 & 0x80) != self._expect_masked:
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, "masking does not match the direction")
                length = b1 & 0x7F
                head = 2
                if length == 126:
                    if end - pos < 4:
                        break
                    (length,) = struct.unpack_from("!H", buf, pos + 2)
                    head = 4
                    if length < 126:
                        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "length not in its shortest form")
                elif length == 127:
                    if end - pos < 10:
                        break
                    (length,) = struct.unpack_from("!Q", buf, pos + 2)
                    head = 10
                    if length >> 63 or length < 65536:
                        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "invalid 64-bit length")
                if opcode in _CONTROL and (length > 125 or not fin):
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, "invalid control frame")
                if length > self.max_message or opcode == Opcode.CONT and self._message is not None \
                        and self._message[2] + length > self.max_message:
                    raise ProtocolError(CloseCode.TOO_BIG, "message too big")  # before buffering it
                key_at = pos + head
                start = key_at + 4 if self._expect_masked else key_at
                if end - start < length:
                    break
                payload = buf[start:start + length]
                if self._expect_masked:
                    mask_into(payload, bytes(buf[key_at:start]))
                pos = start + length
                if opcode == Opcode.BINARY and fin and self._message is None:
                    events.append((Event.BINARY, payload))  # the common case, inline
                else:
                    self._frame(events, fin, opcode, payload)
                    if self.close_received:
                        break
        except ProtocolError as err:
            self._fail(events, err.code, err.reason)
            buf.clear()
            return events
        del buf[:pos]
        return events

    def _frame(self, events, fin, opcode, payload):
        if opcode == Opcode.PING:
            if not self.close_sent:
                self._out.append(frame(payload, Opcode.PONG, masked=self.client))
            events.append((Event.PING, payload))
        elif opcode == Opcode.PONG:
            events.append((Event.PONG, payload))
        elif opcode == Opcode.CLOSE:
            code, reason = parse_close(payload)
            self.close_received = True
            if not self.close_sent:
                self.close_code, self.close_reason = code, reason
                # The reply echoes the peer's code (none if it gave none).
                body = b"" if code == CloseCode.NO_STATUS else close_payload(code)
                self._out.append(frame(body, Opcode.CLOSE, masked=self.client))
                self.close_sent = True
            self.state = State.CLOSED
            events.append((Event.CLOSE, (code, reason)))
        elif opcode == Opcode.CONT:
            message = self._message
            if message is None:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "continuation without a message")
            self._add_part(message, payload, fin)
            if fin:
                self._message = None
                self._complete(events, message)
        else:  # TEXT or BINARY: a new message
            if self._message is not None:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
            if opcode == Opcode.TEXT:
                message = [opcode, None, 0, codecs.getincrementaldecoder("utf-8")()]
            else:
                message = [opcode, bytearray(), 0, None]
            self._add_part(message, payload, fin)
            if fin:
                self._complete(events, message)
            else:
                self._message = message

    def _add_part(self, message, payload, fin):
        message[2] += len(payload)
        if message[2] > self.max_message:
            raise ProtocolError(CloseCode.TOO_BIG, "message too big")
        if message[3] is not None:
            try:  # fails as soon as a byte cannot be UTF-8, not only at the end
                message[3].decode(bytes(payload), final=bool(fin))
            except UnicodeDecodeError:
                raise ProtocolError(CloseCode.INVALID_DATA, "text message is not UTF-8") from None
        else:
            message[1] += payload

    @staticmethod
    def _complete(events, message):
        if message[0] == Opcode.TEXT:
            events.append((Event.TEXT, message[2]))
        else:
            events.append((Event.BINARY, message[1]))

    def _fail(self, events, code, reason):
        """Fail the connection (RFC 6455 7.1.7): our Close with the code, then nothing more."""
        if not self.close_sent:
            self._out.append(frame(close_payload(code, reason), Opcode.CLOSE, masked=self.client))
            self.close_sent = True
        self.failed = True
        self.state = State.CLOSED
        self.close_code, self.close_reason = code, reason
        self._message = None
        events.append((Event.FAILED, (code, reason)))
