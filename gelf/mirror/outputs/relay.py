"""relay: send the events to a gelf-mirror relay over gelf's own WebSocket transport.

The connection is a client.DialLink run by a loop.LinkLoop, exactly as `gelf --connect` dials:
ws:// or wss:// (--cacert, --insecure), ?token=, the same reconnect with backoff (1 s doubling
to 30 s, client.RETRY_MIN/RETRY_MAX). Events are batched into TYPE_STREAM messages (events.py;
up to STREAM_BATCH bytes each), sealed with --key like frames.

A stream cannot lose a message the way Ethernet can, so this output hands the link a message
only when the link has nothing queued (link.waiting()), and the link is `lossless` (no drop for
delay). Back-pressure from a slow relay thus stays in this output's Backlog, where the policy of
outputs/__init__.py applies: a full Backlog loses whole connections, counted. When the link
drops, the relay ends every connection it was replaying for us, so they are lost here too
(`upstream_down`), and connections seen while it is down are lost until it is back.
"""

import logging
import threading
import time

from gelf.client import DialLink
from gelf.links import LinkSet
from gelf.loop import LinkLoop
from gelf.mirror import events
from gelf.mirror.events import Kind
from gelf.mirror.outputs import QUEUE_BYTES, QUEUE_EVENTS, Backlog, Counts, Output as Base
from gelf.stats import Drops

log = logging.getLogger("gelf.mirror.relay")

IDLE_WAIT = 0.5  # seconds the sender sleeps with nothing to do
ROOM_WAIT = 0.002  # seconds between looks at a link that still has a message queued


class StreamLink(DialLink):
    """The DialLink to a relay: lossless, and telling its output when it opens or ends."""

    lossless = True

    def __init__(self, url, output, drops, loop, context):
        super().__init__(url, LinkSet(), self._ignore, drops, loop, context, kind="mirror",
                         max_message=events.MAX_STREAM_MESSAGE)
        self.output = output

    @staticmethod
    def _ignore(data, link):
        """A relay sends nothing but protocol frames; a message from it is ignored."""

    def opened(self):
        super().opened()
        self.output.link_changed(True)

    def ended(self, code, why):
        super().ended(code, why)
        self.output.link_changed(False)


class Output(Base):
    scheme = "relay"

    def __init__(self, url, sealer=None, context=None, max_events=QUEUE_EVENTS, max_bytes=QUEUE_BYTES):
        self.sealer = sealer
        self.counts = Counts("conns", "messages", "bytes", "queue_full", "lost_events", "upstream_down")
        self._ready = threading.Condition()
        self.backlog = Backlog(self.counts, self._wake, max_events, max_bytes)
        self.drops = Drops()
        self.loop = LinkLoop(name="gelf-mirror-links")
        self.link = StreamLink(url, self, self.drops, self.loop, context)
        self.name = "relay:" + self.link.peer  # without its token
        self.stamp = events.Stamp()
        self._epoch = 0  # changes whenever the link opens or ends
        self._connected = False
        self._live = set()  # conns whose OPEN went out on the current connection
        self._stopping = None
        self._thread = threading.Thread(target=self._run, name="gelf-mirror-relay", daemon=True)

    # ---------------------------------------------------------------- any thread

    def start(self):
        self.loop.start()
        self.link.start()
        self._thread.start()

    def offer(self, event):
        return self.backlog.put(event)

    def link_changed(self, connected):
        """Called by the link (loop thread) when it opens or ends."""
        with self._ready:
            self._epoch += 1
            self._connected = connected
            self._ready.notify()

    def stats(self):
        link = self.link.describe()
        return dict(self.counts.snapshot(), upstream=self.name, up=self._connected, state=link["state"],
                    error=link.get("error"), open=len(self._live), queued_bytes=self.backlog.queued_bytes())

    def close(self, timeout=2.0):
        with self._ready:
            self._stopping = time.monotonic() + timeout
            self._ready.notify()
        if self._thread.is_alive():
            self._thread.join(timeout + 2)
        self.link.stop()
        self.loop.stop()
        self.loop.join()
        self.link.join(2)

    def _wake(self):
        with self._ready:
            self._ready.notify()

    # ---------------------------------------------------------------- the sender thread

    def _run(self):
        try:
            self._loop()
        except Exception:  # a bug: this output stops (its Backlog fills and counts), capture goes on
            log.exception("upstream %s: internal error; this output stops", self.name)

    def _loop(self):
        epoch = None
        while True:
            with self._ready:
                if not self.backlog.queued_bytes() and self._stopping is None:
                    self._ready.wait(IDLE_WAIT)
                stopping, connected = self._stopping, self._connected
                if epoch != self._epoch:
                    epoch = self._epoch
                    self._forget_live()
            pending, _ = self.backlog.take()
            if pending:
                self._send(pending, connected)
            if stopping is not None and (not pending or time.monotonic() >= stopping):
                return

    def _forget_live(self):
        """The link opened or ended: the connections we were replaying through it are over."""
        for conn in self._live:
            self.backlog.lose(conn, "upstream_down")
        self._live.clear()

    def _send(self, pending, connected):
        batch, size = [], 0
        for event in pending:
            nbytes = len(event.data)
            if not self._admit(event, connected):
                self.backlog.release(nbytes)
                continue
            for part in events.chunks(event):
                batch.append(events.encode(part))
                size += len(batch[-1])
                if size >= events.STREAM_BATCH:
                    self._ship(batch, size)
                    batch, size = [], 0
            self.backlog.release(nbytes)
        if batch:
            self._ship(batch, size)

    def _admit(self, event, connected):
        """Whether `event` goes out: its connection must have been opened on this connection."""
        conn = event.conn
        if event.kind == Kind.OPEN:
            if not connected:
                self.backlog.lose(conn, "upstream_down")
                return False
            self._live.add(conn)
            self.counts.add("conns")
            return True
        if conn not in self._live:
            self.counts.add("lost_events")
            return False
        if event.kind == Kind.CLOSE:
            self._live.discard(conn)
        return True

    def _ship(self, batch, size):
        """One TYPE_STREAM message, once the link has room for it (this thread waits, not capture)."""
        deadline = time.monotonic() + self.loop.stall
        while self.link.waiting() and time.monotonic() < deadline and self._connected:
            time.sleep(ROOM_WAIT)
        message = events.seal(b"".join(batch), *self.stamp.next(), self.sealer)
        if self.link.offer(message):
            self.counts.add("messages")
            self.counts.add("bytes", len(message))
        else:  # the link went down, or stalled: what this message carried is lost
            with self._ready:
                self._epoch += 1
