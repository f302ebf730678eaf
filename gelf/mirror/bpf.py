"""The kernel-side filter of the capture: a classic BPF program built here, instruction by
instruction, and attached with SO_ATTACH_FILTER, so that Python never sees a packet it does not
mirror (the kernel runs it on every packet of the interface, before any copy to us).

Offsets, checked on this machine (kernel 6.18) with two probe filters, "byte 0 has IPv4's
version nibble" and "the halfword at 12 is ethertype 0x0800 and byte 14 IPv4's nibble", on both
socket types, pinging through a veth pair and through lo in a scratch namespace: on SOCK_DGRAM
only the first matched (4/4 packets on veth, 8/8 on lo), incoming (PACKET_HOST) and outgoing
(PACKET_OUTGOING) copies alike; on SOCK_RAW only the second (lo too: it has an all-zero
Ethernet header). capture.py uses SOCK_DGRAM, so the offsets below are IP offsets. On loopback
every packet passes twice (PACKET_OUTGOING, then PACKET_HOST): the program drops the outgoing
copy, so each is seen once (tests/test_mirror_capture.py counts them).

The ethertype, packet type and device type come from the kernel's ancillary loads
(SKF_AD_*), not from packet bytes, which SOCK_DGRAM does not show.
"""

import ipaddress
import socket
import struct

# Instruction classes and modes (linux/bpf_common.h, linux/filter.h).
LD, LDX, ALU, JMP, RET, MISC = 0x00, 0x01, 0x04, 0x05, 0x06, 0x07
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MSH = 0x00, 0x20, 0x40, 0xA0
ADD, LSH = 0x00, 0x60
JA, JEQ, JSET = 0x00, 0x10, 0x40
K, A_REG = 0x00, 0x10
TAX = 0x00

SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL, SKF_AD_PKTTYPE, SKF_AD_HATYPE = 0, 4, 28
ARPHRD_LOOPBACK = 772
PACKET_OUTGOING = 4
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
SNAPLEN = 262144  # a GRO/TSO super-packet is at most 64 KiB plus headers

SO_ATTACH_FILTER = 26


class Program:
    """A tiny assembler: instructions with symbolic jump targets, resolved by assemble()."""

    def __init__(self):
        self.code, self.labels = [], {}

    def label(self, name):
        self.labels[name] = len(self.code)

    def op(self, code, k=0, jt=None, jf=None):
        self.code.append((code, jt, jf, k))

    def assemble(self):
        """List of (code, jt, jf, k) with relative jumps, as struct sock_filter wants them."""
        out = []
        for i, (code, jt, jf, k) in enumerate(self.code):
            rel = [0 if t is None else self.labels[t] - i - 1 for t in (jt, jf)]
            if code == JMP | JA:
                k, rel = self.labels[k] - i - 1, [0, 0]
            if not all(0 <= r <= 255 for r in rel):
                raise ValueError("jump out of range at instruction %d" % i)
            out.append((code, rel[0], rel[1], k & 0xFFFFFFFF))
        return out


def _ancillary(p, what):
    p.op(LD | W | ABS, SKF_AD_OFF + what)


def tcp_filter(ports, bind=None, responses=False):
    """Instructions accepting TCP to one of `ports` (and to `bind` only, if given), plus the
    replies from those ports with `responses`; every other packet is dropped in the kernel."""
    ports = sorted(set(ports))
    addr = ipaddress.ip_address(bind) if bind else None
    p = Program()
    _ancillary(p, SKF_AD_HATYPE)                          # A = device type
    p.op(JMP | JEQ | K, ARPHRD_LOOPBACK, "lo", "main")
    p.label("lo")
    _ancillary(p, SKF_AD_PKTTYPE)                         # A = direction of this copy
    p.op(JMP | JEQ | K, PACKET_OUTGOING, "drop", "main")  # loopback: keep the incoming copy only
    p.label("main")
    _ancillary(p, SKF_AD_PROTOCOL)                        # A = ethertype
    want4 = addr is None or addr.version == 4
    want6 = addr is None or addr.version == 6
    p.op(JMP | JEQ | K, ETH_P_IP, "v4" if want4 else "drop", "not4")
    p.label("not4")
    p.op(JMP | JEQ | K, ETH_P_IPV6, "v6" if want6 else "drop", "drop")
    if want4:
        p.label("v4")
        p.op(LD | B | ABS, 9)                             # A = IPv4 protocol
        p.op(JMP | JEQ | K, socket.IPPROTO_TCP, None, "drop")
        p.op(LD | H | ABS, 6)                             # A = flags and fragment offset
        p.op(JMP | JSET | K, 0x1FFF, "drop", None)        # a later fragment has no TCP header
        p.op(LDX | B | MSH, 0)                            # X = 4 * IHL: where TCP starts
        _ports(p, ports, responses, "4")
        _address(p, addr, "4", dst_at=16, src_at=12)
    if want6:
        p.label("v6")
        p.op(LD | B | ABS, 6)                             # A = next header
        p.op(JMP | JEQ | K, socket.IPPROTO_TCP, "v6tcp", None)
        for ext in (0, 43, 60):                           # one hop-by-hop/routing/destination
            p.op(JMP | JEQ | K, ext, "v6ext", None)       # options header is walked; more are
        p.op(JMP | JA, "drop")                            # dropped (classic BPF cannot loop)
        p.label("v6ext")
        p.op(LD | B | ABS, 40)                            # A = the extension's next header
        p.op(JMP | JEQ | K, socket.IPPROTO_TCP, None, "drop")
        p.op(LD | B | ABS, 41)                            # A = its length, 8-byte units past 8
        p.op(ALU | ADD | K, 1)
        p.op(ALU | LSH | K, 3)
        p.op(ALU | ADD | K, 40)
        p.op(MISC | TAX)                                  # X = 40 + its length: TCP starts there
        p.op(JMP | JA, "v6ports")
        p.label("v6tcp")
        p.op(LDX | W | IMM, 40)                           # X = 40: TCP right after the header
        p.label("v6ports")
        _ports(p, ports, responses, "6")
        _address(p, addr, "6", dst_at=24, src_at=8)
    p.label("accept")
    p.op(RET | K, SNAPLEN)
    p.label("drop")
    p.op(RET | K, 0)
    return p.assemble()


def _ports(p, ports, responses, fam):
    p.op(LD | H | IND, 2)                                 # A = TCP destination port
    for port in ports:
        p.op(JMP | JEQ | K, port, "dst" + fam, None)
    if responses:
        p.op(LD | H | IND, 0)                             # A = TCP source port
        for port in ports:
            p.op(JMP | JEQ | K, port, "src" + fam, None)
    p.op(JMP | JA, "drop")


def _address(p, addr, fam, dst_at, src_at):
    """dst<fam>/src<fam>: accept if the packet goes the way a server's does (below), and if the
    server's address is `addr` (or always, without one).

    Direction: on a real interface a request comes in and a response goes out. Without this
    check, this host's own connections to some other port-80 server (gelf-mirror's replays to a
    plain upstream on port 80 among them: Gopher's `-u machineD`) were captured and mirrored
    again, each request some 40 times in 8 s. On loopback both ends are here: every copy kept
    there is an incoming one, so loopback is let through (a replay to a local port-80 upstream
    is mirrored again: docs/mirror.md)."""
    for name, at in (("dst" + fam, dst_at), ("src" + fam, src_at)):
        p.label(name)
        _ancillary(p, SKF_AD_PKTTYPE)                     # A = direction of this copy
        if name.startswith("dst"):                        # a request: never one we send
            p.op(JMP | JEQ | K, PACKET_OUTGOING, "drop", None)
        else:                                             # a response: one we send, or loopback
            p.op(JMP | JEQ | K, PACKET_OUTGOING, name + "ok", None)
            _ancillary(p, SKF_AD_HATYPE)
            p.op(JMP | JEQ | K, ARPHRD_LOOPBACK, None, "drop")
            p.label(name + "ok")
        if addr is None:
            p.op(JMP | JA, "accept")
            continue
        words = struct.unpack("!%dI" % (len(addr.packed) // 4), addr.packed)
        for i, word in enumerate(words):                  # compare the address word by word
            p.op(LD | W | ABS, at + 4 * i)
            p.op(JMP | JEQ | K, word, "accept" if i == len(words) - 1 else None, "drop")


def attach(sock, instructions):
    """SO_ATTACH_FILTER: the kernel copies the program, so the buffer may go afterwards."""
    import ctypes

    raw = b"".join(struct.pack("HBBI", *ins) for ins in instructions)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("HL", len(instructions), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
