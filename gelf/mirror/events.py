"""Stream events: what every stage of the mirror passes on, and their bytes (docs/mirror.md).

Reassembly produces Events, outputs consume them, and the same bytes are the body of a
TYPE_STREAM gelf message (capture to relay) and of a `--record` file. The codec is a pure
function pair, strict and bounds-checked: bytes from a peer or a file that are not events raise
EventError (a wire.WireError, so a relay counts it under its `reason` like any bad message) and
nothing else.
"""

import enum
import ipaddress
import os
import struct
import time
from typing import List, NamedTuple

from gelf import wire

TO_SERVER = 0  # client to server: the request side, what is replayed
TO_CLIENT = 1  # server to client: production's responses, for response comparison only

EVENT = struct.Struct("!BBHQQI")  # kind, direction, reserved, conn, ts (us), length
EVENT_SIZE = EVENT.size  # 24
ADDRESS = struct.Struct("!BxHH")  # family, reserved, client port, server port
RECORD_MAGIC = b"GELFMIR1"  # a --record file starts with it

CHUNK = 64 * 1024  # DATA is split to at most this much per event on the wire
# One TYPE_STREAM message: a batch of events that stops once it reaches STREAM_BATCH bytes, so at
# most STREAM_BATCH + one event (header and CHUNK) of body, plus gelf's header and GCM tag.
STREAM_BATCH = 64 * 1024
MAX_STREAM_MESSAGE = wire.HEADER_SIZE + wire.TAG_SIZE + STREAM_BATCH + EVENT_SIZE + CHUNK
REASONS = ("fin", "rst", "idle", "hole", "memory", "shutdown")  # CLOSE reasons (docs/mirror.md)
MAX_REASON = 64  # bytes of a CLOSE reason


class Kind(enum.IntEnum):
    OPEN = 1
    DATA = 2
    CLOSE = 3


class Event(NamedTuple):
    kind: Kind
    conn: int
    ts: float  # capture time, seconds since the epoch
    direction: int  # TO_SERVER or TO_CLIENT (TO_SERVER for OPEN and CLOSE)
    data: bytes  # OPEN: address(); DATA: stream bytes; CLOSE: the reason, UTF-8


class EventError(wire.WireError):
    """Bytes that are not valid events; `reason` names the drop counter (`malformed`, `oversize`)."""


def open_event(conn, ts, family, client, server):
    return Event(Kind.OPEN, conn, ts, TO_SERVER, address(family, client, server))


def close_event(conn, ts, reason):
    return Event(Kind.CLOSE, conn, ts, TO_SERVER, reason.encode())


def encode(event) -> bytes:
    """One event's bytes: the 24-byte header, then its data."""
    data = bytes(event.data)
    return EVENT.pack(event.kind, event.direction, 0, event.conn, int(round(event.ts * 1e6)), len(data)) + data


def encode_all(events) -> bytes:
    return b"".join(encode(event) for event in events)


def _check(kind, direction, reserved, conn, length, data):
    """The one place an event's fields are judged (decode and the file reader share it)."""
    if kind not in (1, 2, 3):
        raise EventError("malformed", "unknown event kind %d" % kind)
    if direction not in (TO_SERVER, TO_CLIENT) or (kind != Kind.DATA and direction != TO_SERVER):
        raise EventError("malformed", "bad direction %d for event kind %d" % (direction, kind))
    if reserved:
        raise EventError("malformed", "reserved bytes are not zero")
    if kind == Kind.OPEN:
        parse_address(data)
    elif kind == Kind.CLOSE:
        if length > MAX_REASON:
            raise EventError("malformed", "close reason of %d bytes" % length)
        try:
            bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise EventError("malformed", "close reason is not UTF-8") from None
    elif length == 0:
        raise EventError("malformed", "empty DATA event")


def decode_all(body) -> List[Event]:
    """Every event in `body`, which they must fill exactly; EventError on anything else."""
    view = memoryview(body)
    end = len(view)
    if end == 0:
        raise EventError("malformed", "no event in the message")
    events, pos = [], 0
    while pos < end:
        if end - pos < EVENT_SIZE:
            raise EventError("malformed", "truncated event header")
        kind, direction, reserved, conn, micros, length = EVENT.unpack_from(view, pos)
        pos += EVENT_SIZE
        if length > end - pos:
            raise EventError("malformed", "event data runs past the end")
        data = bytes(view[pos:pos + length])
        pos += length
        _check(kind, direction, reserved, conn, length, data)
        events.append(Event(Kind(kind), conn, micros / 1e6, direction, data))
    return events


def address(family, client, server) -> bytes:
    """OPEN's data: family (4 or 6), ports, then the client's and the server's address.
    `client` and `server` are (ip_text, port), as packets.Segment has them."""
    if family not in (4, 6):
        raise ValueError("address family must be 4 or 6")
    size = 4 if family == 4 else 16
    ips = [ipaddress.ip_address(ip).packed for ip, _ in (client, server)]
    if any(len(ip) != size for ip in ips):
        raise ValueError("addresses do not match family %d" % family)
    return ADDRESS.pack(family, client[1], server[1]) + ips[0] + ips[1]


def parse_address(data):
    """(family, (client ip, port), (server ip, port)) from OPEN's data; EventError if it is not one."""
    if len(data) < ADDRESS.size:
        raise EventError("malformed", "OPEN address too short")
    family, cport, sport = ADDRESS.unpack_from(data)
    size = {4: 4, 6: 16}.get(family)
    if size is None:
        raise EventError("malformed", "unknown address family %d" % family)
    if len(data) != ADDRESS.size + 2 * size:
        raise EventError("malformed", "OPEN address of %d bytes for family %d" % (len(data), family))
    start = ADDRESS.size
    client = str(ipaddress.ip_address(bytes(data[start:start + size])))
    server = str(ipaddress.ip_address(bytes(data[start + size:])))
    return family, (client, cport), (server, sport)


def chunks(event):
    """A DATA event split into events of at most CHUNK bytes (others unchanged), so that no
    message on the wire has to be larger than MAX_STREAM_MESSAGE."""
    if event.kind != Kind.DATA or len(event.data) <= CHUNK:
        return [event]
    data = event.data
    return [event._replace(data=data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)]


# ---------------------------------------------------------------- TYPE_STREAM messages


class Stamp:
    """Message ids for one sender: a random origin, seq from the clock in ns (as pump.Pump), so
    that a nonce never repeats for one key, across restarts too."""

    def __init__(self):
        self.origin = int.from_bytes(os.urandom(4), "big")
        self.seq = time.time_ns()

    def next(self):
        self.seq += 1
        return self.origin, self.seq


def seal(body, origin, seq, sealer=None) -> bytes:
    """A TYPE_STREAM gelf message carrying `body` (encoded events), sealed with a key if given."""
    if sealer is None:
        return wire.pack_header(wire.TYPE_STREAM, 0, origin, seq) + body
    return sealer.seal(wire.pack_header(wire.TYPE_STREAM, wire.FLAG_SEALED, origin, seq), body)


def unseal(data, sealer=None):
    """(Message header, events) of a TYPE_STREAM message, checked and opened as wire.decode does
    for DATA; WireError with its drop reason otherwise."""
    if not data:
        raise EventError("empty", "empty message")
    msg = wire.parse_header(data)
    if len(data) > MAX_STREAM_MESSAGE:
        raise EventError("oversize", "message of %d bytes" % len(data))
    if msg.type != wire.TYPE_STREAM:
        raise EventError("unknown_type", "message type %d" % msg.type)
    if msg.flags & wire.FLAG_OFFLOAD:
        raise EventError("malformed", "OFFLOAD set on a stream message")
    sealed = msg.flags & wire.FLAG_SEALED
    if sealer is not None and not sealed:
        raise EventError("not_sealed", "unencrypted message, this relay requires encryption")
    if sealer is None and sealed:
        raise EventError("no_key", "encrypted message, this relay has no key")
    body = sealer.open(data) if sealed else memoryview(data)[wire.HEADER_SIZE:]
    return msg, decode_all(body)


# ---------------------------------------------------------------- --record files

MAX_FILE_EVENT = 16 << 20  # bytes of data one event in a file may claim: a bound on garbage


def write_header(handle):
    handle.write(RECORD_MAGIC)


def read_file(handle):
    """Yield the events of a --record file, in order; EventError on a file that is not one (or is
    cut short in the middle of an event: a recording cut off at its last whole event is fine)."""
    if handle.read(len(RECORD_MAGIC)) != RECORD_MAGIC:
        raise EventError("malformed", "not a gelf-mirror recording (it must start with %s)" % RECORD_MAGIC.decode())
    while True:
        head = handle.read(EVENT_SIZE)
        if not head:
            return
        if len(head) < EVENT_SIZE:
            raise EventError("malformed", "the recording ends inside an event header")
        kind, direction, reserved, conn, micros, length = EVENT.unpack(head)
        if length > MAX_FILE_EVENT:
            raise EventError("oversize", "an event of %d bytes" % length)
        data = handle.read(length)
        if len(data) < length:
            raise EventError("malformed", "the recording ends inside an event")
        _check(kind, direction, reserved, conn, length, data)
        yield Event(Kind(kind), conn, micros / 1e6, direction, data)
