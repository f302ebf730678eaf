#!/usr/bin/env python3
"""What capturing costs: gelf-mirror's capture (ring or recv, with or without reassembly)
against `tcpdump -w /dev/null` on the same port (the capture floor). Not part of make test.

Run as root from the checkout: `python bench/mirror_capture.py [--rate PKTS] [--seconds S]`.

Two namespaces mcapb_srv and mcapb_cli joined by a veth pair; a sink server on port 18090 in
mcapb_srv (production), and a client in mcapb_cli writing small messages with TCP_NODELAY, so
that each is one packet, at about --rate packets/s for --seconds seconds (bounded). Each
capture runs in mcapb_srv while the same load passes; its CPU comes from /proc/PID/stat.
Then a burst: the capture is stopped (SIGSTOP) while --burst packets pass, and resumed: what
its buffer could not hold is the kernel's drop count (PACKET_STATISTICS). Every namespace and
process made here is removed on exit, also on error or Ctrl-C.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = 18090
SRV, CLI = "mcapb_srv", "mcapb_cli"
TICK = os.sysconf("SC_CLK_TCK")

SINK = r"""
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.93.0.1", %d)); s.listen(64); print("ready", flush=True)
def drain(c):
    while c.recv(1 << 20): pass
while True:
    c, _ = s.accept(); threading.Thread(target=drain, args=(c,), daemon=True).start()
""" % PORT

LOAD = r"""
import socket, sys, time
rate, seconds, conns = float(sys.argv[1]), float(sys.argv[2]), 8
socks = [socket.create_connection(("10.93.0.1", %d)) for _ in range(conns)]
for s in socks: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg, sent, start = b"x" * 100, 0, time.monotonic()
while True:
    now = time.monotonic() - start
    if now >= seconds: break
    due = int(now * rate)
    while sent < due:
        socks[sent %% conns].send(msg); sent += 1
    time.sleep(0.0005)
for s in socks: s.close()
print("sent", sent, flush=True)
""" % PORT

CAPTURE = r"""
import json, signal, sys, time
from gelf.mirror.capture import LiveCapture
from gelf.mirror.reassembly import Reassembler
mode = sys.argv[1]
cap = LiveCapture([%d], ring=mode.startswith("ring"))
r = Reassembler([%d]) if mode.endswith("+reassembly") else None
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("ready", flush=True)
while not stop:
    segs = cap.read(0.2)
    if r is not None:
        for s in segs: r.feed(s, s.ts)
print("stats " + json.dumps(cap.stats()), flush=True)
""" % (PORT, PORT)


def sh(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)


def setup():
    cleanup()
    sh("ip", "netns", "add", SRV)
    sh("ip", "netns", "add", CLI)
    sh("ip", "link", "add", "mcapbs", "netns", SRV, "type", "veth", "peer", "name", "mcapbc", "netns", CLI)
    for ns, dev, addr in ((SRV, "mcapbs", "10.93.0.1/24"), (CLI, "mcapbc", "10.93.0.2/24")):
        sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")


def cleanup():
    for ns in (SRV, CLI):
        pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "del", ns, check=False)


def cpu_seconds(pid):
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def start(cmd, ready):
    proc = subprocess.Popen(["ip", "netns", "exec", SRV, *cmd], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if ready:
        line = proc.stdout.readline()
        assert line.strip() == "ready", line + proc.stderr.read()
    else:
        time.sleep(1.5)  # tcpdump says "listening" on stderr only once it is up: give it time
    return proc


def load(rate, seconds):
    res = sh("ip", "netns", "exec", CLI, sys.executable, "-c", LOAD, str(rate), str(seconds))
    return int(res.stdout.split()[1])


def finish(proc, mode):
    proc.send_signal(signal.SIGTERM if mode != "tcpdump" else signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if mode == "tcpdump":
        got = int(re.search(r"(\d+) packets captured", err).group(1))
        drops = int(re.search(r"(\d+) packets dropped by kernel", err).group(1))
        return got, drops
    stats = json.loads(out.split("stats ", 1)[1])
    return stats["packets"], stats["drops"]


def row(mode, rate, seconds, burst):
    cmd = (["tcpdump", "-i", "mcapbs", "-w", "/dev/null", "-B", "32768", "tcp dst port %d" % PORT] if mode == "tcpdump"
           else [sys.executable, "-c", CAPTURE, mode])
    proc = start(cmd, mode != "tcpdump")
    cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
    sent = load(rate, seconds)
    cpu, wall = cpu_seconds(proc.pid) - cpu0, time.monotonic() - t0
    os.kill(proc.pid, signal.SIGSTOP)
    burst_sent = load(burst / 2.0, 2.0)
    os.kill(proc.pid, signal.SIGCONT)
    time.sleep(2)
    got, drops = finish(proc, mode)
    return {"mode": mode, "sent": sent, "burst": burst_sent, "captured": got, "drops": drops,
            "cpu_pct": 100 * cpu / wall, "us_per_pkt": 1e6 * cpu / max(1, sent)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=20000, help="packets/s during the load (default 20000)")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--burst", type=int, default=100000, help="packets sent while the capture is stopped")
    ap.add_argument("--modes", default="ring,recv,ring+reassembly,tcpdump")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("mirror_capture: error: run as root (namespaces, AF_PACKET)")
    try:
        setup()
        sink = start([sys.executable, "-c", SINK], True)
        print("| capture | sent pkts | CPU % of a core | CPU us/pkt | burst sent | captured | kernel drops |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for mode in args.modes.split(","):
            r = row(mode, args.rate, args.seconds, args.burst)
            print("| %(mode)s | %(sent)d | %(cpu_pct).1f | %(us_per_pkt).2f | %(burst)d | %(captured)d "
                  "| %(drops)d |" % r, flush=True)
        sink.kill()
    finally:
        cleanup()


if __name__ == "__main__":
    main()
