"""Log lines about things a client can cause as often as it likes (refusals, timeouts): the first
at once, then at most one per kind every so often, saying how many there were. A flood of
connections must not become a flood of log lines."""

import collections
import logging
import time

EVERY = 10.0  # seconds


class Throttle:
    """Writes to `log`: per kind of event, the first line at once, later ones at most every
    `every` seconds; flush() (called now and then) tells how many were not written."""

    def __init__(self, log, every=EVERY):
        self.log = log
        self.every = every
        self._last = {}  # kind -> (time of the last line, latest text, level)
        self._unsaid = collections.Counter()

    def note(self, kind, text, level=logging.WARNING):
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last[0] < self.every:
            self._unsaid[kind] += 1
            self._last[kind] = (last[0], text, level)
            return
        self._last[kind] = (now, text, level)
        self.log.log(level, "%s", text)

    def flush(self):
        now = time.monotonic()
        for kind, count in list(self._unsaid.items()):
            when, text, level = self._last[kind]
            if now - when >= self.every:
                del self._unsaid[kind]
                self._last[kind] = (now, text, level)
                self.log.log(level, "%s (%d more in the last %d s)", text, count, round(now - when))
