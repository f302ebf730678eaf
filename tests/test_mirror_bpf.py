"""gelf.mirror.bpf: the kernel filter, run on packets built by hand by a classic BPF interpreter
written here from linux/filter.h's semantics (no root needed), and accepted by the kernel's own
checker (attached to a plain UDP socket, which needs no privilege)."""

import socket

import pytest

from gelf.mirror import bpf
from test_mirror_packets import ipv4, ipv6, tcp

HOST, OUTGOING = 0, 4
ETHER, LOOPBACK = 1, 772


def run_filter(prog, pkt, proto, pkttype=HOST, hatype=ETHER):
    """What the kernel returns for pkt (network header first, as on SOCK_DGRAM): 0 drops."""
    anc = {bpf.SKF_AD_PROTOCOL: proto, bpf.SKF_AD_PKTTYPE: pkttype, bpf.SKF_AD_HATYPE: hatype}
    a = x = pc = 0
    sizes = {0x00: 4, 0x08: 2, 0x10: 1}
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        cls = code & 0x07
        if cls == bpf.LD:
            mode, size = code & 0xE0, sizes[code & 0x18]
            if mode == bpf.ABS and k >= (bpf.SKF_AD_OFF & 0xFFFFFFFF):
                a = anc[k - (bpf.SKF_AD_OFF & 0xFFFFFFFF)]
                continue
            at = k + (x if mode == bpf.IND else 0)
            assert mode in (bpf.ABS, bpf.IND)
            if at + size > len(pkt):
                return 0  # the kernel drops a packet the program reads past
            a = int.from_bytes(pkt[at:at + size], "big")
        elif cls == bpf.LDX:
            if code == bpf.LDX | bpf.B | bpf.MSH:
                if k >= len(pkt):
                    return 0
                x = 4 * (pkt[k] & 0x0F)
            else:
                assert code == bpf.LDX | bpf.W | bpf.IMM
                x = k
        elif cls == bpf.ALU:
            a = {bpf.ADD: a + k, bpf.LSH: a << k}[code & 0xF0] & 0xFFFFFFFF
        elif cls == bpf.MISC:
            assert code == bpf.MISC | bpf.TAX
            x = a
        elif cls == bpf.JMP:
            op = code & 0xF0
            if op == bpf.JA:
                pc += k
            else:
                hit = a == k if op == bpf.JEQ else bool(a & k)
                pc += jt if hit else jf
        elif cls == bpf.RET:
            return k
        else:
            raise AssertionError("unexpected instruction %#x" % code)


V4, V6 = bpf.ETH_P_IP, bpf.ETH_P_IPV6


def to(port, src="10.0.0.2", dst="10.0.0.1", sport=40000, **kw):
    return ipv4(src, dst, tcp(sport, port, 1, 1, 0x18, b"data"), **kw)


def to6(port, src="fd00::2", dst="fd00::1", sport=40000, **kw):
    return ipv6(src, dst, tcp(sport, port, 1, 1, 0x18, b"data"), **kw)


def test_ports_and_directions():
    p = bpf.tcp_filter([80, 8080])
    assert run_filter(p, to(80), V4) == bpf.SNAPLEN
    assert run_filter(p, to(8080), V4) == bpf.SNAPLEN
    assert run_filter(p, to(81), V4) == 0
    reply = ipv4("10.0.0.1", "10.0.0.2", tcp(80, 40000, 1, 1, 0x10))
    assert run_filter(p, reply, V4, OUTGOING) == 0
    assert run_filter(bpf.tcp_filter([80], responses=True), reply, V4, OUTGOING) == bpf.SNAPLEN
    assert run_filter(p, ipv4("10.0.0.2", "10.0.0.1", tcp(40000, 80, 1, 1, 0x10), proto=17), V4) == 0
    assert run_filter(p, to(80), 0x0806) == 0  # ARP, or anything not IP


def test_ipv4_options_and_fragments():
    p = bpf.tcp_filter([80])
    assert run_filter(p, to(80, options=b"\x01\x01\x01\x00" * 2), V4) == bpf.SNAPLEN
    assert run_filter(p, to(80, frag=0x2000), V4) == bpf.SNAPLEN  # the first fragment has the ports
    assert run_filter(p, to(80, frag=0x0005), V4) == 0  # a later one does not


def test_ipv6_and_one_extension_header():
    p = bpf.tcp_filter([80])
    assert run_filter(p, to6(80), V6) == bpf.SNAPLEN
    assert run_filter(p, to6(81), V6) == 0
    hop = (0, b"\x01\x04\x00\x00\x00\x00")
    dest = (60, b"\x01\x0c" + b"\x00" * 12)
    assert run_filter(p, to6(80, extensions=[dest]), V6) == bpf.SNAPLEN
    assert run_filter(p, to6(81, extensions=[dest]), V6) == 0
    assert run_filter(p, to6(80, extensions=[hop, dest]), V6) == 0  # two: documented as dropped


def test_loopback_keeps_one_copy():
    p = bpf.tcp_filter([80], responses=True)
    assert run_filter(p, to(80), V4, OUTGOING, LOOPBACK) == 0
    assert run_filter(p, to(80), V4, HOST, LOOPBACK) == bpf.SNAPLEN
    reply = ipv4("10.0.0.1", "10.0.0.2", tcp(80, 40000, 1, 1, 0x10))
    assert run_filter(p, reply, V4, HOST, LOOPBACK) == bpf.SNAPLEN  # both ends are here: kept


def test_only_what_this_host_serves_not_its_own_connections_elsewhere():
    """A request comes in and a response goes out. This host's own connections to another
    port-80 server (a replay to a plain upstream on port 80: Gopher's `-u machineD`) go the
    other way, and were mirrored again and again before this rule."""
    p = bpf.tcp_filter([80], responses=True)
    reply = ipv4("10.0.0.1", "10.0.0.2", tcp(80, 40000, 1, 1, 0x10))
    assert run_filter(p, to(80), V4, HOST, ETHER) == bpf.SNAPLEN
    assert run_filter(p, reply, V4, OUTGOING, ETHER) == bpf.SNAPLEN
    assert run_filter(p, to(80), V4, OUTGOING, ETHER) == 0  # our own request to someone's port 80
    assert run_filter(p, reply, V4, HOST, ETHER) == 0  # and that server's answer
    assert run_filter(p, to6(80), V6, OUTGOING, ETHER) == 0


def test_bind_v4_and_v6():
    p4 = bpf.tcp_filter([80], bind="10.0.0.1", responses=True)
    assert run_filter(p4, to(80), V4) == bpf.SNAPLEN
    assert run_filter(p4, to(80, dst="10.0.0.3"), V4) == 0
    assert run_filter(p4, to6(80), V6) == 0
    assert run_filter(p4, ipv4("10.0.0.1", "10.0.0.2", tcp(80, 40000, 1, 1, 0x10)), V4, OUTGOING) == bpf.SNAPLEN
    assert run_filter(p4, ipv4("10.0.0.3", "10.0.0.2", tcp(80, 40000, 1, 1, 0x10)), V4, OUTGOING) == 0
    p6 = bpf.tcp_filter([80], bind="fd00::1", responses=True)
    assert run_filter(p6, to6(80), V6) == bpf.SNAPLEN
    assert run_filter(p6, to6(80, dst="fd00::1:0"), V6) == 0
    assert run_filter(p6, to6(80, dst="fd01::1"), V6) == 0
    assert run_filter(p6, to(80), V4) == 0
    assert run_filter(p6, ipv6("fd00::1", "fd00::2", tcp(80, 40000, 1, 1, 0x10)), V6, OUTGOING) == bpf.SNAPLEN
    assert run_filter(p6, ipv6("fd00::3", "fd00::2", tcp(80, 40000, 1, 1, 0x10)), V6, OUTGOING) == 0


def test_truncated_packets_are_dropped_not_misread():
    p = bpf.tcp_filter([80])
    pkt = to(80)
    assert all(run_filter(p, pkt[:n], V4) == 0 for n in range(20 + 4))  # the port ends at byte 24


@pytest.mark.parametrize("bind", [None, "10.0.0.1", "fd00::1"])
@pytest.mark.parametrize("responses", [False, True])
def test_the_kernel_accepts_the_program(bind, responses):
    prog = bpf.tcp_filter([80, 443, 8080], bind=bind, responses=responses)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        bpf.attach(s, prog)  # raises OSError (EINVAL) if the kernel's checker refuses it


def test_the_kernel_refuses_a_broken_program():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(OSError):
        bpf.attach(s, [(bpf.JMP | bpf.JA, 0, 0, 5), (bpf.RET | bpf.K, 0, 0, 0)])  # jumps past the end
