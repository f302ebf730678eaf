"""Shared helpers for the gelf system tests: servers, namespaces, ping, wire bytes.

Everything here talks only to 127.0.0.1 or to addresses inside network namespaces that the
tests create themselves, and every wait is bounded. The bounds are generous (tens of seconds):
the suite must pass on a busy machine, so a test asserts what happens, not how fast. Speed
figures belong in `make bench`.
"""

import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

_counter = itertools.count(1)


def unique(prefix):
    return f"{prefix}{next(_counter)}"


def tap_name():
    """A short, session-unique tap name (at most 15 characters)."""
    return f"gt{os.getpid() % 100000}x{next(_counter)}"  # two runs at once must not collide


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, check=True, timeout=60, **kw):
    """Run a short command; return CompletedProcess with text output."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} -> {res.returncode}\n{res.stdout}{res.stderr}")
    return res


def wait_for(pred, timeout, interval=0.1, what="condition"):
    """Poll pred() until it returns a truthy value; return it, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        val = pred()
        if val:
            return val
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def iface_exists(name, ns=None):
    if ns is None:
        return os.path.exists(f"/sys/class/net/{name}")
    return run(["ip", "-n", ns, "link", "show", "dev", name], check=False).returncode == 0


def port_bindable(port):
    """True if a new server could listen on 127.0.0.1:port right now (as servers do: SO_REUSEADDR)."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(1)
        return True
    except OSError:
        return False
    finally:
        s.close()


class LogPump:
    """Drains a process's output (so the pipe never fills) into memory and a file."""

    def __init__(self, stream, path=None, label=""):
        self.lines = []
        self.cond = threading.Condition()
        self.path = path
        self.label = label
        self._file = open(path, "a", buffering=1) if path else None
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream):
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
            if self._file:
                self._file.write(line + "\n")
        stream.close()

    def wait_line(self, pattern, timeout, start=0, alive=lambda: True):
        """Wait for a line (from index start on) matching regex pattern; return the match or None."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self.cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (not alive() and not self.thread.is_alive()):
                    return None
                self.cond.wait(min(left, 0.2))

    def text(self):
        with self.cond:
            return "\n".join(self.lines)


class GelfServer:
    """One gelf server process: `python gelf.py --host 127.0.0.1 --dev DEV --mtu MTU PORT`."""

    def __init__(self, dev, port, mtu=1500, debug=True, log_dir=None, extra=()):
        self.dev = dev
        self.port = port
        self.mtu = mtu
        self.debug = debug
        self.extra = list(extra)
        self.proc = None
        self.log_path = Path(log_dir) / f"gelf-{dev}-{port}.log" if log_dir else None
        self.logs = []  # one LogPump per start
        self.ns = None  # namespace the tap was moved into, if any

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self):
        return f"ws://127.0.0.1:{self.port}/ws"

    def cmd(self):
        c = [PYTHON, "gelf.py", "--host", "127.0.0.1", "--dev", self.dev, "--mtu", str(self.mtu)]
        if self.debug:
            c.append("-d")
        return c + self.extra + [str(self.port)]

    def start(self, timeout=60):
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            self.cmd(), cwd=REPO, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        log = LogPump(self.proc.stdout, self.log_path, label=f"{self.dev}:{self.port}")
        self.logs.append(log)
        ok = log.wait_line(
            rf"\[Gelf\] Relay listening: 127\.0\.0\.1 {self.port}\b", timeout,
            alive=lambda: self.proc.poll() is None,
        )
        if not ok:
            self.kill()
            raise RuntimeError(
                f"gelf server {self.dev} on port {self.port} did not start within {timeout}s "
                f"(rc={self.proc.returncode}); log:\n{self.log_text()}"
            )
        if not log.wait_line(rf"\[Gelf\] Created interface: {re.escape(self.dev)}\b", 0.1):
            raise RuntimeError(f"no 'Created interface: {self.dev}' line; log:\n{self.log_text()}")
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stats(self, timeout=30):
        with urllib.request.urlopen(self.url + "/stats", timeout=timeout) as r:
            return json.loads(r.read().decode())

    def signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout=30):
        """SIGTERM and wait; SIGKILL if it does not exit. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._join_logs()
        return self.proc.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._join_logs()

    def _join_logs(self):
        if self.logs:
            self.logs[-1].thread.join(10)

    def log_text(self):
        parts = []
        for i, log in enumerate(self.logs):
            parts.append(f"--- start #{i + 1} ---\n{log.text()}")
        return "\n".join(parts)


def gelf_once(*args, prefix=(), timeout=60, ready=None, linger=0):
    """Run `gelf.py ARGS` (after an optional prefix such as `ip netns exec NS`) until it exits,
    or SIGTERM it: `linger` seconds after a line matching regex `ready` (if given) appeared, and
    at the latest after `timeout` seconds; return (exit code, output).

    A server that is to be stopped passes `ready`, so that the signal never comes before it has
    started (a busy machine may take seconds), and the call returns as soon as it can."""
    proc = subprocess.Popen([*prefix, PYTHON, "gelf.py", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = LogPump(proc.stdout)
    deadline = time.monotonic() + timeout
    if ready and log.wait_line(ready, timeout, alive=lambda: proc.poll() is None):
        deadline = min(deadline, time.monotonic() + linger)
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    log.thread.join(10)
    return proc.returncode, log.text() + "\n"


# ---------------------------------------------------------------- namespaces

def netns_add(name):
    run(["ip", "netns", "add", name])


def netns_del(name):
    """Kill what the tests left running inside the namespace, then delete it."""
    res = run(["ip", "netns", "pids", name], check=False)
    for pid in res.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    run(["ip", "netns", "del", name], check=False)


def move_tap(dev, ns, addr, prefix=24, mac=None):
    """Move a tap (created by a server in the root namespace) into ns and give it addr."""
    wait_for(lambda: iface_exists(dev), 30, what=f"{dev} in the root namespace")
    if mac:
        run(["ip", "link", "set", "dev", dev, "address", mac])
    run(["ip", "link", "set", "dev", dev, "netns", ns])
    run(["ip", "-n", ns, "addr", "add", f"{addr}/{prefix}", "dev", dev])
    run(["ip", "-n", ns, "link", "set", dev, "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])


def link_mac(dev, ns):
    info = json.loads(run(["ip", "-n", ns, "-j", "link", "show", "dev", dev]).stdout)
    return info[0]["address"]


# ---------------------------------------------------------------- ping

_LOSS = re.compile(r"([\d.]+)% packet loss")


def parse_loss(output):
    m = _LOSS.search(output)
    if not m:
        raise AssertionError(f"cannot parse ping output:\n{output}")
    return float(m.group(1))


# Seconds a reply may take and still count: a late answer is not a lost one.
PING_WAIT = 10

# Why not ping(8): once any reply has come, iputils ping waits only max(2 x the largest round
# trip, the interval) after its last request, whatever -W says (-W applies only while no reply
# has come), so on a busy machine a reply late by a few hundred milliseconds counts as lost;
# and with -w it sends more requests than -c asks for. This pinger sends exactly `count` echo
# requests `interval` apart, counts every reply that arrives until all are answered or `wait`
# seconds after the last request, and prints ping's summary line (and "(DUP!)" for duplicates).
# Arguments: addr count interval wait [-p HEX] (-p fills the payload with a pattern, as ping's).
PINGER = r"""
import os, select, socket, struct, sys, time
addr, count, interval, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
opts = dict(zip(sys.argv[5::2], sys.argv[6::2]))
data = ((bytes.fromhex(opts["-p"]) if "-p" in opts else bytes(range(56))) * 56)[:56]
v6 = ":" in addr
family = socket.AF_INET6 if v6 else socket.AF_INET
s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
request, reply = (128, 129) if v6 else (8, 0)
ident, want = os.getpid() & 0xFFFF, socket.inet_pton(family, addr)


def checksum(b):  # the kernel fills in ICMPv6 checksums itself
    n = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    n = (n >> 16) + (n & 0xFFFF)
    return ~(n + (n >> 16)) & 0xFFFF


sent, answered, dups, seq, end = {}, set(), 0, 0, None
start = time.monotonic()
while True:
    now = time.monotonic()
    if seq < count and now >= start + seq * interval:
        seq += 1
        head = struct.pack("!BBHHH", request, 0, 0, ident, seq)
        if not v6:
            head = struct.pack("!BBHHH", request, 0, checksum(head + data), ident, seq)
        sent[seq] = time.monotonic()
        s.sendto(head + data, (addr, 0))
        if seq == count:
            end = sent[seq] + wait
        continue
    if seq == count and (len(answered) == count or now >= end):
        break
    limit = end if seq == count else start + seq * interval  # the end, or the next request
    ready, _, _ = select.select([s], [], [], max(0.0, limit - now))
    if not ready:
        continue
    packet, src = s.recvfrom(65535)
    if not v6:
        packet = packet[(packet[0] & 15) * 4:]
    if len(packet) < 8 or socket.inet_pton(family, src[0]) != want:
        continue
    kind, _, _, rid, rseq = struct.unpack("!BBHHH", packet[:8])
    if kind != reply or rid != ident or rseq not in sent:
        continue
    dup = rseq in answered
    dups += dup
    answered.add(rseq)
    print("%d bytes from %s: icmp_seq=%d time=%.2f ms%s" % (
        len(packet), addr, rseq, (time.monotonic() - sent[rseq]) * 1000, " (DUP!)" if dup else ""))
print("--- %s ping statistics ---" % addr)
print("%d packets transmitted, %d received, %s%g%% packet loss" % (
    count, len(answered), "+%d duplicates, " % dups if dups else "", 100 * (count - len(answered)) / count))
sys.exit(0 if answered else 1)
"""


def ping_cmd(ns, addr, count, interval=0.2, wait=PING_WAIT):
    return ["ip", "netns", "exec", ns, PYTHON, "-c", PINGER, addr, str(count), str(interval), str(wait)]


def ping(ns, addr, count=20, interval=0.2, wait=PING_WAIT):
    """Ping addr from namespace ns; return (loss percent, output)."""
    res = run(ping_cmd(ns, addr, count, interval, wait), check=False,
              timeout=count * interval + wait + 60)
    out = res.stdout + res.stderr
    return parse_loss(out), out


def wait_ping(ns, addr, timeout=60):
    """Wait until one ping from ns to addr is answered (ARP and links settle). Bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = run(ping_cmd(ns, addr, 1, wait=5), check=False, timeout=60)
        if res.returncode == 0:
            return True
        time.sleep(0.2)
    return False


# ---------------------------------------------------------------- wire format (docs/design.md)

VERSION = 1
TYPE_DATA = 0
TYPE_CONTROL = 1


def encode(frames, origin, seq, flags=0, type=TYPE_DATA, version=VERSION):
    """A gelf message built by hand from the documented wire format (not from gelf.wire)."""
    body = b"".join(struct.pack(">I", len(f)) + f for f in frames)
    return struct.pack(">BBBBIQ", version, type, flags, 0, origin, seq) + body


def eth_frame(payload, dst=b"\xff" * 6, src=b"\x02GELF\x01", ethertype=0x88B5):
    payload = payload + b"\x00" * max(0, 46 - len(payload))
    return dst + src + struct.pack(">H", ethertype) + payload


def make_certificate(directory):
    """A self-signed certificate for 127.0.0.1 (CN and subjectAltName): (cert path, key path)."""
    cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)], timeout=60)
    return cert, key


def chromium_available():
    return os.path.exists(CHROMIUM) and shutil.which(CHROMIUM) is not None


# ---------------------------------------------------------------- the page (templates/, static/)

def link_selector(port, host="127.0.0.1"):
    return f'li.link[data-url="ws://{host}:{port}/ws"]'


def link_state(page, port):
    loc = page.locator(link_selector(port) + " .state")
    if loc.count() == 0:
        return None
    return loc.first.text_content().strip()


def wait_link_state(page, port, state="open", timeout=60):
    """Wait until the page's link to 127.0.0.1:port shows `state` (or, with state=None, any
    state other than open)."""
    js = """([sel, st]) => {
        const e = document.querySelector(sel + ' .state');
        if (!e) return false;
        const t = e.textContent.trim();
        return st === null ? t !== 'open' : t === st;
    }"""
    page.wait_for_function(js, arg=[link_selector(port), state], timeout=timeout * 1000,
                           polling=100)


def link_counter(page, port, name):
    """Raw integer of .rx-frames / .rx-bytes / .tx-frames / .tx-bytes (data-value)."""
    v = page.locator(f"{link_selector(port)} .{name}").first.get_attribute("data-value")
    return int(v)


def add_peer(page, port, host="127.0.0.1"):
    """Add a link through the page's form: type host:port and submit."""
    page.fill("#peer-input", f"{host}:{port}")
    page.locator("#add-form button:not([type=button]):not([type=reset]), "
                 "#add-form input[type=submit]").first.click()


# ---------------------------------------------------------------- traffic between namespaces

ADDR = ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
TRANSFER_BYTES = 10 * 1024 * 1024
TCP_PORT = 5001

RECEIVER = r"""
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(60)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(60)
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b)
    n += len(b)
print("received", n, h.hexdigest(), flush=True)
"""

SENDER = r"""
import socket, sys
data = open(sys.argv[3], "rb").read()
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
c.settimeout(60)
while c.recv(1 << 16):
    pass
print("sent", len(data), flush=True)
"""


def servers_in_namespaces(gelf_server, ns_addr, n):
    """n servers, server i's tap in its own namespace with address ADDR[i]."""
    servers = [gelf_server() for _ in range(n)]
    spaces = [ns_addr(s, ADDR[i]) for i, s in enumerate(servers)]
    return servers, spaces


def assert_pings(ns, addr, count=20):
    assert wait_ping(ns, addr, timeout=60), f"{ns} never reached {addr} through the page"
    loss, out = ping(ns, addr, count=count)
    assert loss == 0, f"ping {ns} -> {addr} lost {loss}%:\n{out}"


def assert_pings_fail(ns, addr):
    """Traffic has stopped: within 60 s the pings go unanswered, and then stay so."""
    deadline = time.monotonic() + 60
    while True:
        loss, out = ping(ns, addr, count=3, interval=0.2)
        if loss == 100 or time.monotonic() > deadline:
            break
    assert loss == 100, f"ping {ns} -> {addr} still answered after the page closed:\n{out}"
    loss, out = ping(ns, addr, count=5)
    assert loss == 100, f"ping {ns} -> {addr} answered after the page closed:\n{out}"


def transfer(bg, ns_src, ns_dst, addr, tmp_path, nbytes=TRANSFER_BYTES):
    """Send nbytes of random data over TCP from ns_src to addr in ns_dst; assert the SHA-256."""
    data = os.urandom(nbytes)
    src = Path(tmp_path) / "payload.bin"
    src.write_bytes(data)
    receiver = bg(["ip", "netns", "exec", ns_dst, PYTHON, "-c", RECEIVER, addr, str(TCP_PORT)],
                  name=f"tcp receiver ({ns_dst})")
    assert receiver.pump.wait_line(r"^ready$", 60), "receiver did not start"
    sender = bg(["ip", "netns", "exec", ns_src, PYTHON, "-c", SENDER, addr, str(TCP_PORT), str(src)],
                name=f"tcp sender ({ns_src})")
    assert sender.wait(120) == 0, f"sender failed:\n{sender.pump.text()}"
    m = receiver.pump.wait_line(r"^received (\d+) ([0-9a-f]{64})$", 120)
    assert m, f"receiver did not finish:\n{receiver.pump.text()}"
    assert int(m.group(1)) == nbytes
    assert m.group(2) == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- servers inside a namespace

_STATS_IN_NS = r"""
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
    sys.stdout.write(r.read().decode())
"""


class NsGelfServer(GelfServer):
    """A gelf server run inside the network namespace `netns`: `ip netns exec NS python gelf.py ...`.

    Its tap is created in that namespace and its 127.0.0.1 is that namespace's loopback, so no
    traffic touches the root namespace. `ip netns exec` execs the command without forking, so
    self.proc.pid is the server itself and stop()/kill() signal it directly.
    """

    def __init__(self, netns, *args, **kw):
        super().__init__(*args, **kw)
        self.netns = netns

    def cmd(self):
        return ["ip", "netns", "exec", self.netns] + super().cmd()

    def stats(self, timeout=30):
        res = run(["ip", "netns", "exec", self.netns, PYTHON, "-c", _STATS_IN_NS,
                   self.url + "/stats", str(timeout)], timeout=timeout + 10)
        return json.loads(res.stdout)
