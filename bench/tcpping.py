#!/usr/bin/env python3
"""A ping over one plain TCP connection, for the WAN benchmark's flap test (bench/wan.py).

    tcpping.py echo ADDR PORT
        prints "listening", then sends every byte of one client back to it until it closes.
    tcpping.py ping ADDR PORT INTERVAL SECONDS
        connects, sends an 8-byte counter every INTERVAL s for SECONDS s, and prints
        "<unix time> <counter>" for each one that comes back (flushed at once).

The reference for how fast a TCP tunnel can be back after an outage: its connection is cut
the same way, and how soon it carries data again is TCP's own retransmission backoff.
"""

import socket
import sys
import threading
import time


def echo(addr, port):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(1)
    print("listening", flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)


def ping(addr, port, interval, seconds):
    conn = socket.create_connection((addr, port), timeout=5)
    conn.settimeout(None)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def receive():
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            now = time.time()
            while len(buf) >= 8:
                print("%.6f %d" % (now, int.from_bytes(buf[:8], "big")), flush=True)
                buf = buf[8:]

    threading.Thread(target=receive, daemon=True).start()
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        conn.sendall(n.to_bytes(8, "big"))
        n += 1
        time.sleep(interval)


if __name__ == "__main__":
    mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "echo":
        echo(addr, port)
    else:
        ping(addr, port, float(sys.argv[4]), float(sys.argv[5]))
