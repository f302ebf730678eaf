"""Counters shared by the data path, read by /stats."""

import threading

DROP_REASONS = ("text", "empty", "oversize", "malformed", "unknown_type", "auth", "not_sealed", "no_key",
                "replay", "loop", "forbidden", "offload", "queue_full", "queue_delay", "tap_write")


class Drops:
    """Dropped messages by reason; thread-safe because every link thread counts here.

    A link's Drops has the server's as parent, so one `add` counts for the link and in total.
    """

    def __init__(self, parent=None):
        self.parent = parent
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(DROP_REASONS, 0)

    def add(self, reason, n=1):
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + n
        if self.parent is not None:
            self.parent.add(reason, n)

    def snapshot(self):
        with self._lock:
            return dict(self._counts)


class Traffic:
    """Messages/frames and bytes in one direction. Writers are serialised by their owner (one
    reader thread per link, or a lock), so adding needs no lock of its own."""

    __slots__ = ("count", "bytes")

    def __init__(self):
        self.count = 0
        self.bytes = 0

    def add(self, nbytes, n=1):
        self.count += n
        self.bytes += nbytes
