"""file: append every event to a --record file (events.py's bytes after the GELFMIR1 header).

The file keeps capture order and each event's capture time, so `--replay FILE` can feed the
same connections to outputs later at the recorded pace. A thread of its own writes it: a disk
that stalls makes the recording lose connections (counted `queue_full`), never capture wait.
"""

import logging
import threading

from gelf.mirror import events
from gelf.mirror.outputs import QUEUE_BYTES, QUEUE_EVENTS, Backlog, Counts, Output as Base

log = logging.getLogger("gelf.mirror.file")


def open_record(path):
    """The file, created (or truncated) with its header written; OSError for the caller to word."""
    handle = open(path, "wb")
    events.write_header(handle)
    handle.flush()
    return handle


class Output(Base):
    scheme = "file"

    def __init__(self, path, handle=None, max_events=QUEUE_EVENTS, max_bytes=QUEUE_BYTES):
        self.name = "file:" + path
        self.path = path
        self.handle = handle or open_record(path)
        self.counts = Counts("events", "bytes", "queue_full", "lost_events", "write_failed")
        self._ready = threading.Condition()
        self.backlog = Backlog(self.counts, self._wake, max_events, max_bytes)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gelf-mirror-record", daemon=True)

    def start(self):
        self._thread.start()

    def offer(self, event):
        return self.backlog.put(event)

    def stats(self):
        return dict(self.counts.snapshot(), path=self.path, queued_bytes=self.backlog.queued_bytes())

    def close(self, timeout=2.0):
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self._thread.is_alive():
            self._thread.join(timeout + 2)
        else:
            self.handle.close()

    def _wake(self):
        with self._ready:
            self._ready.notify()

    def _run(self):
        try:
            while True:
                with self._ready:
                    if not self.backlog.queued_bytes() and not self._stopping:
                        self._ready.wait(0.5)
                    stopping = self._stopping
                pending, _ = self.backlog.take()
                if pending:
                    self._write(pending)
                if stopping and not pending:
                    break
        except Exception:  # a bug: the recording stops (its Backlog fills and counts), capture goes on
            log.exception("recording %s: internal error; it stops here", self.path)
        finally:
            self.handle.close()

    def _write(self, pending):
        data = events.encode_all(pending)
        size = sum(len(event.data) for event in pending)
        try:
            self.handle.write(data)
            self.handle.flush()
        except OSError as err:
            self.counts.add("write_failed", len(pending))
            log.warning("cannot write the recording %s: %s", self.path, err.strerror or err)
        else:
            self.counts.add("events", len(pending))
            self.counts.add("bytes", len(data))
        self.backlog.release(size)
