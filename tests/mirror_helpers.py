"""Helpers for the gelf-mirror tests: a plain TCP server that records what each connection sent,
ports from the mirror's own range (18100-18199), and streams of events from a fake capture.

Loopback only; every wait is bounded and generous (the suite runs on a busy machine)."""

import itertools
import socket
import threading
import time

from gelf.mirror import events
from gelf.mirror.events import Event, Kind, TO_SERVER


def port_in(low, high, family=socket.AF_INET, host="127.0.0.1"):
    """A port in [low, high] free right now on `host` (TCP)."""
    for port in range(low, high + 1):
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
                probe.listen(1)
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in %d-%d" % (low, high))


class Sink:
    """A plain TCP server on loopback. Each accepted connection's bytes are kept, in order.
    `reply` (bytes) is sent back for every chunk read; `reading=False` accepts but never reads (a
    stalled upstream) until `resume()`."""

    def __init__(self, port, host="127.0.0.1", reply=b"", reading=True, rcvbuf=None):
        self.port, self.host = port, host
        self.reply = reply
        self.reading = threading.Event()
        if reading:
            self.reading.set()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind((host, port))
        self.listener.listen(128)
        self.listener.settimeout(0.2)
        self.streams = []  # one bytearray per accepted connection, in accept order
        self.closed = []  # True once that connection's client closed
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                index = len(self.streams)
                self.streams.append(bytearray())
                self.closed.append(False)
            thread = threading.Thread(target=self._serve, args=(sock, index), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock, index):
        sock.settimeout(0.2)
        with sock:
            while not self._stop.is_set():
                if not self.reading.is_set():
                    self.reading.wait(0.2)
                    continue
                try:
                    data = sock.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    break
                if not data:
                    break
                with self.lock:
                    self.streams[index] += data
                if self.reply:
                    try:
                        sock.sendall(self.reply)
                    except OSError:
                        break
        with self.lock:
            self.closed[index] = True

    def resume(self):
        self.reading.set()

    def snapshot(self):
        with self.lock:
            return [bytes(s) for s in self.streams], list(self.closed)

    def stop(self):
        self._stop.set()
        self.listener.close()
        for thread in self._threads:
            thread.join(2)


_conns = itertools.count(1000)


def connection(chunks, server_port=80, ts=None, conn=None):
    """The events of one mirrored connection: OPEN, a DATA per chunk, CLOSE fin."""
    conn = next(_conns) if conn is None else conn
    ts = time.time() if ts is None else ts
    out = [events.open_event(conn, ts, 4, ("192.0.2.7", 40000 + conn % 20000), ("192.0.2.80", server_port))]
    out += [Event(Kind.DATA, conn, ts, TO_SERVER, chunk) for chunk in chunks]
    out.append(events.close_event(conn, ts, "fin"))
    return conn, out


def interleave(streams):
    """Events of several connections, mixed round-robin as capture would see them."""
    iters = [iter(s) for s in streams]
    out = []
    while iters:
        for it in list(iters):
            try:
                out.append(next(it))
            except StopIteration:
                iters.remove(it)
    return out


def wait_for(pred, timeout, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)
