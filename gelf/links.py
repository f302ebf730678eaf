"""Links: the sockets a server exchanges gelf messages with, and the set of them.

Every link owns a bounded queue and a sender thread, so one slow or stuck peer drops its own
messages (counted as `queue_full`) instead of stalling the tap reader or the other links, and
memory stays bounded whatever the peers do.
"""

import itertools
import logging
import queue
import threading
import time

from gelf.stats import Traffic

log = logging.getLogger("gelf.links")

QUEUE_MESSAGES = 256

_ids = itertools.count(1)


class Link:
    """One peer. Subclasses provide `_transmit(message)` and `_abort()`."""

    kind = "link"

    def __init__(self, peer, drops):
        self.id = next(_ids)
        self.peer = peer
        self.drops = drops
        self.state = "open"
        self.since = time.time()
        self._stopped = False
        self.rx = Traffic()
        self.tx = Traffic()
        self._queue = queue.Queue(QUEUE_MESSAGES)
        self._sender = threading.Thread(target=self._send_loop, name="gelf-send-%d" % self.id, daemon=True)

    def start(self):
        self._sender.start()

    def offer(self, message):
        """Queue `message` for this peer without ever blocking the caller."""
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.drops.add("queue_full")

    def stop(self):
        """Stop the sender for good; queued messages are discarded."""
        if self._stopped:
            return
        self._stopped = True
        self.state = "closed"
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the sender sees _stopped after its current message

    def _send_loop(self):
        while True:
            message = self._queue.get()
            if message is None or self._stopped:
                return
            try:
                self._transmit(message)
            except (OSError, RuntimeError) as err:
                # The transport is gone; the link's owner notices and closes or redials it.
                log.debug("link %d (%s): send failed: %s", self.id, self.peer, err)
                self._abort()
                continue
            self.tx.add(len(message))

    def _transmit(self, message):
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
