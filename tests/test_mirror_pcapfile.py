"""gelf.mirror.pcapfile: pcap files written here by hand from the format's description
(tcpdump's pcap-savefile(5)) read back as the Segments packets.parse gives."""

import struct

import pytest

from gelf.mirror.packets import parse
from gelf.mirror.pcapfile import PcapError, segments
from test_mirror_packets import ipv4, ipv6, tcp

PKTS = [ipv4("10.0.0.1", "10.0.0.2", tcp(40000, 80, 1, 0, 0x02)),
        ipv6("fd00::1", "fd00::2", tcp(40001, 80, 7, 0, 0x18, b"GET / HTTP/1.1\r\n"))]


def pcap(records, linktype, order="<", nano=False):
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for i, rec in enumerate(records):
        out += struct.pack(order + "IIII", 1000 + i, 500, len(rec), len(rec)) + rec
    return out


def ether(pkt, v6, vlan=False):
    tag = struct.pack("!HH", 0x8100, 42) if vlan else b""
    return b"\x02" * 6 + b"\x04" * 6 + tag + struct.pack("!H", 0x86DD if v6 else 0x0800) + pkt


def sll(pkt, v6):
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x02" * 8, 0x86DD if v6 else 0x0800) + pkt


def sll2(pkt, v6):
    return struct.pack("!HHIHBB8s", 0x86DD if v6 else 0x0800, 0, 2, 1, 0, 6, b"\x02" * 8) + pkt


@pytest.mark.parametrize("linktype,frame", [
    (1, lambda p, v6: ether(p, v6)), (1, lambda p, v6: ether(p, v6, vlan=True)), (113, sll), (276, sll2),
    (101, lambda p, v6: p), (0, lambda p, v6: struct.pack("<I", 30 if v6 else 2) + p)])
@pytest.mark.parametrize("order,nano", [("<", False), (">", True)])
def test_link_types_and_byte_orders(tmp_path, linktype, frame, order, nano):
    path = tmp_path / "c.pcap"
    path.write_bytes(pcap([frame(p, i == 1) for i, p in enumerate(PKTS)], linktype, order, nano))
    got = list(segments(path))
    frac = 500e-9 if nano else 500e-6
    assert got == [parse(p, 1000 + i + frac) for i, p in enumerate(PKTS)]


def test_non_ip_records_and_a_cut_last_record(tmp_path):
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + b"\x00" * 28
    data = pcap([ether(PKTS[0], False), arp, ether(PKTS[1], True)], 1)
    path = tmp_path / "c.pcap"
    path.write_bytes(data[:-5])
    why = {}
    assert len(list(segments(path, why))) == 1 and why == {"link": 1}


def test_refusals_are_one_actionable_line(tmp_path):
    path = tmp_path / "c.pcapng"
    path.write_bytes(struct.pack("<I", 0x0A0D0D0A) + b"\x00" * 28)
    with pytest.raises(PcapError, match="editcap -F pcap"):
        list(segments(path))
    path.write_bytes(b"hello world, this is not a pcap")
    with pytest.raises(PcapError, match="not a pcap file"):
        list(segments(path))
    path.write_bytes(pcap([], 147))
    with pytest.raises(PcapError, match="link type 147"):
        list(segments(path))
