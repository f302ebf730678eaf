#!/usr/bin/env python3
"""R3 endpoints of the gelf benchmark: plain WebSocket servers on 127.0.0.1, no gelf.

    ws_ceiling.py source PORT SIZE
        every client gets SIZE-byte binary messages, as fast as its socket accepts them.
    ws_ceiling.py sink PORT WARMUP SECONDS
        counts the binary messages of the first client; WARMUP s after the first one it counts
        for SECONDS s (printing "measuring" as it starts), then prints
        {"messages": n, "bytes": b, "seconds": s} on one line and exits.
    ws_ceiling.py echo PORT
        sends every binary message of a client back to it.
    ws_ceiling.py pinger PORT COUNT INTERVAL
        sends the first client COUNT small messages, one at a time, INTERVAL s apart, each when
        the previous one came back (through the page and an echo endpoint), then prints
        {"rtts_ms": [...]} on one line and exits: the browser's own relay round trip.

Just enough RFC 6455 to be much faster than the browser they measure, so that the page is the
bottleneck: the source writes a pre-built run of frames with one sendall(); the sink reads 1 MiB
at a time and walks the frame headers without unmasking the payloads (it only counts them). An
asyncio `websockets` sink tops out near 30 k messages/s at 1.5 KB on a 2-core machine, about
what Chromium relays, so it would have measured itself. Standard library only; no extensions
are negotiated (no compression).
"""

import base64
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RUN_BYTES = 256 * 1024  # the source writes frames in runs of about this size
READ_BYTES = 1 << 20


def listen(port):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(8)
    print("listening", flush=True)
    return srv


def handshake(conn):
    """Answer the HTTP upgrade; return the bytes that came after the request."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk or len(data) > 65536:
            raise ConnectionError("no WebSocket upgrade request")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    key = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    if key is None:
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        raise ConnectionError("no Sec-WebSocket-Key")
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return rest


def binary_frame(payload):
    """One unmasked (server-to-client) binary frame with FIN set."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x82, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x82, 126, n)
    else:
        head = struct.pack("!BBQ", 0x82, 127, n)
    return head + payload


def source(port, size):
    frame = binary_frame(os.urandom(size))
    run = frame * max(1, RUN_BYTES // len(frame))
    srv = listen(port)

    def serve(conn):
        try:
            handshake(conn)
            while True:
                conn.sendall(run)
        except OSError:
            pass
        finally:
            conn.close()

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


class Counter:
    """Walks the frames of a client-to-server stream, counting data messages and their bytes."""

    def __init__(self):
        self.messages = 0
        self.bytes = 0
        self.closed = False
        self._pending = b""  # an incomplete frame header
        self._skip = 0  # payload bytes of the current frame still to come

    def feed(self, chunk):
        data = self._pending + chunk if self._pending else chunk
        end = len(data)
        pos = self._skip
        messages, nbytes = self.messages, self.bytes
        while pos < end:
            if end - pos < 2:
                break
            b0, b1 = data[pos], data[pos + 1]
            length = b1 & 0x7F
            head = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if b1 & 0x80 else 0)
            if end - pos < head:
                break
            if length == 126:
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
            elif length == 127:
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
            opcode = b0 & 0x0F
            if opcode == 8:
                self.closed = True
                break
            if opcode <= 2:  # continuation, text, binary
                nbytes += length
                if b0 & 0x80:
                    messages += 1
            pos += head + length
        self.messages, self.bytes = messages, nbytes
        if pos >= end:
            self._skip, self._pending = pos - end, b""
        else:
            self._skip, self._pending = 0, data[pos:]


def sink(port, warmup, seconds):
    srv = listen(port)
    counter = Counter()
    first = threading.Event()

    def serve():
        conn, _ = srv.accept()
        try:
            rest = handshake(conn)
            if rest:
                counter.feed(rest)
            while not counter.closed:
                chunk = conn.recv(READ_BYTES)
                if not chunk:
                    break
                counter.feed(chunk)
                if counter.messages:
                    first.set()
        except OSError:
            pass
        finally:
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    if not first.wait(120):
        sys.exit("sink: no message within 120 s")
    time.sleep(warmup)
    n0, b0, t0 = counter.messages, counter.bytes, time.monotonic()
    print("measuring", flush=True)
    time.sleep(seconds)
    n1, b1, t1 = counter.messages, counter.bytes, time.monotonic()
    print(json.dumps({"messages": n1 - n0, "bytes": b1 - b0, "seconds": round(t1 - t0, 4)}), flush=True)
    os._exit(0)


def read_message(conn, buf):
    """(payload, rest of buf) of the next data frame a client sends (masked, under 126 bytes)."""
    while True:
        if len(buf) >= 2:
            length = buf[1] & 0x7F
            head = 2 + (4 if buf[1] & 0x80 else 0)
            if length < 126 and len(buf) >= head + length:
                payload = bytes(buf[head:head + length])
                if buf[1] & 0x80:
                    key = buf[2:6]
                    payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
                return payload, buf[head + length:]
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk


def echo(port):
    srv = listen(port)
    while True:
        conn, _ = srv.accept()
        try:
            buf = handshake(conn)
            while True:
                payload, buf = read_message(conn, buf)
                conn.sendall(binary_frame(payload))
        except OSError:
            conn.close()


def pinger(port, count, interval):
    srv = listen(port)
    conn, _ = srv.accept()
    buf = handshake(conn)
    rtts = []
    for i in range(count):
        sent = time.perf_counter()
        conn.sendall(binary_frame(struct.pack("!Q", i) + bytes(8)))
        while True:
            payload, buf = read_message(conn, buf)
            if struct.unpack("!Q", payload[:8])[0] == i:
                break
        rtts.append((time.perf_counter() - sent) * 1000)
        time.sleep(interval)
    print(json.dumps({"rtts_ms": rtts}), flush=True)
    os._exit(0)


def main(argv):
    if len(argv) == 3 and argv[0] == "source":
        source(int(argv[1]), int(argv[2]))
    elif len(argv) == 4 and argv[0] == "sink":
        sink(int(argv[1]), float(argv[2]), float(argv[3]))
    elif len(argv) == 2 and argv[0] == "echo":
        echo(int(argv[1]))
    elif len(argv) == 4 and argv[0] == "pinger":
        pinger(int(argv[1]), int(argv[2]), float(argv[3]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
