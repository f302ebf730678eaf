"""TCP Segments from a classic pcap file (`tcpdump -w`): the capture stage without a live
socket, for tests and for mirroring traffic recorded elsewhere.

Classic pcap only (either byte order, microsecond or nanosecond timestamps); a pcapng file (what
Wireshark writes) is refused with the command that converts it. Link types: Ethernet (with
802.1Q/802.1ad tags), Linux cooked v1 and v2 (`tcpdump -i any`), BSD loopback, and raw IP.
A record cut short by the end of the file (a capture still being written) ends the reading.
"""

import struct

from gelf.mirror.packets import ETH_P_IP, ETH_P_IPV6, parse
from gelf.pcap import LINKTYPE_ETHERNET, MAGIC
from gelf.wire import ETH_HEADER, VLAN_TAG

MAGIC_NS = 0xA1B23C4D
PCAPNG = 0x0A0D0D0A
LINKTYPE_NULL, LINKTYPE_LOOP = 0, 108
LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6 = 101, 228, 229
LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2 = 113, 276
VLAN_TYPES = (0x8100, 0x88A8)


class PcapError(ValueError):
    """Not a file this reader understands; the message says what to do."""


def _network_start(linktype, data):
    """Where the IP header starts in a record, or None if it holds no IP packet."""
    if linktype == LINKTYPE_ETHERNET:
        at = ETH_HEADER - 2
        while len(data) >= at + 2 and struct.unpack_from("!H", data, at)[0] in VLAN_TYPES:
            at += VLAN_TAG
        if len(data) < at + 2 or struct.unpack_from("!H", data, at)[0] not in (ETH_P_IP, ETH_P_IPV6):
            return None
        return at + 2
    if linktype == LINKTYPE_LINUX_SLL:
        return 16 if len(data) >= 16 and struct.unpack_from("!H", data, 14)[0] in (ETH_P_IP, ETH_P_IPV6) else None
    if linktype == LINKTYPE_LINUX_SLL2:
        return 20 if len(data) >= 20 and struct.unpack_from("!H", data, 0)[0] in (ETH_P_IP, ETH_P_IPV6) else None
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        return 4
    return 0  # raw IP


def segments(path, why=None):
    """Yield the TCP Segments of the pcap file at path, in file order (see packets.parse for
    `why`; records without IP count as `link`)."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            raise PcapError("%s is not a pcap file (shorter than its header)" % path)
        magic = struct.unpack("<I", head[:4])[0]
        if magic == PCAPNG:
            raise PcapError("%s is pcapng: convert it with `editcap -F pcap %s out.pcap`" % (path, path))
        for order in "<>":
            magic = struct.unpack(order + "I", head[:4])[0]
            if magic in (MAGIC, MAGIC_NS):
                break
        else:
            raise PcapError("%s is not a pcap file (magic %s)" % (path, head[:4].hex()))
        scale = 1e-9 if magic == MAGIC_NS else 1e-6
        linktype = struct.unpack(order + "I", head[20:24])[0] & 0x0FFFFFFF  # upper bits: FCS info
        if linktype not in (LINKTYPE_ETHERNET, LINKTYPE_NULL, LINKTYPE_LOOP, LINKTYPE_RAW, LINKTYPE_IPV4,
                            LINKTYPE_IPV6, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2):
            raise PcapError("%s: link type %d is not supported (Ethernet, Linux cooked, raw IP are)"
                            % (path, linktype))
        record = struct.Struct(order + "IIII")
        while True:
            rec = f.read(record.size)
            if len(rec) < record.size:
                return
            sec, frac, caplen, _ = record.unpack(rec)
            data = f.read(caplen)
            if len(data) < caplen:
                return
            at = _network_start(linktype, data)
            if at is None:
                if why is not None:
                    why["link"] = why.get("link", 0) + 1
                continue
            seg = parse(memoryview(data)[at:], sec + frac * scale, why)
            if seg is not None:
                yield seg
