"""Links: the peers a server exchanges gelf messages with, each behind one ordered, bounded sender.

A Link is one peer: a browser page, a relay or a gelf server that connected to /ws
(server.SocketLink), or a server this process dials (client.DialLink). While it is connected it
holds a non-blocking socket and a fastws.Connection; the link loop (loop.py) reads the socket,
writes it when it is writable, and keeps the time. The rules (docs/design.md, "Threads"):

- Any thread may `offer` a message and it never waits for a peer. With nothing queued on a
  plain TCP socket, the offering thread (the tap reader, or the loop forwarding as a hub)
  writes the frame at once without blocking: no thread hand-off, the low-latency path. What
  the socket does not take waits in the link's queue, which the loop writes on writability.
- A TLS socket is touched by the loop thread alone (one SSL object must not be read and
  written by two threads at once), so its messages always go through the queue.
- The queue is bounded in messages and bytes. A full queue drops for that link alone
  (`queue_full`); a peer that takes nothing for `stall` seconds is closed by the loop.
- Latency under load: a link's bytes wait in its queue and in its socket, so both are kept
  short. The socket holds little TCP has not sent (loop.NOTSENT_LOWAT), and a data message
  that waited in the queue longer than QUEUE_DELAY while a standing queue (QUEUE_DELAY_FLOOR
  bytes or more) built up behind it is dropped when its turn comes (`queue_delay`): the TCP
  inside the tunnel sees the loss and slows down, instead of filling the queue to its bound.
  A lone message held up by a busy machine is never dropped so. On a 20 Mbit/s, 40 ms path
  (bench/wan.py) a ping inside the tunnel during a bulk transfer took 611-646 ms (median)
  without these bounds and 60-77 ms with them; either bound alone only moves the standing
  queue into the other (328-340 ms, 197-222 ms). The price: a path that holds more than 20 ms
  of data (100 Mbit/s, 50 ms) carries 59-84 Mbit/s of TCP through the tunnel instead of 84-95.
- Every byte leaves through the same ordered path: data frames and the protocol's own frames
  (pong, Close) in the order they were queued, and no data frame after our Close.
"""

import collections
import itertools
import logging
import ssl
import threading
import time

from gelf import fastws
from gelf.stats import Drops, Traffic

log = logging.getLogger("gelf.links")

QUEUE_MESSAGES = 256
# What one link's queue may hold: 1 MiB, less when many links share the server's budget, so that
# stuck peers, which each get stuck holding different messages, cannot together hold more than
# QUEUE_BUDGET (1 000 of them held some 500 MB with 1 MiB each). The socket's own unsent bytes
# are bounded too (loop.NOTSENT_LOWAT).
QUEUE_BYTES = 1 << 20
QUEUE_BYTES_MIN = 64 * 1024
QUEUE_BUDGET = 64 << 20
QUEUE_DELAY = 0.020  # seconds a data message may wait in a standing queue (None: no limit)
QUEUE_DELAY_FLOOR = 16 * 1024  # queued bytes below which nothing is dropped for its delay
WRITE_BATCH = 64 * 1024  # bytes joined into one write (what waits in a batch is not in the queue)
RECV_SIZE = 256 * 1024
READ_BUDGET = 1 << 20  # bytes read from one TLS socket per wake-up, so one peer cannot hog the loop

_ids = itertools.count(1)
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _Framed(bytes):
    """Bytes that are already WebSocket frames (the protocol's pong or Close)."""


class Link:
    """One peer. `deliver(payload, link)` takes every binary message it receives."""

    kind = "link"
    client = False  # True for links we dialed: WebSocket clients mask what they send
    lossless = False  # True: no message is dropped for its delay (gelf-mirror's streams need them all)

    def __init__(self, peer, drops, deliver=None):
        self.id = next(_ids)
        self.peer = peer
        self.drops = Drops(parent=drops)
        self.deliver = deliver
        self.state = "open"
        self.since = time.time()
        self.rx = Traffic()
        self.tx = Traffic()
        self.sock = None
        self.ws = None  # the fastws.Connection while connected
        self.tls = False
        self.loop = None  # the LinkLoop that owns the socket while connected
        self._lock = threading.Lock()
        self._queue = collections.deque()  # (time queued, message or _Framed)
        self._queued = 0  # bytes in _queue (messages and control frames)
        self._head = None  # memoryview: framed bytes being written
        self._closing = False  # our Close is queued: no more data
        self._dropped = 0  # queue_full drops not yet counted in self.drops (see count_drops)
        self._late = 0  # queue_delay drops, likewise
        self.queue_bytes = QUEUE_BYTES  # this link's share of the budget (LinkSet sets it)
        self._writing = False  # the loop watches the socket for writability
        now = time.monotonic()
        self.progress = now  # when the peer last took bytes (or there was nothing to take)
        self.heard = now  # when the peer last sent anything
        self.pinged = None  # when our unanswered keepalive ping went out
        self.deadline = None  # when a closing handshake gives up
        self.why = None  # what broke the socket, in words

    # ---------------------------------------------------------------- any thread

    def offer(self, message):
        """Send one gelf message as a binary WebSocket message; never blocks, drops when full.
        False if the message was dropped (full, or not connected)."""
        with self._lock:
            ws = self.ws
            if ws is None or self._closing:
                return False  # not connected (a link still dialing), or closing
            if self._head is not None or self._queue:
                if len(self._queue) >= QUEUE_MESSAGES or self._queued >= self.queue_bytes:
                    self._dropped += 1  # under the link's lock only: a stuck link costs little
                    return False
                self._queue.append((time.monotonic(), message))
                self._queued += len(message)
                return True
            self.progress = time.monotonic()  # from now on, something waits for the peer
            if self.tls:
                self._queue.append((time.monotonic(), message))
                self._queued += len(message)
            else:
                self.tx.add(len(message))
                self._send_now(ws.send_binary(message))
            self._want_write()
            return True

    def _send_now(self, data):
        """Write what a plain TCP socket takes at once; keep the rest as the head of the queue."""
        try:
            sent = self.sock.send(data)
        except _WOULD_BLOCK:
            sent = 0
        except OSError:
            sent = 0  # the loop finds the error when it next reads or writes this socket
        if sent < len(data):
            self._head = memoryview(data)[sent:]

    def _want_write(self):
        """Have the loop watch for writability while anything waits (caller holds the lock)."""
        waiting = self._head is not None or bool(self._queue)
        if waiting != self._writing and self.loop is not None:
            self._writing = waiting
            self.loop.watch(self, waiting)

    # ---------------------------------------------------------------- the loop thread

    def attach(self, sock, ws, loop):
        """Start carrying messages over a connected, non-blocking socket."""
        with self._lock:
            self.sock, self.ws, self.loop = sock, ws, loop
            self.tls = isinstance(sock, ssl.SSLSocket)
            self._closing = self._writing = False
            self._queue.clear()
            self._queued = 0
            self._head = None
            now = time.monotonic()
            self.progress = self.heard = now
            self.pinged = self.deadline = self.why = None
            self.state = "open"
            self.since = time.time()

    def detach(self):
        """Forget the connection (the loop closes the socket): nothing half-sent survives it."""
        with self._lock:
            sock = self.sock
            self.sock = self.ws = self.loop = None
            self._closing = True
            self._queue.clear()
            self._queued = 0
            self._head = None
            self._writing = False
            return sock

    def send_control(self, data, closing=False):
        """Queue frames the protocol produced (pong, ping, Close) behind the data already queued.
        A pong that finds the queue full is dropped (RFC 6455 5.5.3 lets a pong answer only the
        latest ping), so a peer sending pings it never reads the answers to grows nothing."""
        with self._lock:
            if self.ws is None or self._closing:
                return
            if closing:
                self._closing = True
            elif len(self._queue) >= QUEUE_MESSAGES or self._queued >= self.queue_bytes:
                self._dropped += 1
                return
            if self._head is None and not self._queue:
                self.progress = time.monotonic()  # from now on, something waits for the peer
                if not self.tls:
                    self._send_now(data)
                    self._want_write()
                    return
            self._queue.append((time.monotonic(), _Framed(data)))
            self._queued += len(data)
            self._want_write()

    def close(self, code, reason, timeout):
        """Start the closing handshake: our Close after what is queued; give up after `timeout`."""
        if self.ws is None or self.ws.close_sent:
            return
        self.deadline = time.monotonic() + timeout
        self.send_control(self.ws.send_close(code, reason), closing=True)

    def flush(self):
        """Write queued frames until the socket would block. Returns False if the socket failed."""
        with self._lock:
            ws = self.ws
            while ws is not None:
                if self._head is None:
                    if not self._queue:
                        break
                    self._head = memoryview(self._batch(ws))
                try:
                    sent = self.sock.send(self._head)
                except _WOULD_BLOCK:
                    return True
                except OSError as err:
                    self.why = str(err)
                    return False
                if sent:
                    self.progress = time.monotonic()
                self._head = self._head[sent:] if sent < len(self._head) else None
            self._want_write()
            return True

    def _batch(self, ws):
        """Frames for up to WRITE_BATCH bytes of queued items, joined for one system call. A data
        message that waited longer than QUEUE_DELAY in a standing queue is dropped instead
        (control frames never are)."""
        parts, size = [], 0
        queue = self._queue
        stale = time.monotonic() - QUEUE_DELAY if QUEUE_DELAY is not None and not self.lossless else None
        while queue and size < WRITE_BATCH:
            queued, item = queue.popleft()
            standing = self._queued >= QUEUE_DELAY_FLOOR
            self._queued -= len(item)
            if isinstance(item, _Framed):
                parts.append(item)
            elif stale is not None and queued < stale and standing:
                self._late += 1
                continue
            else:
                self.tx.add(len(item))
                parts.append(ws.send_binary(item))
            size += len(parts[-1])
        return b"".join(parts)

    def receive(self):
        """Read what arrived and act on it. Returns False once the peer closed or the socket failed."""
        sock = self.sock
        chunks, size, eof = [], 0, False
        try:
            while True:
                chunk = sock.recv(RECV_SIZE)
                if not chunk:
                    eof = True
                    break
                chunks.append(chunk)
                size += len(chunk)
                if not self.tls or size >= READ_BUDGET and not sock.pending():
                    break  # plain TCP: one big read per wake-up (epoll reports the rest again)
        except _WOULD_BLOCK:
            pass
        except OSError as err:  # a reset, or a TLS error
            self.why = str(err) or type(err).__name__
            eof = True
        if chunks:
            self.feed(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if eof:
            self.ws.receive_eof()
        return not eof

    def feed(self, data):
        """Act on bytes received from the peer: deliver its messages, answer the protocol."""
        self.heard = time.monotonic()
        self.pinged = None
        ws = self.ws
        for kind, value in ws.receive_data(data):
            if kind is fastws.Event.BINARY:
                self.rx.add(len(value))
                self.deliver(value, self)
            elif kind is fastws.Event.TEXT:
                self.rx.add(value)
                self.drops.add("text")  # gelf speaks binary only
            elif kind is fastws.Event.FAILED:
                code, reason = value
                self.drops.add("oversize" if code == fastws.CloseCode.TOO_BIG else "malformed")
                log.debug("link %d (%s): closing: %s", self.id, self.peer, reason)
            elif kind is fastws.Event.CLOSE:
                log.debug("link %d (%s): peer closes (%s %s)", self.id, self.peer, *value)
        out = ws.data_to_send()
        if out:
            self.send_control(out, closing=ws.close_sent)

    def count_drops(self):
        """Move the queue_full and queue_delay drops counted under the link's lock into its Drops (and the
        server's): the loop does so every tick, so /stats is at most that late. Counting each
        into Drops at once took two more locks per message and link, one of them shared by
        every thread: with many stuck links, that was the hub's main cost."""
        with self._lock:
            dropped, late, self._dropped, self._late = self._dropped, self._late, 0, 0
        if dropped:
            self.drops.add("queue_full", dropped)
        if late:
            self.drops.add("queue_delay", late)

    def waiting(self):
        """True while frames wait to be written."""
        return self._head is not None or bool(self._queue)

    def opened(self):
        """The loop carries the connection now; subclasses make it take part in forwarding."""

    def ended(self, code, why):
        """The connection is over and its socket closed; subclasses say what that means."""
        self.state = "closed"

    # ---------------------------------------------------------------- /stats

    def describe(self):
        self.count_drops()
        return {
            "id": self.id,
            "peer": self.peer,
            "kind": self.kind,
            "state": self.state,
            "since": self.since,
            "rx_messages": self.rx.count,
            "rx_bytes": self.rx.bytes,
            "tx_messages": self.tx.count,
            "tx_bytes": self.tx.bytes,
            "queued": len(self._queue),
            "drops": self.drops.snapshot(),
        }


class LinkSet:
    """The links of one server or relay. Copy-on-write, so the hot path iterates without a lock.

    `add`ed links carry traffic; `keep`s are links listed in /stats even while they are not
    connected (the links this process dials).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._links = ()
        self._kept = ()

    def add(self, link):
        with self._lock:
            if link not in self._links:
                self._links = self._links + (link,)
                self._share()

    def remove(self, link):
        with self._lock:
            self._links = tuple(other for other in self._links if other is not link)
            self._share()

    def _share(self):
        """Each link's queue bound: an equal share of QUEUE_BUDGET, within [64 KiB, 1 MiB]."""
        share = max(QUEUE_BYTES_MIN, min(QUEUE_BYTES, QUEUE_BUDGET // max(1, len(self._links))))
        for link in self._links:
            link.queue_bytes = share

    def keep(self, link):
        with self._lock:
            self._kept = self._kept + (link,)

    def offer(self, message, exclude=None):
        for link in self._links:
            if link is not exclude:
                link.offer(message)

    def listing(self):
        """Every link to show: the connected ones and those being dialed, by id."""
        links, kept = self._links, self._kept
        return sorted(set(links) | set(kept), key=lambda link: link.id)

    def __iter__(self):
        return iter(self._links)

    def __len__(self):
        return len(self._links)
