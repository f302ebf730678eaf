"""Log lines about things a client can cause as often as it likes (refusals, timeouts): the first
at once, then at most one per kind every so often, saying how many there were. A flood of
connections must not become a flood of log lines."""

import collections
import logging
import time

EVERY = 10.0  # seconds


class Throttle:
    """Writes to `log`: per kind of event, the first line at once, later ones at most every
    `every` seconds; flush() (called now and then) writes the latest with how many were not
    written. Lines keep their template, so gelf's own per-template limit (logs.py) sees them apart."""

    def __init__(self, log, every=EVERY):
        self.log = log
        self.every = every
        self._last = {}  # kind -> (time of the last line, and the latest level, template, args)
        self._unsaid = collections.Counter()

    def note(self, kind, level, template, *args):
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last[0] < self.every:
            self._unsaid[kind] += 1
            self._last[kind] = (last[0], level, template, args)
            return
        self._last[kind] = (now, level, template, args)
        self.log.log(level, template, *args)

    def flush(self):
        now = time.monotonic()
        for kind, count in list(self._unsaid.items()):
            when, level, template, args = self._last[kind]
            if now - when >= self.every:
                del self._unsaid[kind]
                self._last[kind] = (now, level, template, args)
                self.log.log(level, template + " (%d more in the last %d s)", *args, count, round(now - when))
