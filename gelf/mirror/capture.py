"""Live capture of the TCP traffic of a server port: an AF_PACKET socket, the kernel filter of
bpf.py, and TCP Segments out (packets.py parses).

Passive: the socket only listens, so production never waits for it; what the capture cannot
keep up with is dropped by the kernel and counted (PACKET_STATISTICS, in stats()).

Packets reach Python through one of two receive paths (`ring=`):
- ring (default): PACKET_RX_RING with TPACKET_V3, a mmap'd ring of blocks the kernel fills
  with many packets each and hands over when full or after BLOCK_TIMEOUT_MS; one poll() per
  block, no system call per packet, and the kernel's own timestamp on every packet.
- recv: recv_into on a large SO_RCVBUF, one system call per packet, time.time() per batch.

Measured with bench/mirror_capture.py on this 2-core machine (kernel 6.18, CPython 3.11),
100-byte TCP_NODELAY writes over a veth, 32 MiB of ring against SO_RCVBUF 32 MiB (which
the kernel doubles to 64 MiB for skb overhead), CPU of the capture process from /proc, parse
included:

    load 20 000 pkt/s, 10 s     ring 1.5 us/pkt (3.0 % of a core)   recv 4.4-5.9 us/pkt (8.8-11.8 %)
    load 50 000 pkt/s, 10 s     ring 1.4 us/pkt (7.2 %)             recv 3.2 us/pkt (15.9 %)
    with reassembly (ring)      3.1 us/pkt at 20 000, 3.0 at 50 000 pkt/s (15 % of a core)
    capture stopped, 100 000 small packets pass: ring drops 0, recv 28 013
    capture stopped, 300 000 pass: ring keeps ~125 000 (tcpdump -B 32768: ~130 000), recv ~72 000
    tcpdump -w /dev/null (C, the floor): 0.06-0.1 us/pkt

The ring wins on both counts: half or a third of the CPU (no system call per packet) and
nearly twice the burst in half the memory, since a small packet costs ~270 bytes of ring but
a whole skb's truesize (~930 bytes) of receive buffer. So ring=True is the default.
"""

import errno
import mmap
import os
import select
import socket
import struct
import sys
import time

from gelf.mirror import bpf
from gelf.mirror.packets import PARSE_REASONS, parse

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
SO_RCVBUFFORCE = 33  # not in the socket module
TPACKET_V3 = 2
TP_STATUS_USER = 1
TP_STATUS_KERNEL = 0

# The kernel hands a block over when it is full or BLOCK_TIMEOUT_MS after its first packet,
# however few it holds: at a low rate a stalled reader (a GC pause, a busy CPU) uses up one
# block per timeout. Measured: 32 blocks of 1 MiB with 10 ms dropped 525 of 600 packets sent
# at 300/s while the reader was stopped for 2 s; many small blocks last BLOCK_COUNT x timeout
# (5 s) at a low rate and hold the same 32 MiB at a high one.
BLOCK_SIZE = 128 << 10  # holds a 64 KiB GRO/TSO super-packet
BLOCK_COUNT = 256  # 32 MiB of ring
BLOCK_TIMEOUT_MS = 20  # also the longest a packet waits in the ring: mirroring latency
BLOCKS_PER_READ = 32  # a read returns after this many, so the caller's timers keep running
PACKETS_PER_READ = 4096
RCVBUF = 32 << 20  # the recv path's buffer, the same 32 MiB

_BLOCK = struct.Struct("=12xII")  # tpacket_block_desc: version, offset_to_priv, h1: status, num_pkts, first
_BLOCK_STATUS_AT = 8
_PACKET = struct.Struct("=IIII8xH")  # tpacket3_hdr: next_offset, sec, nsec, snaplen, (len, status), mac
_STATS_V3 = struct.Struct("=III")  # tpacket_stats_v3: packets, drops, freeze_q_cnt
_STATS = struct.Struct("=II")


class CaptureError(Exception):
    """The capture cannot start; the message is one line that says what to do."""


class CapturePermissionError(CaptureError):
    """No CAP_NET_RAW."""


def _no_rights():
    exe = os.path.realpath(sys.executable)
    return CapturePermissionError(
        "capture needs root or CAP_NET_RAW: run it with sudo, or setcap cap_net_raw+ep %s" % exe)


class LiveCapture:
    """TCP segments to `ports` (and from them with `responses`), on `dev` or every interface,
    to the address `bind` only if given. read(timeout) -> list of Segments."""

    def __init__(self, ports, bind=None, responses=False, dev=None, ring=True):
        self.ring = ring
        self._drops = {"kernel": 0, "kernel_packets": 0}
        self._why = dict.fromkeys(PARSE_REASONS, 0)
        self.packets = 0
        self.segments = 0
        self._mm = self._view = None
        ports = list(ports)
        if not ports or not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
            raise CaptureError("capture needs server ports between 1 and 65535, not %r" % (ports,))
        try:  # everything is checked before the socket exists
            program = bpf.tcp_filter(ports, bind, responses)
        except ValueError:
            raise CaptureError("%r is not an IPv4 or IPv6 address to capture traffic to" % bind) from None
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        except PermissionError:
            raise _no_rights() from None
        try:
            bpf.attach(self.sock, program)
            if dev:
                self.sock.bind((dev, ETH_P_ALL))  # CPython applies htons to the protocol itself
            self._drain()  # what arrived before the filter was attached
            if ring:
                self._setup_ring()
            else:
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
                except PermissionError:  # CAP_NET_RAW without CAP_NET_ADMIN: up to rmem_max
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
                self._buf = bytearray(bpf.SNAPLEN)
                self._bufview = memoryview(self._buf)
            self._stats_now()  # counters restart here: what came before the filter is not ours
            self._drops["kernel"] = self._drops["kernel_packets"] = 0
        except OSError as e:
            self.close()
            if dev and e.errno == errno.ENODEV:
                raise CaptureError("no network interface %r here (ip link lists them)" % dev) from None
            raise CaptureError("cannot start the capture: %s" % (e.strerror or e)) from None

    def _drain(self):
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.recv(1)
        except BlockingIOError:
            pass

    def _setup_ring(self):
        self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        req = struct.pack("=7I", BLOCK_SIZE, BLOCK_COUNT, BLOCK_SIZE, BLOCK_COUNT, BLOCK_TIMEOUT_MS, 0, 0)
        self.sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        self._mm = mmap.mmap(self.sock.fileno(), BLOCK_SIZE * BLOCK_COUNT, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._mm)
        self._block = 0
        self._poll = select.poll()
        self._poll.register(self.sock.fileno(), select.POLLIN | select.POLLERR)

    def read(self, timeout=0.5):
        """Segments that arrived, waiting at most `timeout` seconds for the first ones."""
        return self._read_ring(timeout) if self.ring else self._read_recv(timeout)

    def _read_ring(self, timeout):
        """The hot path: every ready block, each packet parsed straight out of the ring."""
        mm, view, out, why = self._mm, self._view, [], self._why
        base = self._block * BLOCK_SIZE
        if mm[base + _BLOCK_STATUS_AT] & TP_STATUS_USER == 0:
            self._poll.poll(int(timeout * 1000))
        for _ in range(BLOCKS_PER_READ):
            base = self._block * BLOCK_SIZE
            if mm[base + _BLOCK_STATUS_AT] & TP_STATUS_USER == 0:
                break
            count, at = _BLOCK.unpack_from(mm, base)
            at += base
            for _ in range(count):
                nxt, sec, nsec, snap, mac = _PACKET.unpack_from(mm, at)
                seg = parse(view[at + mac:at + mac + snap], sec + nsec * 1e-9, why)
                if seg is not None:
                    out.append(seg)
                at += nxt
            self.packets += count
            struct.pack_into("=I", mm, base + _BLOCK_STATUS_AT, TP_STATUS_KERNEL)  # hand it back
            self._block = (self._block + 1) % BLOCK_COUNT
        self.segments += len(out)
        return out

    def _read_recv(self, timeout):
        """The hot path of the recv variant: recv_into until the socket is empty (or a bound)."""
        out, why, buf, sock = [], self._why, self._bufview, self.sock
        if not select.select([sock], [], [], timeout)[0]:
            return out
        ts = time.time()
        for _ in range(PACKETS_PER_READ):
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                break
            self.packets += 1
            seg = parse(buf[:n], ts, why)
            if seg is not None:
                out.append(seg)
        self.segments += len(out)
        return out

    def _stats_now(self):
        """PACKET_STATISTICS resets the kernel's counters on each read: add them up here."""
        if self.ring:
            packets, drops, _ = _STATS_V3.unpack(self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12))
        else:
            packets, drops = _STATS.unpack(self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self._drops["kernel_packets"] += packets
        self._drops["kernel"] += drops

    def stats(self):
        """Packets the filter passed (kernel_packets), lost for want of room (kernel: drops),
        read, parsed into segments, and refused by the parser by reason."""
        if self.sock.fileno() >= 0:
            self._stats_now()
        return {"kernel_packets": self._drops["kernel_packets"], "drops": self._drops["kernel"],
                "packets": self.packets, "segments": self.segments, "unparsed": dict(self._why),
                "receive": "ring" if self.ring else "recv"}

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
