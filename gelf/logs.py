"""Logging for every gelf tool: `[Gelf] ` lines on stderr, no secrets, no floods.

- Secrets: a `token=...` in any line (ours, or CherryPy's access log with -d) is redacted.
- Floods: a line template (say "reading %s failed: %s") may repeat BURST times in a WINDOW;
  after that it is held back until the window ends, and the next one that passes says how many
  were held. So a fault repeating thousands of times a second (a vanished tap, a hostile peer)
  costs a few lines per window, and no warning is ever used up for good: the next window
  shows it again. The front door (gelf.gate), whose every line a client can cause at will
  (refusals, timeouts), gets one line per template and window.
"""

import logging
import re
import sys
import time

BURST = 20
BURSTS = {"gelf.gate": 1}  # loggers with a burst of their own
WINDOW = 10.0  # seconds
MAX_TEMPLATES = 1024

# A token given as ?token=, URL-encoded inside another parameter (token%3D), or after the '#' of a
# peer written host:port#token (peer=host:port%23token).
_SECRETS = (re.compile(r"(token(?:=|%3D))[^&\s\"'#%]+", re.IGNORECASE),
            re.compile(r"((?:peer|connect)=[^&\s\"']*?(?:%23|#))[^&\s\"']+", re.IGNORECASE))


def redact(text):
    for secret in _SECRETS:
        text = secret.sub(r"\1REDACTED", text)
    return text


class Redact(logging.Filter):
    """Rewrites the record's message with every token redacted."""

    def filter(self, record):
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


class RateLimit(logging.Filter):
    """At most BURST records per template per WINDOW seconds; counts what it holds back."""

    def __init__(self, burst=BURST, window=WINDOW, clock=time.monotonic, bursts=None):
        super().__init__()
        self.burst = burst
        self.bursts = BURSTS if bursts is None else bursts
        self.window = window
        self.clock = clock
        self._windows = {}  # (logger, template) -> [window start, records let through, held back]

    def filter(self, record):
        key = (record.name, record.msg)
        now = self.clock()
        state = self._windows.get(key)
        if state is None or now - state[0] >= self.window:
            held = state[2] if state else 0
            if state is None and len(self._windows) >= MAX_TEMPLATES:
                self._windows.pop(next(iter(self._windows)))  # the oldest template
            self._windows[key] = [now, 1, 0]
            if held:
                record.msg, record.args = "%s (%d more like this held back)", (record.getMessage(), held)
            return True
        if state[1] < self.bursts.get(record.name, self.burst):
            state[1] += 1
            return True
        state[2] += 1
        return False


def setup_logging(debug):
    """gelf's loggers print `[Gelf] message` on stderr; DEBUG with -d, else INFO."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[Gelf] %(message)s"))
    handler.addFilter(RateLimit())
    handler.addFilter(Redact())
    root = logging.getLogger("gelf")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
