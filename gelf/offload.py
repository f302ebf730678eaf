"""GSO/TSO super-frames: the virtio-net header, and the software fallback for taps without it.

A tap opened with IFF_VNET_HDR and TUNSETOFFLOAD (see tap.py) reads and writes each frame
behind a 10-byte `struct virtio_net_hdr`, and the kernel may hand over TCP super-frames of up
to 64 KiB with checksums left for later, as it does to a virtio NIC. gelf carries such frames
as they are in OFFLOAD messages (wireguard-go and tailscale do the same), so one message and
one system call move some forty MSS-sized segments. A receiver whose own tap has no offload
turns them back into ordinary frames here: TCP segmentation and checksum completion.
"""

import struct

from gelf.wire import ETH_HEADER as ETH_HLEN

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_SIZE = VNET_HDR.size  # 10
PLAIN = bytes(VNET_HDR_SIZE)   # a frame with nothing left to do

F_NEEDS_CSUM = 0x01
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN = 0, 1, 4, 0x80

ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q = 0x0800, 0x86DD, 0x8100
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80
IPV4_HLEN, IPV6_HLEN, TCP_HLEN = 20, 40, 20  # the shortest headers


class OffloadError(ValueError):
    """A super-frame this fallback cannot turn into ordinary frames."""


def ones_sum(data):
    """The 16-bit ones' complement sum of `data` (RFC 1071), via the big-integer identity
    sum(words) == value mod 0xffff, which is far faster in Python than adding words."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    value = int.from_bytes(data, "big")
    total = value % 0xFFFF
    return 0xFFFF if total == 0 and value else total


def checksum(data, initial=0):
    """The Internet checksum of `data` plus a partial sum `initial` (a pseudo-header)."""
    total = ones_sum(data) + initial
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def to_frames(vframe):
    """Ordinary Ethernet frames for one `virtio_net_hdr + frame`, as a tap without offload
    needs them: the frame itself (its checksum completed if the kernel left it partial), or
    the TCP segments of a super-frame."""
    if len(vframe) < VNET_HDR_SIZE + ETH_HLEN:
        raise OffloadError("frame shorter than a virtio and an Ethernet header")
    flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(vframe)
    frame = bytearray(vframe[VNET_HDR_SIZE:])
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE:
        if flags & F_NEEDS_CSUM:
            _complete_checksum(frame, csum_start, csum_offset)
        return [bytes(frame)]
    if kind in (GSO_TCPV4, GSO_TCPV6) and gso_size:
        return _segment_tcp(frame, kind, gso_size, csum_start)
    raise OffloadError("GSO type %d is not supported" % gso_type)


def _complete_checksum(frame, start, offset):
    """The kernel put the pseudo-header sum at start+offset; finish the sum over start..end."""
    if start + offset + 2 > len(frame):
        raise OffloadError("checksum position outside the frame")
    struct.pack_into("!H", frame, start + offset, checksum(memoryview(frame)[start:]))


def _segment_tcp(frame, kind, mss, l4):
    """Split a TCP super-frame into frames of at most `mss` payload bytes, fixing lengths,
    IPv4 ids, sequence numbers, flags and checksums as the kernel's GSO would."""
    # Every field read below is checked to lie inside the frame first: a peer's super-frame
    # is untrusted input.
    l3 = 18 if struct.unpack_from("!H", frame, 12)[0] == ETH_P_8021Q else 14
    ip_min = IPV4_HLEN if kind == GSO_TCPV4 else IPV6_HLEN
    if l4 - l3 < ip_min or l4 + TCP_HLEN > len(frame):
        raise OffloadError("truncated TCP super-frame")
    tcp_len = (frame[l4 + 12] >> 4) * 4
    data_at = l4 + tcp_len
    if tcp_len < TCP_HLEN or data_at > len(frame):
        raise OffloadError("truncated TCP super-frame")
    headers = frame[:data_at]
    payload = memoryview(frame)[data_at:]
    seq = struct.unpack_from("!I", headers, l4 + 4)[0]
    tcp_flags = headers[l4 + 13]
    if kind == GSO_TCPV4:
        ip_id = struct.unpack_from("!H", headers, l3 + 4)[0]
        src_dst = bytes(headers[l3 + 12:l3 + 20])
    else:
        src_dst = bytes(headers[l3 + 8:l3 + 40])
    out = []
    count = (len(payload) + mss - 1) // mss or 1
    for i in range(count):
        chunk = payload[i * mss:(i + 1) * mss]
        seg = bytearray(headers)
        if kind == GSO_TCPV4:
            struct.pack_into("!HH", seg, l3 + 2, l4 - l3 + tcp_len + len(chunk), (ip_id + i) & 0xFFFF)
            struct.pack_into("!H", seg, l3 + 10, 0)
            struct.pack_into("!H", seg, l3 + 10, checksum(memoryview(seg)[l3:l4]))
        else:
            struct.pack_into("!H", seg, l3 + 4, l4 - l3 - 40 + tcp_len + len(chunk))
        struct.pack_into("!I", seg, l4 + 4, (seq + i * mss) & 0xFFFFFFFF)
        flags = tcp_flags
        if i < count - 1:
            flags &= ~(TCP_FIN | TCP_PSH)
        if i > 0:
            flags &= ~TCP_CWR
        seg[l4 + 13] = flags
        seg += chunk
        struct.pack_into("!H", seg, l4 + 16, 0)
        pseudo = src_dst + struct.pack("!HH", 6, tcp_len + len(chunk)) if kind == GSO_TCPV4 else \
            src_dst + struct.pack("!IxxxB", tcp_len + len(chunk), 6)
        struct.pack_into("!H", seg, l4 + 16, checksum(memoryview(seg)[l4:], ones_sum(pseudo)))
        out.append(bytes(seg))
    return out
