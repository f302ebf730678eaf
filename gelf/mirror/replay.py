"""--replay FILE: feed a recording's connections to the outputs again, at the recorded pace.

The pace comes from the events' capture times: an event recorded t seconds after the first is
dispatched t / speed seconds after the replay started (`--speed 200%`: twice as fast). A
recording cut off while connections were open gets a CLOSE `shutdown` for them at its end, and
with --loop each pass gets connection ids of its own, so an upstream sees new connections
rather than a second OPEN of one it is already replaying.
"""

import itertools
import logging
import threading
import time

from gelf.mirror import events
from gelf.mirror.events import Kind

log = logging.getLogger("gelf.mirror.replay")


def check(path):
    """Raise OSError or events.EventError if `path` is not a readable recording (checked at start)."""
    with open(path, "rb") as handle:
        for _ in itertools.islice(events.read_file(handle), 1):
            pass


class Replayer:
    def __init__(self, path, dispatcher, speed=1.0, loop=False, stop=None):
        self.path = path
        self.dispatcher = dispatcher
        self.speed = speed
        self.loop = loop
        self.stop = stop or threading.Event()
        self.passes = 0
        self._ids = itertools.count(1)

    def run(self):
        """Replay until the recording ends (or, with loop, until stopped); EventError on a bad file."""
        while not self.stop.is_set():
            self._one_pass()
            self.passes += 1
            if not self.loop:
                break

    def _one_pass(self):
        ids = {}  # conn in the recording -> conn in this pass
        start = first = None
        with open(self.path, "rb") as handle:
            for event in events.read_file(handle):
                if first is None:
                    first, start = event.ts, time.monotonic()
                delay = start + (event.ts - first) / self.speed - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    break
                if event.kind == Kind.OPEN:
                    ids[event.conn] = next(self._ids)
                conn = ids.get(event.conn)
                if conn is None:
                    continue  # the recording started in the middle of this connection
                if event.kind == Kind.CLOSE:
                    del ids[event.conn]
                self.dispatcher.dispatch(event._replace(conn=conn, ts=time.time()))
        for conn in ids.values():
            self.dispatcher.dispatch(events.close_event(conn, time.time(), "shutdown"))
