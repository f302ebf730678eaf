"""Outputs: where mirrored connections go. A folder of plug-ins sharing one small interface.

- `tcp`   (tcp.py)   replays each mirrored connection to a plain server, byte for byte;
- `relay` (relay.py) sends the events to a gelf-mirror relay over gelf's WebSocket transport;
- `file`  (file.py)  appends them to a --record file.

Every output has `offer(event)`, which never blocks: capture's thread calls it, and production
must never wait for an upstream. Behind it each output has its own Backlog, bounded in events and
bytes. The policy when it is full (docs/mirror.md, "Policies"): the output loses that connection
(counted `queue_full`): the rest of its events are dropped for this output alone, and the output
ends that connection's replay, since a replayed stream with a gap is garbage to the upstream.
Other outputs are not affected.
"""

import collections
import importlib
import logging
import threading
import time

SCHEMES = {"tcp": "gelf.mirror.outputs.tcp", "relay": "gelf.mirror.outputs.relay",
           "file": "gelf.mirror.outputs.file"}

QUEUE_EVENTS = 65536
QUEUE_BYTES = 32 << 20  # per output: what a slow upstream may hold before it loses connections
MAX_LOST = 65536  # lost connections remembered (the oldest is forgotten: its CLOSE came long ago)
RETRY_MIN = 0.5  # seconds before a dead upstream is tried again, doubling up to RETRY_MAX
RETRY_MAX = 30.0

log = logging.getLogger("gelf.mirror.outputs")


def hostport(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def lookup(scheme):
    """The Output class for a scheme (`tcp`, `relay`, `file`); KeyError for any other."""
    return importlib.import_module(SCHEMES[scheme]).Output


class Counts:
    """Named counters of one output, thread-safe: the capture thread and the output's own add."""

    def __init__(self, *names):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(names, 0)

    def add(self, name, n=1):
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + n

    def snapshot(self):
        with self._lock:
            return dict(self._counts)

    def __getitem__(self, name):
        with self._lock:
            return self._counts.get(name, 0)


class Backlog:
    """One output's bounded queue of events, and the connections it has lost.

    `put` (any thread, never blocks) refuses an event once QUEUE_EVENTS events or QUEUE_BYTES
    bytes wait; the event's connection is then lost for this output. Bytes stay counted until the
    consumer `release`s them (written to a socket, or thrown away), so what waits in an output's
    own buffers counts against the same bound. `wake` is called when the queue stops being empty,
    not per event: a write to a pipe costs a system call.
    """

    def __init__(self, counts, wake=None, max_events=QUEUE_EVENTS, max_bytes=QUEUE_BYTES):
        self.counts = counts
        self.wake = wake or (lambda: None)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._events = collections.deque()
        self._bytes = 0
        self._lost = collections.OrderedDict()  # conn -> None: dropped until their CLOSE
        self._abandoned = []  # conns lost since the consumer last looked: it ends their replay

    def put(self, event):
        """Queue `event` unless its connection is lost; True if it was queued."""
        size = len(event.data)
        with self._lock:
            conn = event.conn
            if conn in self._lost:
                if event.kind == 3:  # CLOSE: nothing more will come for it
                    del self._lost[conn]
                self.counts.add("lost_events")
                return False
            if len(self._events) >= self.max_events or self._bytes + size > self.max_bytes:
                self.counts.add("queue_full")
                self._lose(conn, event.kind == 3)
                return False
            was_empty = not self._events
            self._events.append(event)
            self._bytes += size
        if was_empty:
            self.wake()
        return True

    def lose(self, conn, reason, closed=False):
        """The consumer gives up on `conn` (its upstream failed): drop what comes for it, unless
        its CLOSE was already taken (`closed`)."""
        self.counts.add(reason)
        with self._lock:
            if not closed:
                self._lost[conn] = None
                if len(self._lost) > MAX_LOST:
                    self._lost.popitem(last=False)

    def _lose(self, conn, closed):
        if not closed:
            self._lost[conn] = None
            if len(self._lost) > MAX_LOST:
                self._lost.popitem(last=False)
        self._abandoned.append(conn)

    def take(self):
        """(events, conns abandoned) waiting now; the events' bytes stay counted until released."""
        with self._lock:
            events, self._events = self._events, collections.deque()
            abandoned, self._abandoned = self._abandoned, []
        return events, abandoned

    def release(self, nbytes):
        with self._lock:
            self._bytes -= nbytes

    def queued_bytes(self):
        return self._bytes


class Health:
    """Whether an upstream answers, and when a dead one is tried again (RETRY_MIN doubling to
    RETRY_MAX). Each change is said once in the log, not every failed try."""

    def __init__(self, name, retry_min=RETRY_MIN, retry_max=RETRY_MAX):
        self.name = name
        self.retry_min, self.retry_max = retry_min, retry_max
        self.up = None  # None until the first try tells
        self.retry_at = 0.0
        self._delay = retry_min

    def may_try(self, now):
        return now >= self.retry_at

    def failed(self, why):
        delay, self._delay = self._delay, min(self._delay * 2, self.retry_max)
        self.retry_at = time.monotonic() + delay
        if self.up is not False:
            log.warning("upstream %s is down (%s): its connections are lost until it answers; trying "
                        "again in %.1f s, then less and less often", self.name, why, delay)
        self.up = False

    def ok(self):
        self._delay = self.retry_min
        if self.up is not True:
            log.info("upstream %s is up: replaying connections to it", self.name)
        self.up = True


class Output:
    """The interface every plug-in implements (each module names its class `Output`)."""

    scheme = ""
    name = ""  # how logs and stats name it, e.g. tcp://[::1]:8080

    def start(self):
        """Start its thread(s); offer() may be called before, it only queues."""

    def offer(self, event):
        """Take one event; never blocks. True if it was queued, False if dropped (counted)."""
        raise NotImplementedError

    def stats(self):
        """Its numbers, for /stats and the progress line."""
        return {}

    def close(self, timeout=2.0):
        """Stop, sending what is queued for up to `timeout` seconds."""
