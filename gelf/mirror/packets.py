"""One captured IPv4 or IPv6 packet in, one TCP `Segment` (or None) out.

A packet starts at its network header: that is what an AF_PACKET SOCK_DGRAM socket delivers
and what capture.py's kernel filter already narrowed down to TCP on the mirrored port. Every
length is checked against the bytes actually present, so garbage (a truncated snapshot, a lying
length field, a hostile packet) returns None and never raises; the caller counts the None.
With `why`, a dict, the reason a packet was refused is counted there by name (PARSE_REASONS).

IPv6 extension headers that are simple to walk (hop-by-hop, routing, destination options) are
skipped. Fragments are not reassembled (TCP sets DF and uses path MTU discovery, so they are
rare): they are refused as `fragment`. This is the capture's hot path: struct.unpack_from on
the caller's buffer, one slice for the payload, no other allocation.
"""

import enum
import functools
import socket
import struct
from typing import NamedTuple, Optional, Tuple

PROTO_TCP = 6
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

# IPv6 extension headers skipped on the way to TCP; each is (next header, length in 8-byte
# units not counting the first 8) at its start (RFC 8200 section 4).
IPV6_SKIPPED = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options
IPV6_FRAGMENT = 44
IPV6_MAX_EXTENSIONS = 8  # bounds the walk; real packets carry one or two

PARSE_REASONS = ("short", "version", "not_tcp", "fragment", "bad_header")


class Flag(enum.IntFlag):
    """TCP header flag bits (byte 13 of the header, RFC 9293)."""

    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20
    ECE = 0x40
    CWR = 0x80


class Segment(NamedTuple):
    ts: float
    src: Tuple[str, int]
    dst: Tuple[str, int]
    seq: int
    ack: int
    flags: int
    payload: bytes


_IP4 = struct.Struct("!BxHxxHBBxx4s4s")  # ver/ihl, total length, flags/fragment, ttl, protocol, addrs
_IP6 = struct.Struct("!I H B x 16s 16s")  # ver/class/label, payload length, next header, addrs
_TCP = struct.Struct("!HHIIBB")  # ports, seq, ack, data offset, flags
_EXT = struct.Struct("!BB")


@functools.lru_cache(maxsize=65536)
def _text(family, packed):
    """An address as text. Cached: a capture sees the same few addresses again and again, and
    two inet_ntop calls were a quarter of parse() (0.36 of 1.23 us); a cache hit is ~0.05 us."""
    return socket.inet_ntop(family, packed)


def _refuse(why, reason):
    if why is not None:
        why[reason] = why.get(reason, 0) + 1
    return None


def parse(data, ts: float, why: Optional[dict] = None) -> Optional[Segment]:
    """The TCP segment in `data` (bytes, bytearray or memoryview), or None."""
    n = len(data)
    if n < 1:
        return _refuse(why, "short")
    version = data[0] >> 4
    if version == 4:
        if n < 20:
            return _refuse(why, "short")
        vihl, total, frag, _ttl, proto, src, dst = _IP4.unpack_from(data, 0)
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or total < ihl:
            return _refuse(why, "bad_header")
        if total > n:
            return _refuse(why, "short")
        if frag & 0x3FFF:  # more fragments, or an offset: part of a fragmented datagram
            return _refuse(why, "fragment")
        if proto != PROTO_TCP:
            return _refuse(why, "not_tcp")
        family, off, end = socket.AF_INET, ihl, total
    elif version == 6:
        if n < 40:
            return _refuse(why, "short")
        _, plen, nxt, src, dst = _IP6.unpack_from(data, 0)
        end = 40 + plen
        if plen == 0:  # a jumbogram (RFC 2675), never seen on a capture of ordinary links
            return _refuse(why, "bad_header")
        if end > n:
            return _refuse(why, "short")
        off = 40
        for _ in range(IPV6_MAX_EXTENSIONS):
            if nxt not in IPV6_SKIPPED:
                break
            if off + 8 > end:
                return _refuse(why, "short")
            nxt, units = _EXT.unpack_from(data, off)
            off += 8 + units * 8
        if nxt == IPV6_FRAGMENT:
            return _refuse(why, "fragment")
        if nxt != PROTO_TCP:
            return _refuse(why, "not_tcp")
        family = socket.AF_INET6
    else:
        return _refuse(why, "version")
    if off + 20 > end:
        return _refuse(why, "short")
    sport, dport, seq, ack, doff, flags = _TCP.unpack_from(data, off)
    hlen = (doff >> 4) * 4
    if hlen < 20 or off + hlen > end:
        return _refuse(why, "bad_header")
    payload = bytes(data[off + hlen:end])
    return Segment(ts, (_text(family, src), sport), (_text(family, dst), dport), seq, ack, flags, payload)
