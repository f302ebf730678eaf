"""--learn: a learning switch instead of a hub.

Remembers on which port (a link, or LOCAL for the tap) each source MAC was last seen, so a
unicast frame to a known MAC goes only there instead of everywhere. Broadcast, multicast and
unknown destinations still flood. Works on frames in the clear, so the server uses it after
decryption; pages and relays stay hubs.
"""

import threading
import time

LOCAL = "local"
TTL = 300.0          # seconds a learned MAC stays valid, as Linux bridges do
MAX_ENTRIES = 4096   # bounded, whatever source MACs peers make up


class MacTable:
    def __init__(self, ttl=TTL, max_entries=MAX_ENTRIES):
        self.ttl = ttl
        self.max_entries = max_entries
        self._table = {}
        self._lock = threading.Lock()

    def learn(self, frames, port):
        expires = time.monotonic() + self.ttl
        with self._lock:
            for frame in frames:
                src = bytes(frame[6:12])
                if src[0] & 1:
                    continue  # a multicast source is bogus: never learn it
                if src not in self._table and len(self._table) >= self.max_entries:
                    self._expire()
                    if len(self._table) >= self.max_entries:
                        continue
                self._table[src] = (port, expires)

    def destinations(self, frames):
        """The set of ports `frames` must reach, or None when they must flood."""
        now = time.monotonic()
        ports = set()
        with self._lock:
            for frame in frames:
                dst = bytes(frame[0:6])
                if dst[0] & 1:
                    return None
                entry = self._table.get(dst)
                if entry is None or entry[1] < now:
                    return None
                ports.add(entry[0])
        return ports

    def _expire(self):
        now = time.monotonic()
        for mac in [mac for mac, (_, expires) in self._table.items() if expires < now]:
            del self._table[mac]
