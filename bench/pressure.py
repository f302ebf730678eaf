#!/usr/bin/env python3
"""The "under pressure" section of `make bench` (issue 15): what misbehaving or merely numerous
clients cost the others, each figure beside a reference measured in the same run, in the same
topology, without the pressure.

Run as root from the checkout: `python bench/bench.py --only pressure` (with the other rows:
`make bench`). While developing: `python bench/pressure.py [--quick] [--parts stuck2 fanout ...]`
(prints the section; every figure is also in bench/tmp/pressure.json).

Parts (each with its own fresh servers and namespaces; A = the server with the tap in namespace
A, dialed by B with --connect; "stuck" = a WebSocket that never reads, SO_RCVBUF 4096):
  1 stuck2     2 stuck clients on A during an iperf3 transfer A->B over the direct link
  2 tls-hold   A serves wss (--ssl-cert), B dials it with wss://; a TLS client on A holds half a
               16 KiB TLS record, one byte a second; ping B->A 100 times, 0.1 s apart
  3 slowloris  bench/slowloris.py's attack (1 000 idle + 200 slowloris connections from 127.0.0.2)
               on A; GET / and a /ws upgrade from 127.0.0.1 once a second, pings over the link
  4 stuck1000  1 000 stuck clients (10 from each of 127.0.0.2-101) on A during a 20 s transfer;
               once on loopback as the issue asks, once with clients announcing MSS 1460
               (STUCK_VARIANTS says why)
  5 fanout     throughput and RTT of the direct link beside 0, 1, 10, 100 reading clients on A
               (clients that read and discard everything and answer pings), hub and --learn;
               N = 0 again at the end, to show how far the machine drifted meanwhile
  6 footprint  what A holds (sockets, threads, fds, RSS) at 0, 1, 100, 1 000 idle WebSockets

The clients are this same file run as a separate process (`pressure.py client MODE ...`): one
process holds many sockets (one epoll loop), so the bench can stop them by PID, measure their
CPU, and "their sockets are gone" means that process exited.

Traffic goes only to loopback and to the namespaces made here; every load is bounded in count
and time; every namespace, tap and process is removed on exit, error and SIGINT/SIGTERM by
bench.py's Scope (processes by PID).
"""

import base64
import json
import os
import re
import select
import signal
import socket
import ssl
import statistics
import struct
import sys
import threading
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PARTS = ["stuck2", "tls-hold", "slowloris", "stuck1000", "fanout", "footprint"]
PER_SOURCE = 10  # WebSockets per loopback source address (the per-address limit is 64)


# ================================================================ the clients (a separate process)

def _source(i):
    """The loopback address of the i-th client socket: 10 per address from 127.0.0.2 on."""
    return "127.0.0.%d" % (2 + i // PER_SOURCE)  # i < 2 520


def upgrade(port, source=None, rcvbuf=None, mss=None, context=None, timeout=30):
    """A socket with the /ws upgrade done (as tests/wsclient.py, plus TCP_MAXSEG): `rcvbuf` sets
    SO_RCVBUF and `mss` the MSS our SYN announces, both before connecting."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if mss:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    if source:
        sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    sock.sendall(("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                  % (port, base64.b64encode(os.urandom(16)).decode())).encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1)  # byte by byte: nothing past the handshake is consumed
        if not chunk:
            raise OSError("closed during the handshake: %r" % response[:100])
        response += chunk
    if not response.startswith(b"HTTP/1.1 101"):
        raise OSError("refused: %r" % response.split(b"\r\n")[0])
    return sock


# Client modes: how each socket is made, and what it then does.
MODES = {
    "stuck": {"rcvbuf": 4096},  # never reads
    "stuck-mss1460": {"rcvbuf": 4096, "mss": 1460},  # never reads; MSS as over Ethernet, not loopback's 65 483
    "reading": {},  # reads and discards everything, answers pings
    "tls-hold": {},  # TLS; then holds half a TLS record
}


def _connect_all(mode, port, count, offset, context=None):
    """Upgrade `count` sockets (4 threads, addresses taking turns); return them and the errors."""
    socks, errors = [None] * count, []

    def work(k):
        for i in range(k, count, 4):
            try:
                socks[i] = upgrade(port, source=None if context else _source(offset + i), context=context,
                                   **MODES[mode])
            except OSError as err:
                errors.append("%s: %s" % (type(err).__name__, str(err)[:120]))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(min(4, count))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [s for s in socks if s is not None], errors


class _Reader:
    """One socket's receive state: skips data payloads without looking at them, collects
    control frames (ping, close) and answers them. Server frames are never masked."""

    __slots__ = ("sock", "head", "skip", "control")

    def __init__(self, sock):
        self.sock = sock
        self.head = b""  # a frame header read in part
        self.skip = 0  # payload bytes of the current frame still to come
        self.control = None  # (opcode, payload so far) while a control frame arrives


def _mask_frame(opcode, payload):
    """A masked client frame (RFC 6455 5.3), for control frames (<= 125 bytes)."""
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + key + masked


def _header_size(head):
    n = head[1] & 0x7F
    return 2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if head[1] & 0x80 else 0)


def _parse(r, data, n):
    """Walk frame boundaries in data[:n]; return the control frames completed: [(op, payload)]."""
    done, i = [], 0
    while i < n:
        if r.skip:
            take = min(r.skip, n - i)
            if r.control is not None:
                r.control = (r.control[0], r.control[1] + bytes(data[i:i + take]))
            r.skip -= take
            i += take
            if not r.skip and r.control is not None:
                done.append(r.control)
                r.control = None
            continue
        want = 2 if len(r.head) < 2 else _header_size(r.head)
        take = min(want - len(r.head), n - i)
        r.head += bytes(data[i:i + take])
        i += take
        if len(r.head) < 2 or len(r.head) < _header_size(r.head):
            continue
        head, r.head = r.head, b""
        op, size = head[0] & 0x0F, head[1] & 0x7F
        if size == 126:
            size = struct.unpack("!H", head[2:4])[0]
        elif size == 127:
            size = struct.unpack("!Q", head[2:10])[0]
        if op >= 8:
            r.control = (op, b"")
            if not size:
                done.append(r.control)
                r.control = None
        r.skip = size
    return done


def client_main(argv):
    """`pressure.py client MODE PORT COUNT [OFFSET] [CAFILE]`; MODE: stuck, reading, tls-hold.

    Prints `up N` (and `error ...` lines) once its sockets are upgraded, then holds them until
    SIGTERM; `reading` then prints one JSON line (bytes read, pongs sent, closed by the server)."""
    import resource
    mode, port, count = argv[0], int(argv[1]), int(argv[2])
    offset = int(argv[3]) if len(argv) > 3 else 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    context = None
    if mode == "tls-hold":
        context = ssl.create_default_context(cafile=argv[4])
    socks, errors = _connect_all(mode, port, count, offset, context)
    for e in errors[:5]:
        print("error", e, flush=True)
    print("up %d" % len(socks), flush=True)
    if mode.startswith("stuck"):  # never read: the server's frames pile up in its own buffers and queue
        while not stop.wait(0.5):
            pass
    elif mode == "tls-hold":
        # The header of a 16 KiB application-data record, then its body one byte a second,
        # written under the TLS layer: the server never gets a whole record.
        fd = socks[0].fileno()
        os.write(fd, b"\x17\x03\x03\x40\x00")
        print("holding", flush=True)
        while not stop.wait(1.0):
            os.write(fd, b"\x00")
    else:
        _read_all(socks, stop)


def _read_all(socks, stop):
    """Read and discard everything on every socket (one epoll), answer pings and Close."""
    ep = select.epoll()
    readers = {}
    for s in socks:
        s.setblocking(False)
        readers[s.fileno()] = _Reader(s)
        ep.register(s.fileno(), select.EPOLLIN)
    buf = bytearray(1 << 18)
    view = memoryview(buf)
    total = pongs = closed = 0
    while not stop.is_set():
        for fd, _ in ep.poll(0.2):
            r = readers.get(fd)
            if r is None:
                continue
            try:
                n = r.sock.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if n:
                total += n
                for op, payload in _parse(r, view, n):
                    try:
                        if op == 9:  # ping: pong with the same payload
                            r.sock.send(_mask_frame(0xA, payload))
                            pongs += 1
                        elif op == 8:  # close: answer it; the server then closes TCP
                            r.sock.send(_mask_frame(0x8, payload[:2]))
                    except OSError:
                        pass  # a few bytes that do not fit: the server's keepalive will say so
                continue
            closed += 1
            ep.unregister(fd)
            del readers[fd]
            r.sock.close()
    print(json.dumps({"bytes": total, "pongs": pongs, "closed_by_server": closed, "open": len(readers)}),
          flush=True)


# ================================================================ the bench side

class _Part:
    """What every part needs: bench.py's toolbox (B), --quick, unique log names, a server pair
    and client processes."""

    def __init__(self, bench):
        self.B = sys.modules[type(bench).__module__]  # bench.py, whether run as a script or imported
        self.bench = bench
        self.quick = bench.args.quick
        self.names = iter(range(1, 1 << 30))

    def name(self, what):
        return "pressure-%d-%s" % (next(self.names), what)

    def pair(self, scope, tag, a_extra=(), b_extra=(), scheme="ws", context=None):
        """Servers A and B (B dials A), taps in fresh namespaces; returns (A, B, ports, ns)."""
        B = self.B
        ns_a = scope.add_netns("gelfpress-%d-%sa" % (os.getpid(), tag))
        ns_b = scope.add_netns("gelfpress-%d-%sb" % (os.getpid(), tag))
        p1, p2 = B.free_port(), B.free_port()
        s1 = self.bench.gelf(scope, self.name("A"), B.TAG + tag + "a", p1, list(a_extra))
        s2 = self.bench.gelf(scope, self.name("B"), B.TAG + tag + "b", p2,
                             ["--connect", "%s://127.0.0.1:%d/ws" % (scheme, p1)] + list(b_extra))
        B.place(B.TAG + tag + "a", ns_a, B.ADDR_A)
        B.place(B.TAG + tag + "b", ns_b, B.ADDR_B)
        wait_for(lambda: any(l["kind"] == "direct" and l["state"] == "open"
                             for l in stats(p1, context)["links"]), 20, "the direct link on A", [s1, s2])
        B.wait_ping(ns_a, B.ADDR_B)
        return s1, s2, (p1, p2), (ns_a, ns_b)

    def clients(self, scope, mode, port, count, offset=0, cafile=None, timeout=120):
        """Start a client process holding `count` upgraded sockets; wait for `up`."""
        cmd = [self.B.PYTHON, str(BENCH / "pressure.py"), "client", mode, str(port), str(count), str(offset)]
        if cafile:
            cmd.append(cafile)
        proc = scope.start(self.name("clients-%s-%d" % (mode, count)), cmd)
        m = proc.wait_line(r"^up (\d+)$", timeout)
        if not m or int(m.group(1)) != count:
            raise self.B.RowFailed("%s clients: %s of %d upgraded: %s" % (
                mode, m.group(1) if m else "none", count, proc.tail()))
        return proc

    def stop(self, scope, proc):
        proc.stop()
        scope.procs.remove(proc)


def wait_for(pred, timeout, what, needs=(), every=0.2):
    deadline = time.monotonic() + timeout
    while True:
        for p in needs:
            if not p.alive():
                raise RuntimeError("%s exited while waiting for %s: %s" % (p.name, what, p.tail()))
        try:
            value = pred()
        except (OSError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError("no %s after %s s" % (what, timeout))
        time.sleep(every)


def stats(port, context=None):
    scheme = "https" if context is not None else "http"
    with urllib.request.urlopen("%s://127.0.0.1:%d/stats" % (scheme, port), timeout=10, context=context) as r:
        return json.loads(r.read())


def links(port, kind=None, context=None):
    return [l for l in stats(port, context)["links"] if kind is None or l["kind"] == kind]


def footprint(pid):
    """Threads, open descriptors, sockets among them, resident memory (MB) of one process."""
    fds = os.listdir("/proc/%d/fd" % pid)
    sockets = 0
    for fd in fds:
        try:
            sockets += os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:")
        except OSError:
            pass
    rss = 0.0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return {"threads": len(os.listdir("/proc/%d/task" % pid)), "fds": len(fds), "sockets": sockets, "rss": rss}


def load():
    return os.getloadavg()[0]


def ping_times(B, ns, addr, count, interval):
    """count pings; every reply's time (ms) and the number lost."""
    res = B.sh(["ip", "netns", "exec", ns, "ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", addr],
               timeout=count * interval + 30, check=False)
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", res.stdout)]
    return times, count - len(times)


def rtt_summary(times, lost):
    if not times:
        return {"median": None, "p99": None, "max": None, "lost": lost}
    s = sorted(times)
    return {"median": statistics.median(s), "p99": s[max(0, -(-99 * len(s) // 100) - 1)], "max": s[-1], "lost": lost}


_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}
_INTERVAL = re.compile(r"\]\s+([\d.]+)-([\d.]+)\s+sec\s+[\d.]+ \w?Bytes\s+([\d.]+) (\w?)bits/sec\s*$", re.M)


def transfer(part, scope, ns_a, ns_b, seconds, during=None):
    """iperf3 TCP A->B for `seconds`; the receiver's 1-s intervals (Gbit/s) and its total rate.
    `during(t0, done)` runs in a thread from the client's start (t0) until `done` is set (a watcher)."""
    B = part.B
    server = scope.start(part.name("iperf3-server"), ["ip", "netns", "exec", ns_b, "iperf3", "-s", "-1", "-B",
                                                        B.ADDR_B, "-p", str(B.IPERF_PORT), "--forceflush"])
    try:
        if not server.wait_line(r"Server listening", 10):
            raise B.RowFailed("iperf3 server did not start: %s" % server.tail())
        cmd = ["ip", "netns", "exec", ns_a, "iperf3", "-c", B.ADDR_B, "-p", str(B.IPERF_PORT), "-t", str(seconds),
               "-i", "1", "-J", "--get-server-output", "--connect-timeout", "3000"]
        done = threading.Event()
        t0 = time.monotonic()
        watcher = None
        if during is not None:
            watcher = threading.Thread(target=during, args=(t0, done), daemon=True)
            watcher.start()
        try:
            res = B.sh(cmd, timeout=seconds + 30, check=False)
        finally:
            done.set()
            if watcher is not None:
                watcher.join(30)
        try:
            data = json.loads(res.stdout)
        except ValueError:
            raise B.RowFailed("iperf3: exit %d: %s" % (res.returncode, (res.stderr or res.stdout)[-200:]))
        if data.get("error"):
            raise B.RowFailed("iperf3: %s" % data["error"])
        intervals = [float(v) * _UNITS[u] / 1e9 for a, b, v, u in _INTERVAL.findall(data["server_output_text"])
                     if float(b) - float(a) > 0.5 and float(b) - float(a) < 1.5]
        total = data["end"]["sum_received"]["bits_per_second"] / 1e9
        return {"gbps": total, "intervals": intervals}
    finally:
        server.stop()
        scope.procs.remove(server)


def cpu(B, proc):
    try:
        return B.cpu_seconds(proc.pid)
    except OSError:
        return float("nan")


# ---------------------------------------------------------------- 1. two clients that never read

def part_stuck2(part, scope, out):
    seconds = 8 if part.quick else 15
    repeats = 1 if part.quick else 2
    s1, s2, (p1, p2), (ns_a, ns_b) = part.pair(scope, "p1")
    out["seconds"], out["runs"] = seconds, []
    for r in range(repeats):
        ref = {"load": load()}
        ref.update(transfer(part, scope, ns_a, ns_b, seconds))
        time.sleep(1)
        stuck = part.clients(scope, "stuck", p1, 2)
        wait_for(lambda: len(links(p1, "browser")) == 2, 20, "2 stuck links on A")
        drops0 = stats(p1)["drops"]["queue_full"]
        got = {"load": load()}
        left = {}

        def watch(t0, done):
            while not done.is_set() and "at" not in left:
                try:
                    if not links(p1, "browser"):
                        left["at"] = time.monotonic() - t0
                except (OSError, ValueError):
                    pass
                time.sleep(0.25)

        t0 = time.monotonic()
        got.update(transfer(part, scope, ns_a, ns_b, seconds, during=watch))
        while "at" not in left and time.monotonic() - t0 < seconds + 15:  # not yet: a while longer
            if not links(p1, "browser"):
                left["at"] = time.monotonic() - t0
            time.sleep(0.25)
        got["left_after"] = left.get("at")
        got["queue_full"] = stats(p1)["drops"]["queue_full"] - drops0
        got["listed_after"] = [l["kind"] for l in links(p1)]
        part.stop(scope, stuck)
        out["runs"].append({"ref": ref, "stuck": got})
        time.sleep(1)


# ---------------------------------------------------------------- 2. half a TLS record on a wss server

def part_tls_hold(part, scope, out):
    B = part.B
    tmp = scope.tmpdir()
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    B.sh(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
          "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert], timeout=60)
    context = ssl.create_default_context(cafile=cert)
    s1, s2, (p1, p2), (ns_a, ns_b) = part.pair(scope, "p2", a_extra=["--ssl-cert", cert, "--ssl-key", key],
                                               b_extra=["--cacert", cert], scheme="wss", context=context)
    count = 40 if part.quick else 100
    out["count"] = count
    out["ref_load"] = load()
    out["ref"] = rtt_summary(*ping_times(B, ns_b, B.ADDR_A, count, 0.1))
    holder = part.clients(scope, "tls-hold", p1, 1, cafile=cert)
    if not holder.wait_line(r"^holding$", 10):
        raise B.RowFailed("the TLS holder did not start: %s" % holder.tail())
    wait_for(lambda: len(links(p1, "browser", context)) == 1, 20, "the holder's link on A")
    out["load"] = load()
    out["held"] = rtt_summary(*ping_times(B, ns_b, B.ADDR_A, count, 0.1))
    out["holder_listed"] = len(links(p1, "browser", context)) == 1  # still connected, still holding
    part.stop(scope, holder)


# ---------------------------------------------------------------- 3. slowloris (bench/slowloris.py, folded in)

def part_slowloris(part, scope, out):
    import slowloris  # bench/slowloris.py: its attacker, its timed requests

    B = part.B
    seconds = 10 if part.quick else 20
    s1, s2, (p1, p2), (ns_a, ns_b) = part.pair(scope, "p3")
    out["seconds"] = seconds

    def measure():
        pings = int(seconds / 0.2)
        ping = scope.start(part.name("ping"), ["ip", "netns", "exec", ns_b, "ping", "-n", "-i", "0.2", "-c",
                                               str(pings), "-W", "2", B.ADDR_A])
        gets, upgrades = [], []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            tick = time.monotonic()
            gets.append(slowloris.timed(p1, slowloris.GET, b"HTTP/1.1 200"))
            upgrades.append(slowloris.timed(p1, slowloris.UPGRADE, b"HTTP/1.1 101"))
            time.sleep(max(0.0, 1 - (time.monotonic() - tick)))
        ping.p.wait(30)
        text = ping.text()
        replies = len(set(re.findall(r"icmp_seq=(\d+) ", text)))
        ping.stop()
        scope.procs.remove(ping)
        return {"get": gets, "upgrade": upgrades, "pings": pings, "lost": pings - replies}

    out["ref_load"] = load()
    out["ref"] = measure()
    attacker = scope.start(part.name("attacker"), [B.PYTHON, "-c", slowloris.ATTACKER, str(p1), "1000", "200",
                                                    str(seconds + 5)])
    if not attacker.wait_line(r"^attacking$", 20):
        raise B.RowFailed("the attacker did not start: %s" % attacker.tail())
    time.sleep(2)
    out["load"] = load()
    out["attack"] = measure()
    m = attacker.wait_line(r"closed by the server: (\d+)", 15)
    out["loris_closed"] = int(m.group(1)) if m else None
    part.stop(scope, attacker)


# ---------------------------------------------------------------- 4. 1 000 clients that never read, 20 s transfer

def tcp_memory_mb():
    """TCP memory of the whole host, MB (/proc/net/sockstat counts pages): tcp_mem is host-wide."""
    with open("/proc/net/sockstat") as f:
        m = re.search(r"^TCP:.* mem (\d+)", f.read(), re.M)
    return int(m.group(1)) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20 if m else float("nan")


# Part 4's clients: as the issue asks (loopback), and with the MSS a client across Ethernet has.
# On loopback (MSS 65 483) the kernel lets gelf write about 3 MB into a socket whose peer never
# reads (its send buffer starts at 2 x 10 segments of 64 KiB and grows to tcp_wmem's 4 MiB); with
# MSS 1460, about 110 kB. 1 000 such loopback sockets take the host's TCP memory (tcp_mem, for the
# whole host) to its pressure threshold: every TCP socket on the machine then gets small buffers,
# until those sockets are gone. The loopback variant runs first, so A's RSS figures are its own.
STUCK_VARIANTS = [("stuck", "clients on loopback (MSS 65 483), as the issue asks"),
                  ("stuck-mss1460", "clients with MSS 1460 (as across Ethernet)")]


def part_stuck1000(part, scope, out):
    B = part.B
    seconds = 12 if part.quick else 20
    count = 300 if part.quick else 1000
    s1, s2, (p1, p2), (ns_a, ns_b) = part.pair(scope, "p4")
    out["seconds"], out["count"], out["variants"] = seconds, count, []
    out["ref_load"] = load()
    out["ref"] = transfer(part, scope, ns_a, ns_b, seconds)
    for mode, label in STUCK_VARIANTS:
        time.sleep(1)
        v = {"mode": mode, "label": label, "before": footprint(s1.pid), "tcp_mem_before": tcp_memory_mb()}
        out["variants"].append(v)
        drops0 = stats(p1)["drops"]["queue_full"]
        t = time.monotonic()
        stuck = part.clients(scope, mode, p1, count)
        wait_for(lambda: len(links(p1, "browser")) == count, 60, "%d stuck links on A" % count)
        v["connect_s"] = time.monotonic() - t
        v["connected"] = footprint(s1.pid)
        v["load"] = load()
        seen = {"peak": dict(v["connected"]), "alone": None, "queued": None, "tcp_mem": v["tcp_mem_before"]}

        def watch(t0, done):
            last = 0.0
            while not done.is_set():
                fp = footprint(s1.pid)
                for k in fp:
                    seen["peak"][k] = max(seen["peak"][k], fp[k])
                seen["tcp_mem"] = max(seen["tcp_mem"], tcp_memory_mb())
                now = time.monotonic()
                if seen["alone"] is None and now - last >= 1.0:  # /stats of 1 000 links costs A some CPU
                    last = now
                    try:
                        listed = links(p1)
                        if seen["queued"] is None and any(l["queued"] for l in listed):
                            seen["queued"] = now - t0  # their sockets are full: the no-progress clock runs
                        if [l["kind"] for l in listed] == ["direct"]:
                            seen["alone"] = now - t0
                    except (OSError, ValueError):
                        pass
                time.sleep(0.25)

        cpu0 = cpu(B, s1)
        t0 = time.monotonic()
        v.update(transfer(part, scope, ns_a, ns_b, seconds, during=watch))
        v["s1_cpu"] = cpu(B, s1) - cpu0
        while seen["alone"] is None and time.monotonic() - t0 < seconds + 20:  # the clients still connected
            if [l["kind"] for l in links(p1)] == ["direct"]:
                seen["alone"] = time.monotonic() - t0
            time.sleep(0.5)
        v["peak"], v["tcp_mem"] = seen["peak"], seen["tcp_mem"]
        v["alone_after"], v["queued_after"] = seen["alone"], seen["queued"]
        v["listed_after"] = sorted(set(l["kind"] for l in links(p1)))
        v["queue_full"] = stats(p1)["drops"]["queue_full"] - drops0
        v["end"] = footprint(s1.pid)  # the clients' sockets still open
        v["tcp_mem_end"] = tcp_memory_mb()
        part.stop(scope, stuck)  # now their sockets are gone
        t = time.monotonic()
        back = None
        while time.monotonic() - t < 15:
            fp = footprint(s1.pid)
            if fp["threads"] <= v["before"]["threads"] and fp["fds"] <= v["before"]["fds"]:
                back = time.monotonic() - t
                break
            time.sleep(0.1)
        v["back_after"] = back
        v["after"] = footprint(s1.pid)
        time.sleep(1)
        v["tcp_mem_after"] = tcp_memory_mb()


# ---------------------------------------------------------------- 5. fan-out to reading links

def part_fanout(part, scope, out):
    B = part.B
    seconds = 3 if part.quick else 5
    pings = 50 if part.quick else 100
    counts = [0, 1, 10, 100, 0]  # N=0 again at the end: how far the machine drifted meanwhile
    out["seconds"], out["pings"], out["rows"] = seconds, pings, []
    for mode in ("hub", "learn"):
        sub = B.Scope()  # each mode's servers and clients go before the next mode's start
        try:
            s1, s2, (p1, p2), (ns_a, ns_b) = part.pair(sub, "p5" + mode[0],
                                                       a_extra=["--learn"] if mode == "learn" else [])
            for i, n in enumerate(counts):
                row = {"mode": mode, "n": n, "again": i > 0 and not n}
                out["rows"].append(row)
                readers = []
                try:
                    # 50 sockets per client process: two processes for 100 links
                    for k in range(0, n, 50):
                        readers.append(part.clients(sub, "reading", p1, min(50, n - k), offset=k))
                    if n:
                        wait_for(lambda: len(links(p1, "browser")) == n, 30, "%d reading links" % n)
                    time.sleep(0.5)
                    row["load"] = load()
                    row["rtt"] = rtt_summary(*ping_times(B, ns_a, B.ADDR_B, pings, 0.02))
                    c0 = [cpu(B, r) for r in readers]
                    s0 = cpu(B, s1)
                    t0 = time.monotonic()
                    row.update(transfer(part, sub, ns_a, ns_b, seconds))
                    wall = time.monotonic() - t0
                    row["s1_cpu"] = (cpu(B, s1) - s0) / wall
                    row["readers_cpu"] = [(cpu(B, r) - c) / wall for r, c in zip(readers, c0)]
                    row["drops"] = stats(p1)["drops"]["queue_full"]
                    row["still"] = len(links(p1, "browser"))
                finally:
                    for r in readers:
                        part.stop(sub, r)
                    if readers:
                        wait_for(lambda: not links(p1, "browser"), 30, "the reading links to leave")
                time.sleep(0.5)
        except (B.RowFailed, RuntimeError) as err:
            out.setdefault("notes", []).append("%s: %s" % (mode, err))
        finally:
            sub.close()


# ---------------------------------------------------------------- 6. what one server holds

def part_footprint(part, scope, out):
    s1, s2, (p1, p2), (ns_a, ns_b) = part.pair(scope, "p6")
    time.sleep(1)
    out["rows"] = [dict(footprint(s1.pid), n=0, links=len(links(p1)), load=load())]
    held, total = [], 0
    for n in (1, 100, 1000):
        t = time.monotonic()
        held.append(part.clients(scope, "reading", p1, n - total, offset=total))
        total = n
        wait_for(lambda: len(links(p1, "browser")) == n, 60, "%d idle links" % n)
        connect = time.monotonic() - t
        time.sleep(1)
        out["rows"].append(dict(footprint(s1.pid), n=n, links=len(links(p1)), load=load(), connect_s=connect))
    t = time.monotonic()
    for proc in held:
        part.stop(scope, proc)
    wait_for(lambda: not links(p1, "browser"), 30, "the idle links to leave")
    out["gone_s"] = time.monotonic() - t
    time.sleep(1)
    out["after"] = dict(footprint(s1.pid), links=len(links(p1)))


RUNNERS = {"stuck2": part_stuck2, "tls-hold": part_tls_hold, "slowloris": part_slowloris,
           "stuck1000": part_stuck1000, "fanout": part_fanout, "footprint": part_footprint}


def run(bench, parts=None):
    """Run the parts (all by default) on `bench` (a bench.Bench); return {part: results}."""
    part = _Part(bench)
    B = part.B
    results = {"_run": {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_before": load(), "quick": part.quick,
                        "cpu": "%s, %d cores" % (B.cpu_model(), os.cpu_count()), "commit": B.git_commit()}}
    started = time.monotonic()
    for name in parts or PARTS:
        out = results[name] = {}
        scope = bench.scope = B.Scope()
        t = time.monotonic()
        B.log("pressure: %s" % name)
        try:
            RUNNERS[name](part, scope, out)
        except (B.RowFailed, RuntimeError) as err:
            out["failed"] = str(err)
        except Exception as err:  # a bug or a surprise: report it, go on with the next part
            out["failed"] = "%s: %s" % (type(err).__name__, err)
        finally:
            bench.scope = None
            scope.close()
        out["elapsed"] = time.monotonic() - t
        B.log("pressure: %s done in %.0f s%s" % (name, out["elapsed"],
                                                 ": failed: " + out["failed"] if "failed" in out else ""))
    results["_run"].update(load_after=load(), elapsed=time.monotonic() - started)
    (B.LOGS / "pressure.json").write_text(json.dumps(results, indent=1))  # every figure, for a closer look
    return results


# ================================================================ the report

def _f(v, fmt="%.2f", none="–"):
    return none if v is None else fmt % v


def _ok(cond):
    return "**met**" if cond else "**missed**"


def _times(ts):
    done = sorted(t for t in ts if t is not None)
    return {"n": len(ts), "unanswered": len(ts) - len(done), "median": statistics.median(done) if done else None,
            "worst": done[-1] if done else None, "over2": sum(t > 2 for t in done) + len(ts) - len(done)}


def _last5(intervals):
    return statistics.mean(intervals[-5:]) if len(intervals) >= 5 else None


def report(results):
    """The section's Markdown: a summary table (one row per goal), then each part's detail."""
    run = results.get("_run", {})
    out = ["## Under pressure", "",
           "- run: %s%s, %.0f s; %s; gelf %s; load average (1 min) before / after: %.2f / %.2f" % (
               "--quick, " if run.get("quick") else "", run.get("date", "?"), run.get("elapsed", 0),
               run.get("cpu", "?"), run.get("commit", "?"), run.get("load_before", 0), run.get("load_after", 0)), "",
           "Each figure beside a reference measured in the same run, same topology, without the pressure. "
           "A = the server under pressure (tap in namespace A), B dials it (`--connect`); transfers are iperf3 "
           "TCP A→B over the direct link, the receiver's rate and its 1-s intervals. \"load\" is the 1-minute "
           "load average just before each measurement (2 cores; other work may be running).", "",
           "| goal | under pressure | reference (no pressure) | ratio | load (ref / pressure) | met? | notes |",
           "|---|--:|--:|--:|--:|---|---|"]
    detail = []
    for name in PARTS:
        r = results.get(name)
        if r is None:
            continue
        if "failed" in r:
            out.append("| %s | failed: %s | | | | | |" % (name, r["failed"].replace("|", "/")))
            continue
        rows, more = globals()["_report_" + name.replace("-", "_")](r)
        out += rows
        detail += more
    return "\n".join(out + [""] + _noise(results) + detail)


def _noise(results):
    """The same measurement repeated within this run, as a measure of how noisy the figures are."""
    said = []
    runs = results.get("stuck2", {}).get("runs")
    if runs and len(runs) > 1:
        said.append("part 1's reference transfer %s Gbit/s" % " and ".join("%.2f" % r["ref"]["gbps"] for r in runs))
    for mode in ("hub", "learn"):
        zero = [r["gbps"] for r in results.get("fanout", {}).get("rows", []) if r["mode"] == mode and not r["n"]
                and "gbps" in r]
        if len(zero) > 1:
            said.append("part 5's %s N=0 %s Gbit/s (first, last)" % (mode, " and ".join("%.2f" % z for z in zero)))
    ref = results.get("stuck1000", {}).get("ref", {}).get("intervals")
    if ref and len(ref) > 2:
        said.append("part 4's reference 1-s intervals %.2f to %.2f Gbit/s (coefficient of variation %.0f %%)" % (
            min(ref), max(ref), 100 * statistics.pstdev(ref) / statistics.mean(ref)))
    if not said:
        return []
    return ["Noise, the same measurement repeated within this run: %s." % "; ".join(said), ""]


def _report_stuck2(r):
    rows, det = [], ["### 1. Two clients that never read (SO_RCVBUF 4096) on A, %d s transfer" % r["seconds"], "",
                     "| run | load ref / stuck | Gbit/s ref | Gbit/s stuck | ratio | min 1-s interval ref / stuck "
                     "(Gbit/s) | stuck links left /stats after | queue_full drops | /stats after |",
                     "|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    ratios, mins, lefts = [], [], []
    for i, run in enumerate(r["runs"], 1):
        ref, st = run["ref"], run["stuck"]
        ratio = st["gbps"] / ref["gbps"] if ref["gbps"] else None
        ratios.append(ratio)
        mins.append(min(st["intervals"]) if st["intervals"] else None)
        lefts.append(st["left_after"])
        det.append("| %d | %.2f / %.2f | %.3f | %.3f | %s | %s / %s | %s | %d | %s |" % (
            i, ref["load"], st["load"], ref["gbps"], st["gbps"], _f(ratio),
            _f(min(ref["intervals"]) if ref["intervals"] else None, "%.3f"), _f(mins[-1], "%.3f"),
            _f(st["left_after"], "%.1f s", "still listed"), st["queue_full"], ", ".join(st["listed_after"])))
    det.append("")
    last = r["runs"][-1]
    met = all(x is not None and x >= 0.5 for x in ratios) and all(m for m in mins) and all(
        x is not None for x in lefts)
    rows.append("| 1. 2 never-reading clients: direct link ≥ 0.5× its rate, no 1-s interval at 0, their links "
                "leave /stats | %s Gbit/s (min 1-s %s; links gone after %s) | %s Gbit/s | %s | %s | %s | "
                "runs: %d, ratios %s |" % (
                    " / ".join("%.3f" % run["stuck"]["gbps"] for run in r["runs"]),
                    " / ".join(_f(m, "%.3f") for m in mins),
                    " / ".join(_f(x, "%.1f s", "never") for x in lefts),
                    " / ".join("%.3f" % run["ref"]["gbps"] for run in r["runs"]),
                    _f(min((x for x in ratios if x is not None), default=None)),
                    "%.2f / %.2f" % (last["ref"]["load"], last["stuck"]["load"]), _ok(met),
                    len(r["runs"]), ", ".join(_f(x) for x in ratios)))
    return rows, det


def _report_tls_hold(r):
    ref, held = r["ref"], r["held"]
    met = held["max"] is not None and held["max"] <= 200 and not held["lost"]
    rows = ["| 2. half a TLS record held on a wss server: ping over the wss link ≤ 200 ms at worst | "
            "max %s ms (median %s, p99 %s, %d lost) | max %s ms (median %s, p99 %s, %d lost) | – | %.2f / %.2f | "
            "%s | %d pings 0.1 s apart, B→A; holder still connected: %s |" % (
                _f(held["max"], "%.1f"), _f(held["median"], "%.2f"), _f(held["p99"], "%.1f"), held["lost"],
                _f(ref["max"], "%.1f"), _f(ref["median"], "%.2f"), _f(ref["p99"], "%.1f"), ref["lost"],
                r["ref_load"], r["load"], _ok(met), r["count"], "yes" if r["holder_listed"] else "no")]
    return rows, []


def _report_slowloris(r):
    rows, det = [], ["### 3. 200 slowloris + 1 000 idle TCP connections from 127.0.0.2 on A (%d s)" % r["seconds"],
                     "", "| | GET / median / worst (s) | /ws upgrade median / worst (s) | over 2 s or unanswered | "
                         "pings lost over the direct link | load |", "|---|--:|--:|--:|--:|--:|"]
    summary = {}
    for key, label, ld in (("ref", "reference", r["ref_load"]), ("attack", "under attack", r["load"])):
        m = r[key]
        g, u = _times(m["get"]), _times(m["upgrade"])
        summary[key] = (g, u, m)
        det.append("| %s | %s / %s | %s / %s | %d + %d of %d + %d | %d of %d | %.2f |" % (
            label, _f(g["median"], "%.3f"), _f(g["worst"], "%.3f"), _f(u["median"], "%.3f"), _f(u["worst"], "%.3f"),
            g["over2"], u["over2"], g["n"], u["n"], m["lost"], m["pings"], ld))
    det += ["", "Slowloris connections the server closed during the attack: %s." % r.get("loris_closed"), ""]
    g, u, m = summary["attack"]
    rg, ru, rm = summary["ref"]
    met = g["over2"] == 0 and u["over2"] == 0 and m["lost"] == 0
    rows.append("| 3. slowloris 200 + 1 000 idle from 127.0.0.2: GET / and /ws from 127.0.0.1 ≤ 2 s, the direct "
                "link loses nothing | worst GET %s s, upgrade %s s; %d pings lost | worst GET %s s, upgrade %s s; "
                "%d lost | – | %.2f / %.2f | %s | once a second for %d s |" % (
                    _f(g["worst"], "%.3f"), _f(u["worst"], "%.3f"), m["lost"], _f(rg["worst"], "%.3f"),
                    _f(ru["worst"], "%.3f"), rm["lost"], r["ref_load"], r["load"], _ok(met), r["seconds"]))
    return rows, det


def _report_stuck1000(r):
    ref5 = _last5(r["ref"]["intervals"])
    rows = []
    det = ["### 4. %d WebSockets that never read (10 from each of 100 loopback addresses) on A, %d s transfer"
           % (r["count"], r["seconds"]), "",
           "1-s intervals (Gbit/s, receiver), reference (load %.2f): %s" % (
               r["ref_load"], " ".join("%.2f" % x for x in r["ref"]["intervals"])), ""]
    for v in r["variants"]:
        if "gbps" not in v:
            continue
        got5 = _last5(v["intervals"])
        ratio = got5 / ref5 if ref5 and got5 is not None else None
        grew = v["peak"]["threads"] - v["before"]["threads"]
        met = (ratio is not None and ratio >= 0.8 and v["alone_after"] is not None and v["back_after"] is not None
               and v["back_after"] <= 5 and grew < 10)
        rows.append(
            "| 4. %d never-reading clients (%s), %d s transfer: last 5 s ≥ 0.8× reference, /stats then the direct "
            "link alone, threads and fds back within 5 s | last 5 s %s Gbit/s (whole %.3f); direct link alone after "
            "%s; threads/fds back %s after the clients exit | last 5 s %s Gbit/s (whole %.3f) | %s | %.2f / %.2f | "
            "%s | threads +%d at most; their sockets full %s into the transfer; host TCP memory up to %.0f MB |" % (
                r["count"], v["label"], r["seconds"], _f(got5, "%.3f"), v["gbps"],
                _f(v["alone_after"], "%.1f s", "never"), _f(v["back_after"], "%.1f s", "> 15 s"), _f(ref5, "%.3f"),
                r["ref"]["gbps"], _f(ratio), r["ref_load"], v["load"], _ok(met), grew,
                _f(v["queued_after"], "%.0f s", "never"), v["tcp_mem"]))
        det += ["#### %s (load %.2f)" % (v["label"], v["load"]), "",
                "| A's process | threads | fds | sockets | RSS MB |", "|---|--:|--:|--:|--:|"]
        for key, label in (("before", "before the clients"),
                           ("connected", "%d clients connected (%.1f s to connect)" % (r["count"], v["connect_s"])),
                           ("peak", "peak during the transfer"), ("end", "after the transfer, clients still there"),
                           ("after", "after the clients' sockets are gone")):
            fp = v[key]
            det.append("| %s | %d | %d | %d | %.0f |" % (label, fp["threads"], fp["fds"], fp["sockets"], fp["rss"]))
        det += ["", "1-s intervals: %s" % " ".join("%.2f" % x for x in v["intervals"]), "",
                "Their queues first held frames (their sockets full: the %s no-progress clock starts) %s into the "
                "transfer; /stats listed the direct link alone %s after its start. A's CPU during the transfer: %.1f s; "
                "queue_full drops: %d; /stats after: %s. Host TCP memory (/proc/net/sockstat): %.0f MB before, "
                "up to %.0f MB, %.0f MB at the end with the clients still connected, %.0f MB after they exited." % (
                    "10 s", _f(v["queued_after"], "%.0f s", "never"), _f(v["alone_after"], "%.1f s", "never"),
                    v["s1_cpu"], v["queue_full"], ", ".join(v["listed_after"]) or "no link", v["tcp_mem_before"],
                    v["tcp_mem"], v["tcp_mem_end"], v["tcp_mem_after"]), ""]
    return rows, det


def _report_fanout(r):
    det = ["### 5. Fan-out: the direct link beside N reading links on A (iperf3 %d s A→B; %d pings A→B 20 ms apart)"
           % (r["seconds"], r["pings"]), "",
           "| mode | N reading links | Gbit/s | × N=0 | RTT median ms | RTT p99 ms | A CPU (cores) | readers CPU "
           "(cores, per process) | load |", "|---|--:|--:|--:|--:|--:|--:|---|--:|"]
    base = {}
    summary = []
    for row in r["rows"]:
        if "gbps" not in row:
            det.append("| %s | %d | failed | | | | | | |" % (row["mode"], row["n"]))
            continue
        if row["n"] == 0 and not row.get("again"):
            base[row["mode"]] = row["gbps"]
        x = row["gbps"] / base[row["mode"]] if base.get(row["mode"]) else None
        det.append("| %s | %s | %.3f | %s | %s | %s | %.2f | %s | %.2f |" % (
            row["mode"], "0 (again)" if row.get("again") else row["n"], row["gbps"], _f(x), _f(row["rtt"]["median"], "%.3f"), _f(row["rtt"]["p99"], "%.3f"),
            row["s1_cpu"], ", ".join("%.2f" % c for c in row["readers_cpu"]) or "–", row["load"]))
        if row["n"] == 100:
            summary.append("%s %.3f Gbit/s (%s×), RTT %s ms" % (row["mode"], row["gbps"], _f(x),
                                                              _f(row["rtt"]["median"], "%.2f")))
    busy = [row for row in r["rows"] if any(c > 0.8 for c in row.get("readers_cpu", ()))]
    det += ["", "The reading clients (50 sockets per process) used %s of a core at most: %s." % (
        _f(max((c for row in r["rows"] for c in row.get("readers_cpu", ())), default=None)),
        "they may be the bottleneck in the rows with N = %s" % ", ".join(str(row["n"]) for row in busy) if busy
        else "they are not the bottleneck"), ""]
    if r.get("notes"):
        det += ["Notes: %s" % "; ".join(r["notes"]), ""]
    rows = ["| 5. fan-out: one link beside 1, 10, 100 reading links (hub, --learn) | at 100: %s | N=0: %s | – | "
            "see below | measured | |" % ("; ".join(summary), ", ".join("%s %.3f" % kv for kv in base.items()))]
    return rows, det


def _report_footprint(r):
    det = ["### 6. What one server holds: idle WebSockets (clients that read and answer pings) on A", "",
           "| idle WebSockets | links in /stats | sockets | threads | fds | RSS MB | RSS per WebSocket kB | "
           "time to connect s | load |", "|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    base = r["rows"][0]
    for row in r["rows"]:
        per = (row["rss"] - base["rss"]) * 1024 / row["n"] if row["n"] >= 100 else None  # 1: noise
        det.append("| %d | %d | %d | %d | %d | %.1f | %s | %s | %.2f |" % (
            row["n"], row["links"], row["sockets"], row["threads"], row["fds"], row["rss"], _f(per, "%.0f"),
            _f(row.get("connect_s"), "%.1f"), row["load"]))
    a = r["after"]
    det += ["", "After the clients exited (their links left /stats after %.1f s): %d links, %d threads, %d fds, "
                "RSS %.1f MB." % (r["gone_s"], a["links"], a["threads"], a["fds"], a["rss"]), ""]
    top = r["rows"][-1]
    rows = ["| 6. what one server holds at 1, 100, 1 000 idle WebSockets | %d WebSockets: %d threads, %d fds, "
            "%.0f MB | none: %d threads, %d fds, %.0f MB | – | %.2f | measured | |" % (
                top["n"], top["threads"], top["fds"], top["rss"], base["threads"], base["fds"], base["rss"],
                top["load"])]
    return rows, det


# ================================================================ standalone (development)

def main(argv):
    import argparse
    sys.path.insert(0, str(BENCH))
    import bench as B

    parser = argparse.ArgumentParser(description="the under-pressure part of the gelf benchmark")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS)
    args = parser.parse_args(argv)
    args.udp_rate = "300M"
    if os.geteuid() != 0:
        sys.exit("pressure.py: run as root (taps and namespaces)")
    B.LOGS.mkdir(parents=True, exist_ok=True)

    def on_signal(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise B.Interrupted()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    bench = B.Bench(args)
    try:
        results = run(bench, args.parts)
    except (KeyboardInterrupt, B.Interrupted):
        B.log("interrupted: cleaned up")
        return 130
    print(report(results))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        client_main(sys.argv[2:])
    else:
        sys.exit(main(sys.argv[1:]))
