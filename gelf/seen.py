"""Which (origin, seq) message ids were already delivered: replay and duplicate suppression.

A sliding window per origin, as WireGuard and IPsec do: the highest seq seen and a bitmap of
the WINDOW seqs below it. A message older than the window, or already in it, is refused. The
same check that stops an attacker's replay stops a frame that came round a loop or arrived by
two paths. Only authenticated ids are recorded (the pump checks after decryption), so forged
messages cannot move a window.
"""

import threading
from collections import OrderedDict

WINDOW = 2048
MAX_ORIGINS = 1024


class SeenFilter:
    def __init__(self, window=WINDOW, max_origins=MAX_ORIGINS):
        self.window = window
        self.max_origins = max_origins
        self._mask = (1 << window) - 1
        self._origins = OrderedDict()  # origin -> [top seq, bitmap]; least recently used first
        self._lock = threading.Lock()

    def fresh(self, origin, seq):
        """True the first time (origin, seq) is offered inside the window; records it."""
        with self._lock:
            state = self._origins.get(origin)
            if state is None:
                self._origins[origin] = [seq, 1]
                if len(self._origins) > self.max_origins:
                    self._origins.popitem(last=False)
                return True
            self._origins.move_to_end(origin)
            top, bitmap = state
            if seq > top:
                shift = seq - top
                state[0] = seq
                state[1] = ((bitmap << shift) | 1) & self._mask if shift < self.window else 1
                return True
            age = top - seq
            if age >= self.window:
                return False
            bit = 1 << age
            if bitmap & bit:
                return False
            state[1] = bitmap | bit
            return True
