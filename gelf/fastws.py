"""The WebSocket fast path: RFC 6455 framing for gelf's binary data, in one place.

ws4py still does the handshake, the manager and the connection's life; this module replaces
its byte path, which profiles showed to be the bottleneck:
- ws4py (un)masks payloads byte by byte in Python (about 10 ms per 64 KiB); `mask_into` XORs
  32-bit words with numpy (about 11 us per 64 KiB; wsaccel's C loop and a whole-buffer integer
  XOR both took 130-300 us, which made masking 60 % of a direct link's CPU), and small
  payloads, where numpy's call overhead dominates, as one big integer;
- ws4py asks the socket for exactly the bytes its parser wants next (2, then the length, then
  the payload), one system call and one buffer copy each; `FrameReader` takes what the socket
  has, in big chunks, and parses every complete frame in it;
- `frame` builds a frame header with struct instead of ws4py's generic message objects.
"""

import logging
import os
import struct

import numpy

log = logging.getLogger("gelf.fastws")

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
RECV_SIZE = 256 * 1024
NUMPY_FROM = 2048  # bytes: below this, the integer XOR is faster than a numpy call


class ProtocolError(Exception):
    """The peer broke RFC 6455; `code` is the close code to answer with."""

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


def frame(payload, opcode=OP_BINARY, masked=False):
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


class FrameReader:
    """Turns received bytes into whole messages.

    `feed(data)` returns a list of (opcode, payload) for every complete message (fragments
    reassembled) and control frame in the bytes received so far; the incomplete rest waits
    for the next call. Messages over `max_message` bytes raise ProtocolError(1009) before
    they are buffered.
    """

    def __init__(self, expect_masked, max_message):
        self.expect_masked = expect_masked
        self.max_message = max_message
        self._buf = bytearray()
        self._fragments = None  # (opcode, bytearray) while a fragmented message is incomplete

    def feed(self, data):
        buf = self._buf
        buf += data
        out = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if b0 & 0x70:
                raise ProtocolError(1002, "reserved bits set")
            fin, opcode = b0 & 0x80, b0 & 0x0F
            if bool(b1 & 0x80) != self.expect_masked:
                raise ProtocolError(1002, "masking does not match the direction")
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                (length,) = struct.unpack_from("!H", buf, pos + 2)
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                (length,) = struct.unpack_from("!Q", buf, pos + 2)
                head = 10
            if opcode >= 0x8 and (length > 125 or not fin):
                raise ProtocolError(1002, "invalid control frame")
            if length > self.max_message:
                raise ProtocolError(1009, "message too big")
            key_at = pos + head
            start = key_at + (4 if self.expect_masked else 0)
            if end - start < length:
                break
            payload = buf[start:start + length]
            if self.expect_masked:
                mask_into(payload, bytes(buf[key_at:start]))
            pos = start + length
            self._collect(out, fin, opcode, payload)
        del buf[:pos]
        return out

    def _collect(self, out, fin, opcode, payload):
        if opcode >= 0x8:
            out.append((opcode, payload))
        elif opcode == OP_CONT:
            if self._fragments is None:
                raise ProtocolError(1002, "continuation without a message")
            first, parts = self._fragments
            parts += payload
            if len(parts) > self.max_message:
                raise ProtocolError(1009, "message too big")
            if fin:
                self._fragments = None
                out.append((first, bytes(parts)))
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._fragments is not None:
                raise ProtocolError(1002, "new message inside a fragmented one")
            if fin:
                out.append((opcode, payload))
            else:
                self._fragments = (opcode, bytearray(payload))
        else:
            raise ProtocolError(1002, "unknown opcode %d" % opcode)


class FastReceive:
    """Mixin for a ws4py WebSocket (server handler or client): `once()` reads big chunks.

    The class mixing it in sets `self.reader` (a FrameReader), `self.link` (the Link that
    writes for it and counts for it) and `self.deliver` (a callable(payload, link) taking every
    binary message: the pump in a server, the relay's hub in a relay). Text messages are counted
    as drops; pings are answered; a close is answered and ends the connection; protocol errors
    are counted and close it with their code. ws4py's `terminate()` then calls `closed()`.
    """

    reader = None
    link = None
    deliver = None

    def once(self):
        if self.terminated:
            return False
        sock = self.sock
        try:
            data = sock.recv(RECV_SIZE)
            while self._is_secure and sock.pending():
                data += sock.recv(sock.pending())
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        link = self.link  # ws4py calls opened(), which makes it, before it polls the socket
        try:
            messages = self.reader.feed(data)
        except ProtocolError as err:
            if link is not None:
                link.drops.add("oversize" if err.code == 1009 else "malformed")
                log.debug("closing %s: %s", link.peer, err.reason)
            self.close(err.code, err.reason)
            return False
        for opcode, payload in messages:
            if link is None:
                break
            if opcode == OP_BINARY:
                link.rx.add(len(payload))
                self.deliver(payload, link)
            elif opcode == OP_TEXT:
                link.rx.add(len(payload))
                link.drops.add("text")  # gelf speaks binary only
            elif opcode == OP_PING:
                link.offer_frame(frame(payload, OP_PONG, masked=not self.reader.expect_masked))
            elif opcode == OP_CLOSE:
                code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
                self.stream.closing = self.stream.close(code=code)
                self.client_terminated = True
                self.close(code if code not in (1005, 1006) else 1000)
                return False
        return True
