"""The HTTP front door: CherryPy's server with cheroot's connection manager replaced by a gate
that no slow or idle client can hold a worker thread with.

Why: cheroot hands each accepted connection to one of CherryPy's 10 worker threads, which then
blocks reading the request head (10 s per recv), and on a TLS port the accepting thread itself
does a blocking handshake. 12 slowloris connections, 1 000 idle ones, or one TLS client that
sends nothing, and nobody else got the page or a /ws upgrade for as long as they stayed.

The gate runs in cheroot's serve thread and never blocks. Each connection is:
  1. admitted (admission.py: per-address and total limits; over one, 503 at once, or on a TLS
     port a plain close, as no handshake is done for a refusal);
  2. on a TLS port, told from plain HTTP by its first byte (a TLS handshake starts with 0x16;
     plain HTTP gets cheroot's 400 text) and handshaken without blocking;
  3. read up to the end of its request head, which must come within --header-timeout of its
     first byte (else 408) and within httphead.MAX_HEAD (else 431); a body is refused (413);
  4. handed, with the bytes already read, to a worker: at most WORKERS_PER_ADDRESS requests of
     one address at a time and never more than there are workers, addresses taking turns, so the
     rest wait here and cost no thread;
  5. taken back when a worker keeps it alive, and read again; idle for cheroot's
     server.socket_timeout (10 s), it is closed, as cheroot would.
A WebSocket upgrade leaves with ws4py (which takes `rfile.raw._sock`); its admission slot stays
held until its link ends (server.SocketLink.ended releases it).
"""

import collections
import errno
import logging
import os
import resource
import selectors
import socket
import ssl
import threading
import time
from typing import NamedTuple

from cherrypy._cpwsgi_server import CPWSGIServer

from gelf import httphead
from gelf.admission import Admission, Turns, address_key
from gelf.handoff import GateConnection, gate_makefile

log = logging.getLogger("gelf.gate")

DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_MAX_PER_ADDRESS = 64  # a page, its links and a reload's overlap need a few; a NAT more
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds, as cheroot's own per-recv timeout
WORKERS_PER_ADDRESS = 3  # of CherryPy's 10: one address can hold at most a third of them
LINGER = 2.0  # seconds a refused connection is read (and discarded) so our answer is not reset
MAX_LINGERING = 256  # refused connections lingering at once; beyond this they are closed at once
RESERVED_FILES = MAX_LINGERING + 64  # open files kept for lingering, the tap, links, logs
ACCEPT_BATCH = 64  # accepts per turn of the loop, so the connections already here are served too

SNIFF, HANDSHAKE, READING, WAITING, WORKING, CLOSING = range(1, 7)  # 0: just accepted
_LISTENER, _WAKE = object(), object()
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class Limits(NamedTuple):
    """What one address, and everybody together, may hold (--max-connections and friends)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_per_address: int = DEFAULT_MAX_PER_ADDRESS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT


def raise_open_files_limit():
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the soft limit now.

    Each connection is an open file; the usual soft limit (1024) would stop us long before
    --max-connections, while the hard limit (systemd: 524288) is ours to take.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class Entry:
    """One connection the gate knows of, and where it stands."""

    __slots__ = ("sock", "addr", "key", "conn", "state", "buf", "scanned", "deadline", "events")

    def __init__(self, sock, addr, key):
        self.sock, self.addr, self.key = sock, addr, key
        self.conn = self.buf = self.deadline = None
        self.state = self.scanned = self.events = 0


def tls_context(adapter):
    if adapter is None:
        return None
    context = getattr(adapter, "context", None)
    if not isinstance(context, ssl.SSLContext):
        raise ValueError("gelf's gate needs cheroot's builtin ssl adapter (server.ssl_module: builtin)")
    return context


class Gate:
    """In place of cheroot's ConnectionManager: everything HTTPServer calls on it (run, stop,
    close, put, can_add_keepalive_connection) and the loop described at the top of this module."""

    def __init__(self, server, admission, header_timeout):
        self.server = server
        self.admission = admission
        self.header_timeout = header_timeout
        self.idle_timeout = server.timeout
        self.context = tls_context(server.ssl_adapter)
        self.listener = server.socket
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, _READ, _LISTENER)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, _READ, _WAKE)
        self._wake_lock = threading.Lock()
        self.entries = set()
        self.returns = collections.deque()  # (connection, keep alive?) from worker threads
        self.turns = Turns(server.requests.min, WORKERS_PER_ADDRESS)  # entries with a complete head
        self.lingering = 0
        self.accept_paused = False
        self._stopping = self._closed = False
        self._serving = False

    # ------------------------------------------------------------ what cheroot's HTTPServer calls

    @property
    def can_add_keepalive_connection(self):
        """Idle keep-alive connections cost no thread here and hold admission slots."""
        return not self._stopping

    def put(self, conn):
        """A worker is done with a request and keeps the connection (worker thread)."""
        self.returned(conn, keep=True)

    def returned(self, conn, keep):
        if self._closed:
            if keep:
                conn.close()
            return
        self.returns.append((conn, keep))
        self._wake()

    def stop(self):
        self._stopping = True
        self._wake()
        deadline = time.monotonic() + 2
        while self._serving and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self):
        """Close every socket the gate holds (workers close theirs)."""
        self._closed = True
        for entry in list(self.entries):
            if entry.state != WORKING:
                self._discard(entry)
        while self.returns:
            conn, keep = self.returns.popleft()
            if keep:
                conn.close()
            self.admission.release(conn.socket)
        with self._wake_lock:
            self.selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def run(self, expiration_interval):
        self._serving = True
        try:
            self._run(min(expiration_interval, self.header_timeout / 4))
        finally:
            self._serving = False

    # ------------------------------------------------------------ the loop

    def _run(self, sweep_every):
        next_sweep = time.monotonic() + sweep_every
        while not self._stopping:
            for key, _ in self.selector.select(max(0.0, next_sweep - time.monotonic())):
                if key.data is _LISTENER:
                    self._accept()
                elif key.data is _WAKE:
                    self._drain_wake()
                else:
                    self._guard(self._on_ready, key.data)
            while self.returns:
                conn, keep = self.returns.popleft()
                self._guard(self._take_back, conn.entry, keep)
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + sweep_every
            self._dispatch()

    def _guard(self, step, entry, *args):
        """One connection's trouble closes that connection, never the gate."""
        try:
            step(entry, *args)
        except Exception as err:
            log.log(logging.ERROR, "gate: %r on a connection from %s", err, entry.key)
            if entry.state != WORKING:
                self._discard(entry)

    def _wake(self):
        with self._wake_lock:
            if not self._closed:
                try:
                    os.write(self._wake_w, b"!")
                except BlockingIOError:
                    pass  # a wake-up is already pending

    def _drain_wake(self):
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _on_ready(self, entry):
        if entry.state == SNIFF:
            self._sniff(entry)
        elif entry.state == HANDSHAKE:
            self._handshake(entry)
        elif entry.state == READING:
            self._read(entry)
        elif entry.state == CLOSING:
            self._linger(entry)

    def _sweep(self, now):
        if self.accept_paused:
            self.selector.register(self.listener, _READ, _LISTENER)
            self.accept_paused = False
        for entry in list(self.entries):
            if entry.state in (WAITING, WORKING) or entry.deadline is None or now < entry.deadline:
                continue
            if entry.state == READING and entry.buf:
                log.log(logging.INFO, "408: request heads slower than --header-timeout %g s, "
                                   "e.g. from %s", self.header_timeout, entry.key)
                self._answer(entry, 408, "The request head took longer than %g seconds." % self.header_timeout)
            else:
                self._discard(entry)  # idle, a TLS handshake that never finished, or done lingering

    # ------------------------------------------------------------ accept and admit

    def _accept(self):
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.log(logging.ERROR, "cannot accept connections: %s; lower "
                                       "--max-connections or raise the open-files limit", err.strerror)
                    self.selector.unregister(self.listener)  # until the next sweep
                    self.accept_paused = True
                    return
                continue  # the client gave up before we accepted (ECONNABORTED, ...)
            host = addr[0] if isinstance(addr, tuple) else ""
            self._guard(self._admit, Entry(sock, addr, address_key(host)))

    def _admit(self, entry):
        sock = entry.sock
        sock.setblocking(False)
        refused = self.admission.admit(sock, entry.key)
        if refused:
            limit, text = refused
            log.log(logging.WARNING, "refusing connections over %s, e.g. from %s", limit, entry.key)
            if self.context:
                sock.close()
            else:
                self._answer(entry, 503, text, "limit")
            return
        self.entries.add(entry)
        if self.context:
            entry.state = SNIFF
            entry.deadline = time.monotonic() + self.header_timeout
            self._watch(entry, _READ)
        else:
            self._start_reading(entry, b"")

    def _connection(self, entry):
        conn = self.server.ConnectionClass(self.server, entry.sock, gate_makefile)
        conn.gate, conn.entry = self, entry
        if not isinstance(self.server.bind_addr, (str, bytes)):
            addr = entry.addr if isinstance(entry.addr, tuple) else None
            if addr is None:  # as cheroot does
                addr = ("0.0.0.0", 0) if len(entry.sock.getsockname()) == 2 else ("::", 0)
            conn.remote_addr, conn.remote_port = addr[0], addr[1]
        conn.ssl_env = self.server.ssl_adapter.get_environ(entry.sock) if self.context else {}
        return conn

    # ------------------------------------------------------------ TLS

    def _sniff(self, entry):
        try:
            first = entry.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            first = b""
        if first == b"\x16":  # a TLS handshake record
            self._unwatch(entry)
            plain = entry.sock
            entry.sock = self.context.wrap_socket(plain, server_side=True, do_handshake_on_connect=False)
            self.admission.rekey(plain, entry.sock)
            entry.state = HANDSHAKE
            self._handshake(entry)
        elif first.isalpha():
            log.log(logging.INFO, "plain HTTP sent to the TLS port, e.g. from %s", entry.key)
            self._answer(entry, 400, httphead.PLAIN_HTTP_ON_TLS, "tls")
        else:
            self._discard(entry)

    def _handshake(self, entry):
        try:
            entry.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(entry, _READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(entry, _WRITE)
            return
        except OSError as err:
            log.log(logging.INFO, "TLS handshakes failed, e.g. from %s: %s",
                               entry.key, getattr(err, "reason", None) or err)
            self._discard(entry)
            return
        self._start_reading(entry, b"")

    # ------------------------------------------------------------ request heads

    def _start_reading(self, entry, data):
        entry.state = READING
        entry.buf = bytearray(data)
        entry.scanned = 0
        entry.deadline = time.monotonic() + (self.header_timeout if data else self.idle_timeout)
        if not (data and self._scan(entry)):
            self._read(entry)

    def _read(self, entry):
        while True:
            try:
                data = entry.sock.recv(httphead.MAX_HEAD + 1 - len(entry.buf))
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError:
                data = b""
            if not data:
                self._discard(entry)  # the client closed, or the connection broke
                return
            if not entry.buf:  # the head's clock starts at its first byte
                entry.deadline = time.monotonic() + self.header_timeout
            entry.buf += data
            if self._scan(entry):
                return
        self._watch(entry, _READ)

    def _scan(self, entry):
        """Act on a complete or oversized head; True if the entry is done reading."""
        refused = entry.scanned == 0 and httphead.refusal_of_start(entry.buf)
        if refused:
            log.log(logging.INFO, "400: not HTTP, e.g. from %s: %s", entry.key, refused[1])
            self._answer(entry, *refused)
            return True
        end = httphead.head_end(entry.buf, entry.scanned)
        entry.scanned = len(entry.buf)
        if end > httphead.MAX_HEAD or (end < 0 and len(entry.buf) > httphead.MAX_HEAD):
            log.log(logging.INFO, "431: request heads over %d bytes, e.g. from %s",
                               httphead.MAX_HEAD, entry.key)
            self._answer(entry, 431, "The request head is larger than %d bytes." % httphead.MAX_HEAD)
            return True
        if end < 0:
            return False
        refused = httphead.refusal(entry.buf[:end])
        if refused:
            log.log(logging.INFO, "%d: requests with a body, e.g. from %s", refused[0], entry.key)
            self._answer(entry, *refused)
            return True
        self._unwatch(entry)
        entry.state = WAITING
        if entry.conn is None:
            entry.conn = self._connection(entry)
        self.turns.wait(entry.key, entry)
        return True

    # ------------------------------------------------------------ workers

    def _dispatch(self):
        while (entry := self.turns.next()) is not None:
            entry.state = WORKING
            conn = entry.conn
            conn.rfile.raw.give(bytes(entry.buf))
            entry.buf = None
            entry.sock.settimeout(self.server.timeout)
            conn.last_used = time.time()
            self.server.process_conn(conn)

    def _take_back(self, entry, keep):
        if entry is None or entry.state != WORKING:
            return
        self.turns.done(entry.key)
        if keep:
            entry.sock.setblocking(False)
            self._start_reading(entry, entry.conn.rfile.take_unread())
            return
        self.entries.discard(entry)
        entry.state = None
        if not entry.conn.linger:
            self.admission.release(entry.sock)
        # else the socket lives on as a WebSocket, whose handler releases the slot when it closes

    # ------------------------------------------------------------ answers and closing

    def _answer(self, entry, status, text, why="request"):
        """Send a short response of our own, then close without losing it to a reset."""
        self._unwatch(entry)
        try:
            entry.sock.send(httphead.response(status, text, why))
        except OSError:
            pass  # the client is gone, or not reading: it gets the close
        self.admission.release(entry.sock)
        try:
            entry.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self.lingering >= MAX_LINGERING or self._closed:
            self._discard(entry)
            return
        # Closing with unread input would send a reset, which can destroy our answer before the
        # client reads it: read and drop its input until it closes, for at most LINGER seconds.
        self.lingering += 1
        entry.state = CLOSING
        entry.buf = None
        entry.deadline = time.monotonic() + LINGER
        self.entries.add(entry)
        self._watch(entry, _READ)

    def _linger(self, entry):
        try:
            for _ in range(16):
                if not entry.sock.recv(65536):
                    break
            else:
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._discard(entry)

    def _discard(self, entry):
        self._unwatch(entry)
        if entry.state == CLOSING:
            self.lingering -= 1
        entry.state = None
        self.entries.discard(entry)
        self.admission.release(entry.sock)
        try:
            entry.sock.close()
        except OSError:
            pass

    def _watch(self, entry, events):
        if entry.events == events:
            return
        if entry.events:
            self.selector.modify(entry.sock, events, entry)
        else:
            self.selector.register(entry.sock, events, entry)
        entry.events = events

    def _unwatch(self, entry):
        if entry.events:
            entry.events = 0
            try:
                self.selector.unregister(entry.sock)
            except (KeyError, ValueError):
                pass


class GateServer(CPWSGIServer):
    """CherryPy's WSGI server with the gate in place of cheroot's connection manager.

    Installed by server.mount() as cherrypy.server.httpserver; CherryPy binds, starts and stops
    it as its own (TLS settings included)."""

    ConnectionClass = GateConnection

    def __init__(self, server_adapter, admission, header_timeout):
        super().__init__(server_adapter)
        self.admission = admission
        self.header_timeout = header_timeout
        # The gate drains the queue at once; a long one only spares clients a SYN retransmit
        # (1 s) during a connection flood.
        self.request_queue_size = max(self.request_queue_size, socket.SOMAXCONN)

    def prepare(self):
        super().prepare()
        cheroots, self._connections = self._connections, Gate(self, self.admission, self.header_timeout)
        cheroots.close()


__all__ = ["Admission", "GateServer", "Limits", "raise_open_files_limit"]
