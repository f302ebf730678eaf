#!/usr/bin/env python3
"""How long `GET /` and a new `/ws` upgrade take while one other address floods gelf's port.

Run as root from the checkout: `python bench/slowloris.py [--seconds 30] [-- gelf options]`.

Two gelf servers listen on 127.0.0.1; server B dials server A (`--connect`), and their taps sit
in two fresh network namespaces (10.91.0.1 and .2). A separate attacker process, bound to
127.0.0.2, holds 1 000 idle TCP connections and 200 slowloris connections (request headers
dribbled one byte a second, reconnecting whenever the server closes one) to server A. Meanwhile,
from 127.0.0.1, once a second: a `GET /` and a `/ws` upgrade on fresh connections, timed up to
10 s each; and pings cross the direct link the whole time.

This is a benchmark figure, not a test: it prints the times (median, 90th percentile, worst,
how many took over 2 s) and the ping loss. Traffic only goes to loopback and to the namespaces
made here; the load is bounded (1 200 connections, --seconds); every process (by PID), tap and
namespace made here is removed at the end, on error and on Ctrl-C.
"""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TAG = "gsl%d" % (os.getpid() % 10000)
ADDR_A, ADDR_B = "10.91.0.1", "10.91.0.2"

ATTACKER = r"""
import resource, socket, sys, time
port, idle, slow, seconds = (int(x) for x in sys.argv[1:5])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
def connect():
    s = socket.socket()
    s.setblocking(False)
    s.bind(("127.0.0.2", 0))
    s.connect_ex(("127.0.0.1", port))
    return s
held = [connect() for _ in range(idle)]
loris = [[connect(), 0] for _ in range(slow)]
head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 100000
print("attacking", flush=True)
end = time.monotonic() + seconds
closed = 0
while time.monotonic() < end:
    for entry in loris:
        s, sent = entry
        try:
            if s.send(head[sent:sent + 1]) == 1:
                entry[1] += 1
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            closed += 1
            entry[0], entry[1] = connect(), 0
    time.sleep(1)
print("slowloris connections closed by the server:", closed, flush=True)
"""


def sh(cmd, check=True):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and res.returncode:
        raise RuntimeError("%s: %s" % (" ".join(cmd), res.stderr.strip()))
    return res.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gelf(dev, port, extra, log):
    proc = subprocess.Popen([PYTHON, "gelf.py", "--dev", dev, *extra, str(port)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            if os.path.exists("/sys/class/net/" + dev):
                return proc
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("gelf on port %d did not start" % port)


def timed(port, request, expect):
    """Seconds until the response line arrives on a fresh connection (None after 10 s)."""
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request)
            line = b""
            while b"\r\n" not in line:
                chunk = s.recv(4096)
                if not chunk:
                    return None
                line += chunk
    except OSError:
        return None
    elapsed = time.monotonic() - start
    return elapsed if line.startswith(expect) else None


GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


def summary(name, times):
    done = sorted(t for t in times if t is not None)
    failed = len(times) - len(done)
    if not done:
        return "%-12s no answer in %d tries" % (name, len(times))
    p90 = done[min(len(done) - 1, int(0.9 * len(done)))]
    over = sum(1 for t in done if t > 2) + failed
    return ("%-12s %3d tries: median %.3f s, p90 %.3f s, worst %.3f s, %d over 2 s or unanswered"
            % (name, len(times), statistics.median(done), p90, done[-1], over))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--slow", type=int, default=200)
    parser.add_argument("extra", nargs="*", help="more gelf options for server A (after --)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("slowloris.py: run as root (taps and namespaces)")
    procs, spaces = [], []
    tmp = REPO / "bench" / "tmp"
    tmp.mkdir(exist_ok=True)
    try:
        port_a, port_b = free_port(), free_port()
        log_a = open(tmp / "slowloris-a.log", "w")
        log_b = open(tmp / "slowloris-b.log", "w")
        procs.append(start_gelf(TAG + "a", port_a, args.extra, log_a))
        procs.append(start_gelf(TAG + "b", port_b, ["--connect", "ws://127.0.0.1:%d/ws" % port_a], log_b))
        for dev, addr in ((TAG + "a", ADDR_A), (TAG + "b", ADDR_B)):
            ns = dev + "ns"
            sh(["ip", "netns", "add", ns])
            spaces.append(ns)
            sh(["ip", "link", "set", dev, "netns", ns])
            sh(["ip", "-n", ns, "addr", "add", addr + "/24", "dev", dev])
            sh(["ip", "-n", ns, "link", "set", dev, "up"])
        deadline = time.monotonic() + 20
        while subprocess.run(["ip", "netns", "exec", spaces[0], "ping", "-c1", "-W1", ADDR_B],
                             capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("the direct link never carried a ping")
        attacker = subprocess.Popen([PYTHON, "-c", ATTACKER, str(port_a), str(args.idle), str(args.slow),
                                     str(args.seconds + 5)], stdout=subprocess.PIPE, text=True)
        procs.append(attacker)
        print(attacker.stdout.readline().strip(), "%d idle + %d slowloris from 127.0.0.2"
              % (args.idle, args.slow), flush=True)
        time.sleep(2)
        pings = int(args.seconds / 0.2)
        ping = subprocess.Popen(["ip", "netns", "exec", spaces[0], "ping", "-n", "-q", "-i", "0.2",
                                 "-c", str(pings), "-W", "2", ADDR_B], stdout=subprocess.PIPE, text=True)
        procs.append(ping)
        gets, upgrades = [], []
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            tick = time.monotonic()
            gets.append(timed(port_a, GET, b"HTTP/1.1 200"))
            upgrades.append(timed(port_a, UPGRADE, b"HTTP/1.1 101"))
            time.sleep(max(0.0, 1 - (time.monotonic() - tick)))
        out, _ = ping.communicate(timeout=args.seconds + 30)
        loss = [line for line in out.splitlines() if "packet loss" in line]
        print(summary("GET /", gets))
        print(summary("/ws upgrade", upgrades))
        print("direct link:", loss[0].strip() if loss else out)
        print(attacker.communicate(timeout=30)[0].strip())
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for ns in spaces:
            sh(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
