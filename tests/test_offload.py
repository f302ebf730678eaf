"""The software fallback for super-frames, checked against the RFCs' plain definitions."""

import os
import random
import struct

import pytest

from gelf import offload


def rfc1071(data):
    """The Internet checksum, word by word as RFC 1071 writes it."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_ok(seg, l3, v6):
    """Is the TCP checksum of this IPv4/IPv6 segment right (sum over pseudo-header + TCP = 0)?"""
    if v6:
        l4 = l3 + 40
        pseudo = seg[l3 + 8:l3 + 40] + struct.pack("!IxxxB", len(seg) - l4, 6)
    else:
        l4 = l3 + (seg[l3] & 0x0F) * 4
        pseudo = seg[l3 + 12:l3 + 20] + struct.pack("!BBH", 0, 6, len(seg) - l4)
    return rfc1071(bytes(pseudo) + bytes(seg[l4:])) == 0


def super_frame(payload, v6=False, flags=0x18, mss=1448, vlan=False):
    """A TSO super-frame as a tap hands it over: virtio header + Ethernet + IP + TCP + data."""
    eth = b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01"
    if vlan:
        eth += struct.pack("!HH", 0x8100, 42)
    eth += struct.pack("!H", 0x86DD if v6 else 0x0800)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 0xFFFFF000, 77, 8 << 4, flags, 502, 0, 0) + b"\x01\x01\x08\x0a" + bytes(8)
    if v6:
        ip = struct.pack("!IHBB", 0x60000000, len(tcp) + len(payload), 6, 64) + bytes.fromhex("fd00" + "00" * 13 + "01") + bytes.fromhex("fd00" + "00" * 13 + "02")
        gso = offload.GSO_TCPV6
    else:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0xFFFE, 0x4000, 64, 6, 0,
                         bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
        gso = offload.GSO_TCPV4
    l4 = len(eth) + len(ip)
    hdr = offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, gso, l4 + len(tcp), mss, l4, 16)
    return hdr + eth + ip + tcp + payload, len(eth), len(tcp)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("size", [1, 1448, 1449, 5000, 64000])
@pytest.mark.parametrize("vlan", [False, True])
def test_super_frames_split_into_valid_segments(v6, size, vlan):
    payload = random.Random(size).randbytes(size)
    vframe, l3, tcp_len = super_frame(payload, v6=v6, flags=0x18 | 0x01 | 0x80, vlan=vlan)
    segments = offload.to_frames(vframe)
    mss = 1448
    assert len(segments) == (size + mss - 1) // mss
    l4 = l3 + (40 if v6 else 20)
    data = b""
    for i, seg in enumerate(segments):
        assert len(seg) - l4 - tcp_len <= mss
        assert tcp_ok(seg, l3, v6), "bad TCP checksum in segment %d" % i
        if v6:
            assert struct.unpack_from("!H", seg, l3 + 4)[0] == len(seg) - l4
        else:
            assert rfc1071(seg[l3:l4]) == 0, "bad IPv4 header checksum"
            assert struct.unpack_from("!H", seg, l3 + 2)[0] == len(seg) - l3
            assert struct.unpack_from("!H", seg, l3 + 4)[0] == (0xFFFE + i) & 0xFFFF
        assert struct.unpack_from("!I", seg, l4 + 4)[0] == (0xFFFFF000 + i * mss) & 0xFFFFFFFF
        flags = seg[l4 + 13]
        last = i == len(segments) - 1
        assert bool(flags & 0x01) == last and bool(flags & 0x08) == last  # FIN, PSH only at the end
        assert bool(flags & 0x80) == (i == 0)                              # CWR only at the start
        data += seg[l4 + tcp_len:]
    assert data == payload


def test_partial_checksum_is_completed():
    payload = os.urandom(999)
    vframe, l3, _ = super_frame(payload)
    hdr = offload.VNET_HDR.unpack_from(vframe)
    frame = bytearray(vframe[offload.VNET_HDR_SIZE:])
    l4 = hdr[4]
    # As the kernel leaves it: the field holds the (uncomplemented) pseudo-header sum.
    pseudo = frame[l3 + 12:l3 + 20] + struct.pack("!BBH", 0, 6, len(frame) - l4)
    struct.pack_into("!H", frame, l4 + 16, ~rfc1071(bytes(pseudo)) & 0xFFFF)
    vframe = offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, offload.GSO_NONE, 0, 0, l4, 16) + bytes(frame)
    (out,) = offload.to_frames(vframe)
    assert tcp_ok(out, l3, False)


def test_plain_frames_pass_unchanged_and_unknown_gso_is_refused():
    frame = os.urandom(60)
    assert offload.to_frames(offload.PLAIN + frame) == [frame]
    with pytest.raises(offload.OffloadError):
        offload.to_frames(offload.VNET_HDR.pack(0, 3, 0, 1400, 0, 0) + frame)  # UDP fragmentation offload


@pytest.mark.parametrize("seed", range(10))
def test_fast_ones_sum_matches_rfc1071(seed):
    data = random.Random(seed).randbytes(random.Random(seed).randint(0, 3000))
    assert offload.checksum(data) == rfc1071(data)
    assert offload.checksum(b"\0\0\0\0") == rfc1071(b"\0\0\0\0") == 0xFFFF
