"""The gelf wire format, version 1 (written down byte by byte in docs/design.md).

One binary WebSocket message is one gelf message: a 16-byte header (version, type, flags,
origin, seq) and a body of length-prefixed Ethernet frames. The header leaves room for what
the transport needs beyond carrying frames: SEALED (AES-GCM, the header doubling as nonce and
associated data), origin/seq (loop and replay suppression) and OFFLOAD (GSO super-frames).
"""

import struct
from typing import List, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 1

TYPE_DATA = 0
TYPE_CONTROL = 1
TYPE_STREAM = 2  # gelf-mirror's stream events (gelf/mirror/events.py); a tap server drops them

FLAG_SEALED = 0x01
FLAG_OFFLOAD = 0x02
KNOWN_FLAGS = FLAG_SEALED | FLAG_OFFLOAD

HEADER = struct.Struct("!BBBxIQ")
HEADER_SIZE = HEADER.size  # 16
RECORD = struct.Struct("!I")
TAG_SIZE = 16

ETH_HEADER = 14
VLAN_TAG = 4
VNET_HDR = 10  # struct virtio_net_hdr, see offload.py

# What one sender packs into one message: a small batch keeps latency low and the page's
# per-message cost (which rules the browser path) amortised.
BATCH_FRAMES = 64
BATCH_BYTES = 65536


class WireError(ValueError):
    """A message that is not a valid gelf message; `reason` names its drop counter."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


class Message(NamedTuple):
    version: int
    type: int
    flags: int
    origin: int
    seq: int
    frames: List[bytes]


def max_frame(mtu: int, flags: int = 0) -> int:
    """Largest frame a receiver accepts: MTU + Ethernet header + one 802.1Q tag."""
    limit = mtu + ETH_HEADER + VLAN_TAG
    if flags & FLAG_OFFLOAD:
        limit = max(limit, 65535 + ETH_HEADER + VLAN_TAG) + VNET_HDR
    return limit


def min_frame(flags: int = 0) -> int:
    """Shortest frame a receiver accepts: an Ethernet header, behind its virtio header with OFFLOAD."""
    return ETH_HEADER + (VNET_HDR if flags & FLAG_OFFLOAD else 0)


def max_message(mtu: int, flags: int = FLAG_OFFLOAD) -> int:
    """Largest message a receiver accepts (see docs/design.md). Without `flags`, the largest
    of any kind: the cap a socket enforces before it knows what the message is."""
    return HEADER_SIZE + TAG_SIZE + BATCH_BYTES + BATCH_FRAMES * RECORD.size + max_frame(mtu, flags)


def pack_header(type_: int, flags: int, origin: int, seq: int) -> bytes:
    return HEADER.pack(VERSION, type_, flags, origin, seq)


def pack_frames(frames) -> bytes:
    """The DATA body: each frame preceded by its 4-byte length."""
    parts = []
    for frame in frames:
        parts.append(RECORD.pack(len(frame)))
        parts.append(frame)
    return b"".join(parts)


class Sealer:
    """AES-GCM under one key. The header is both the nonce (bytes 4..16: origin and seq,
    unique per message) and the associated data (bytes 0..16), so it stays readable for
    relays but cannot be altered.

    OpenSSL's AES-GCM (through `cryptography`) keeps the key schedule and GHASH tables for the
    key's lifetime: about 4 us to seal a 1.5 KB message. pycryptodome rebuilds both for every
    nonce, about 130 us per message, which capped sealed links at a few thousand messages a
    second; tests/test_wire.py checks that each library opens what the other seals.
    """

    def __init__(self, key: bytes):
        if len(key) not in (16, 32):
            raise ValueError("AES-GCM key must be 16 or 32 bytes")
        self._aead = AESGCM(bytes(key))

    def seal(self, header: bytes, body: bytes) -> bytes:
        return header + self._aead.encrypt(header[4:HEADER_SIZE], body, header)

    def open(self, data) -> bytes:
        """The plaintext body of sealed message `data`, or WireError('auth')."""
        if len(data) < HEADER_SIZE + TAG_SIZE:
            raise WireError("auth", "sealed message too short")
        view = memoryview(data)
        header = bytes(view[:HEADER_SIZE])
        try:
            return self._aead.decrypt(header[4:], view[HEADER_SIZE:], header)
        except InvalidTag:
            raise WireError("auth", "authentication failed") from None


def encode(frames, origin: int, seq: int, flags: int = 0, type: int = TYPE_DATA, sealer: Sealer = None) -> bytes:
    """A message carrying `frames`, sealed when a sealer (a key) is given."""
    if sealer is None:
        return pack_header(type, flags, origin, seq) + pack_frames(frames)
    return sealer.seal(pack_header(type, flags | FLAG_SEALED, origin, seq), pack_frames(frames))


def parse_header(data) -> Message:
    """Check the header of `data`; returns a Message with no frames yet."""
    if len(data) < HEADER_SIZE:
        raise WireError("malformed", "message shorter than the header")
    version, type_, flags, origin, seq = HEADER.unpack_from(data)
    if version != VERSION:
        raise WireError("malformed", "unknown version %d" % version)
    if flags & ~KNOWN_FLAGS:
        raise WireError("malformed", "unknown flags 0x%02x" % flags)
    return Message(version, type_, flags, origin, seq, [])


def split_frames(body, frame_limit: int, frame_min: int = ETH_HEADER) -> List[bytes]:
    """The frames of a DATA body, each checked against [frame_min, frame_limit] bytes."""
    frames = []
    view = memoryview(body)
    pos, end = 0, len(view)
    if end == 0:
        raise WireError("malformed", "no frame in the message")
    while pos < end:
        if end - pos < RECORD.size:
            raise WireError("malformed", "truncated record length")
        (length,) = RECORD.unpack_from(view, pos)
        pos += RECORD.size
        if length > frame_limit:
            raise WireError("oversize", "frame of %d bytes" % length)
        if length < frame_min:
            raise WireError("malformed", "runt frame of %d bytes" % length)
        if pos + length > end:
            raise WireError("malformed", "record runs past the end of the message")
        frames.append(bytes(view[pos:pos + length]))
        pos += length
    return frames


def decode(data, mtu: int = 1500, sealer: Sealer = None) -> Message:
    """Parse (and, with a key, authenticate and decrypt) a DATA message.

    With a key, unsealed messages are refused (`not_sealed`); without one, sealed messages
    are (`no_key`): a mismatch in configuration never lets a frame through.
    """
    msg = parse_header(data)
    if len(data) > max_message(mtu, msg.flags):
        raise WireError("oversize", "message of %d bytes" % len(data))
    if msg.type != TYPE_DATA:
        raise WireError("unknown_type", "message type %d" % msg.type)
    sealed = msg.flags & FLAG_SEALED
    if sealer is not None and not sealed:
        raise WireError("not_sealed", "unencrypted message, this server requires encryption")
    if sealer is None and sealed:
        raise WireError("no_key", "encrypted message, this server has no key")
    body = sealer.open(data) if sealed else memoryview(data)[HEADER_SIZE:]
    return msg._replace(frames=split_frames(body, max_frame(mtu, msg.flags), min_frame(msg.flags)))
