"""Links: the sockets a server exchanges gelf messages with, and the set of them.

Sending never blocks whoever offers a message (the tap reader, or a link forwarding as a hub):
when nothing is waiting for a link, the message is written at once if the socket takes it
without blocking (no thread handoff: this is the low-latency path); otherwise it joins the
link's bounded backlog, which the link's sender thread writes, several messages per system
call. A slow or stuck peer fills only its own backlog, then its messages are dropped
(`queue_full`); memory stays bounded whatever the peers do.
"""

import collections
import itertools
import logging
import socket
import threading
import time

from gelf import fastws
from gelf.stats import Drops, Traffic

log = logging.getLogger("gelf.links")

QUEUE_MESSAGES = 256
WRITE_BATCH = 256 * 1024  # bytes the sender thread joins into one write

_ids = itertools.count(1)


class _Framed(bytes):
    """Bytes already framed for the wire (a control frame, or the unsent tail of a message)."""


class Link:
    """One peer. Subclasses set `masked` and provide `_socket()` and `_abort()`."""

    kind = "link"
    masked = False  # WebSocket clients mask what they send, servers do not

    def __init__(self, peer, drops):
        self.id = next(_ids)
        self.peer = peer
        self.drops = Drops(parent=drops)
        self.state = "open"
        self.since = time.time()
        self.rx = Traffic()
        self.tx = Traffic()
        self._stopped = False
        self._cond = threading.Condition(threading.Lock())
        self._pending = collections.deque()
        self._backlog = 0  # messages pending or being written by the sender thread
        self._sender = threading.Thread(target=self._send_loop, name="gelf-send-%d" % self.id, daemon=True)

    def start(self):
        self._sender.start()

    def offer(self, message):
        """Send `message` now if the socket takes it without blocking, else queue it; never blocks."""
        self._offer(message, len(message))

    def offer_frame(self, data):
        """Send bytes that are already a WebSocket frame (pong, close), in order with the rest."""
        self._offer(_Framed(data), 0)

    def _offer(self, item, size):
        with self._cond:
            if self._stopped:
                return
            if self._backlog == 0:
                sock = self._socket()
                if sock is not None and not hasattr(sock, "pending"):  # plain TCP: try at once
                    data = self._frame(item)
                    try:
                        sent = sock.send(data, socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError as err:
                        log.debug("link %d (%s): send failed: %s", self.id, self.peer, err)
                        self._abort()
                        return
                    if sent == len(data):
                        self.tx.add(size)
                        return
                    item = _Framed(memoryview(data)[sent:])
                    self.tx.add(size)
            elif self._backlog >= QUEUE_MESSAGES:
                self.drops.add("queue_full")
                return
            self._pending.append(item)
            self._backlog += 1
            self._cond.notify()

    def _frame(self, item):
        if isinstance(item, _Framed):
            return item
        return fastws.frame(item, masked=self.masked)

    def stop(self):
        """Stop the sender for good; pending messages are discarded."""
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self.state = "closed"
            self._pending.clear()
            self._cond.notify()

    def _send_loop(self):
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                batch, size = [], 0
                while self._pending and size < WRITE_BATCH:
                    item = self._pending.popleft()
                    batch.append(item)
                    size += len(item)
            data = b"".join(self._frame(item) for item in batch)
            sock = self._socket()
            try:
                if sock is None:
                    raise OSError("not connected")
                sock.sendall(data)
                sent = True
            except OSError as err:
                # The transport is gone; its owner notices and closes or redials the link.
                log.debug("link %d (%s): send failed: %s", self.id, self.peer, err)
                self._abort()
                sent = False
            with self._cond:
                self._backlog -= len(batch)
                if sent:
                    self.tx.add(sum(len(item) for item in batch if not isinstance(item, _Framed)))

    def _reset(self):
        """Forget what was pending for a connection that is gone (a redialed link starts clean:
        a half-sent frame must never reach the next connection)."""
        with self._cond:
            self._backlog -= len(self._pending)
            self._pending.clear()

    def _socket(self):
        """The connected socket, or None."""
        raise NotImplementedError

    def _abort(self):
        """Tear the transport down after a send error."""

    def describe(self):
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
            "drops": self.drops.snapshot(),
        }


class LinkSet:
    """The links of one server. Copy-on-write, so the hot path iterates without a lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self._links = ()

    def add(self, link):
        with self._lock:
            self._links = self._links + (link,)

    def remove(self, link):
        with self._lock:
            self._links = tuple(other for other in self._links if other is not link)

    def offer(self, message, exclude=None):
        for link in self._links:
            if link is not exclude:
                link.offer(message)

    def stop_all(self):
        for link in self._links:
            link.stop()

    def __iter__(self):
        return iter(self._links)

    def __len__(self):
        return len(self._links)
