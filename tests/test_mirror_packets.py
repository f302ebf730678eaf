"""gelf.mirror.packets: packets built by hand from the RFCs' layouts in, Segments out; garbage
never raises."""

import socket
import struct

from hypothesis import given, settings, strategies as st

from gelf.mirror.packets import Flag, Segment, parse


def tcp(sport, dport, seq, ack, flags, payload=b"", options=b""):
    """A TCP header (RFC 9293 section 3.1) and payload; options padded to 4 bytes."""
    options += b"\x01" * (-len(options) % 4)
    doff = (20 + len(options)) // 4
    return (struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, 65535, 0, 0)
            + options + payload)


def ipv4(src, dst, body, proto=6, options=b"", frag=0x4000):
    """An IPv4 header (RFC 791); frag is the flags/fragment-offset field (DF by default)."""
    ihl = 5 + len(options) // 4
    return (struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(body), 1, frag, 64, proto, 0,
                        socket.inet_aton(src), socket.inet_aton(dst)) + options + body)


def ipv6(src, dst, body, nxt=6, extensions=()):
    """An IPv6 header (RFC 8200), with extension headers given as (type, body of 6+8k bytes)."""
    chain = b""
    types = [t for t, _ in extensions] + [nxt]
    for (_, ext), after in zip(extensions, types[1:]):
        chain += struct.pack("!BB", after, (len(ext) + 2) // 8 - 1) + ext
    return (struct.pack("!IHBB", 6 << 28, len(chain) + len(body), types[0], 64)
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + chain + body)


def test_ipv4_segment():
    pkt = ipv4("10.0.0.1", "10.0.0.2", tcp(40000, 80, 0xFFFFFFF0, 7, Flag.ACK | Flag.PSH, b"GET / HTTP/1.1\r\n"))
    assert parse(pkt, 1.5) == Segment(1.5, ("10.0.0.1", 40000), ("10.0.0.2", 80), 0xFFFFFFF0, 7,
                                      0x18, b"GET / HTTP/1.1\r\n")


def test_ipv4_options_tcp_options_and_ethernet_padding():
    body = tcp(1, 2, 3, 4, Flag.SYN, b"", options=b"\x02\x04\x05\xb4")
    pkt = ipv4("192.0.2.1", "192.0.2.2", body, options=b"\x01\x01\x01\x00") + b"\x00" * 6  # padded frame
    seg = parse(pkt, 0.0)
    assert seg.payload == b"" and seg.flags == Flag.SYN and seg.src == ("192.0.2.1", 1)
    pkt = ipv4("192.0.2.1", "192.0.2.2", tcp(1, 2, 3, 4, Flag.ACK, b"xyz", options=b"\x01" * 12))
    assert parse(bytearray(pkt), 0.0).payload == b"xyz"
    assert parse(memoryview(pkt), 0.0).payload == b"xyz"


def test_ipv6_segment_and_extension_headers():
    body = tcp(50000, 443, 1, 2, Flag.FIN | Flag.ACK, b"bye")
    seg = parse(ipv6("fd00::1", "fd00::2", body), 2.0)
    assert seg == Segment(2.0, ("fd00::1", 50000), ("fd00::2", 443), 1, 2, 0x11, b"bye")
    exts = [(0, b"\x01\x04\x00\x00\x00\x00"), (60, b"\x01\x0c" + b"\x00" * 12), (43, b"\x00" * 6)]
    assert parse(ipv6("fd00::1", "fd00::2", body, extensions=exts), 2.0) == seg


def test_refused_with_a_reason():
    why = {}
    body = tcp(1, 80, 0, 0, Flag.ACK, b"x" * 8)
    assert parse(ipv4("10.0.0.1", "10.0.0.2", body, frag=0x2000), 0, why) is None  # more fragments
    assert parse(ipv4("10.0.0.1", "10.0.0.2", body, frag=0x0010), 0, why) is None  # an offset
    assert parse(ipv6("fd00::1", "fd00::2", body, extensions=[(44, b"\x00" * 6)]), 0, why) is None
    assert parse(ipv4("10.0.0.1", "10.0.0.2", body, proto=17), 0, why) is None
    assert parse(ipv6("fd00::1", "fd00::2", body, nxt=17), 0, why) is None
    assert parse(b"\x50" + b"\x00" * 40, 0, why) is None
    assert parse(b"", 0, why) is None
    bad_doff = bytearray(ipv4("10.0.0.1", "10.0.0.2", body))
    bad_doff[20 + 12] = 0x40  # data offset 4 words: less than the header
    assert parse(bytes(bad_doff), 0, why) is None
    assert why == {"fragment": 3, "not_tcp": 2, "version": 1, "short": 1, "bad_header": 1}


def test_every_truncation_is_refused_not_raised():
    for pkt in (ipv4("10.0.0.1", "10.0.0.2", tcp(1, 2, 3, 4, 0x10, b"hello")),
                ipv6("fd00::1", "fd00::2", tcp(1, 2, 3, 4, 0x10, b"hello"), extensions=[(0, b"\x00" * 6)])):
        for cut in range(len(pkt)):
            assert parse(pkt[:cut], 0.0) is None, cut
        assert parse(pkt, 0.0).payload == b"hello"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_raises(data):
    seg = parse(data, 0.0)
    assert seg is None or isinstance(seg, Segment)


@settings(max_examples=500, deadline=None)
@given(st.booleans(), st.binary(max_size=40), st.lists(st.tuples(st.integers(0, 119), st.integers(0, 255)),
                                                     max_size=6))
def test_mutated_packets_never_raise(v6, payload, edits):
    body = tcp(1000, 80, 5, 6, 0x18, payload)
    pkt = bytearray(ipv6("fd00::1", "fd00::2", body, extensions=[(0, b"\x00" * 6)]) if v6
                    else ipv4("10.0.0.1", "10.0.0.2", body))
    for pos, value in edits:
        if pos < len(pkt):
            pkt[pos] = value
    seg = parse(bytes(pkt), 0.0)
    if seg is not None:
        assert len(seg.payload) <= len(pkt)
