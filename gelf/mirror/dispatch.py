"""The fan-out: every event from capture (or a relay's peers, or a recording) to every output.

Capture's thread calls `dispatch`, so it must never wait: each output's `offer` only queues, and
an output that cannot take an event drops it for itself alone (outputs.Backlog), which is
counted here per output as well as by the output under its own reason.
"""

import threading

from gelf.mirror.events import Kind


class Dispatcher:
    def __init__(self, outputs):
        self.outputs = list(outputs)
        self._lock = threading.Lock()  # several relay links may dispatch at once
        self.events = 0
        self.bytes = 0
        self.conns = 0
        self.refused = [0] * len(self.outputs)  # events each output did not take

    def dispatch(self, event):
        """Offer one event to every output (hot path: one plain loop)."""
        with self._lock:
            self.events += 1
            self.bytes += len(event.data) if event.kind == Kind.DATA else 0
            if event.kind == Kind.OPEN:
                self.conns += 1
            for index, output in enumerate(self.outputs):
                if not output.offer(event):
                    self.refused[index] += 1

    def dispatch_all(self, events):
        for event in events:
            self.dispatch(event)

    def start(self):
        for output in self.outputs:
            output.start()

    def close(self, timeout=2.0):
        """Close every output at once, so that each has `timeout` to send what it holds."""
        closers = [threading.Thread(target=output.close, args=(timeout,), daemon=True) for output in self.outputs]
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join(timeout + 5)

    def stats(self):
        return {
            "events": self.events,
            "bytes": self.bytes,
            "conns": self.conns,
            "outputs": [dict(output.stats(), name=output.name, refused=refused)
                        for output, refused in zip(self.outputs, self.refused)],
        }
