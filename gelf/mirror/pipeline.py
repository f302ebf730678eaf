"""The mirror's pipeline: what happens to every event between its source (live capture, a
--replay recording, or a relay's links) and the outputs (docs/mirror.md, "The pipeline").

    source --event--> filters (chain.feed(event, now)) --kept--> comparer.feed(e) --> dispatcher
    tcp outputs --on_sent / on_response (bound to their upstream's name)--> comparer

`Pipeline` stands where the Dispatcher stood: sources call `dispatch(event)` (replay.Replayer,
relay.MirrorRelay and the capture loop all do), so none of them knows about filters or
comparison. The filters and the Comparer are pure and not thread-safe; one lock guards both,
since relay links (the link loop) and output threads (callbacks) call in from their own threads.
Outputs are offered events outside that lock: an output's offer never waits, but there is no
reason to hold output threads' callbacks up while it runs.

A `Ticker` thread does what must happen about once a second whatever the traffic: the
Comparer's `expire`, the terminal's progress line (only when stderr is a TTY) and, with -v, a
log line every REPORT_EVERY seconds.
"""

import logging
import threading
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gelf.mirror import compare_view
from gelf.mirror.compare import CompareCollector, Comparer
from gelf.mirror.filters import HttpFilter, RateLimit, Sample, chain

log = logging.getLogger("gelf.mirror")

TICK = 1.0  # seconds between the Comparer's expire() and progress-line redraws
REPORT_EVERY = 10.0  # seconds between -v's log lines


def build_filters(sample=None, rate=None, allow=(), deny=(), methods=()):
    """The filter chain of the flags given, cheap ones first (docs/mirror.md, "Filters"), or None
    when none was given. The HTTP filter only when an HTTP flag was given: without one, a stream
    that is not HTTP passes untouched. Raises re.error for a bad regex (checks.py words it)."""
    filters = []
    if sample is not None and sample < 100:
        filters.append(Sample(sample))
    if rate is not None:
        filters.append(RateLimit(rate))
    if allow or deny or methods:
        filters.append(HttpFilter(allow=allow, deny=deny, methods=methods))
    return chain(*filters) if filters else None


class Replies:
    """One upstream's callbacks into the Comparer, under the pipeline's lock. Called as
    `on_response(conn, data, ts)`; its `on_sent(conn, nbytes, ts)` is what tcp outputs call after
    each write (docs/mirror.md, the callback contract; the upstream's name is bound here)."""

    def __init__(self, pipeline, upstream):
        self.pipeline, self.upstream = pipeline, upstream

    def __call__(self, conn, data, ts):
        with self.pipeline.lock:
            self.pipeline.comparer.on_response(self.upstream, conn, data, ts)

    def on_sent(self, conn, nbytes, ts):
        with self.pipeline.lock:
            self.pipeline.comparer.on_sent(self.upstream, conn, nbytes, ts)


class Pipeline:
    """Built before the outputs (they need `replies_for`), then given their Dispatcher with `use`."""

    def __init__(self, filters=None, comparer=None, clock=time.time):
        self.dispatcher = None
        self.filters = filters  # filters.Chain or None
        self.comparer = comparer  # compare.Comparer or None (--no-compare)
        self.clock = clock
        self.lock = threading.Lock()  # the filters' and the Comparer's: neither is thread-safe
        self.registry = CollectorRegistry()  # the mirror's own: /metrics shows nothing else

    def use(self, dispatcher):
        self.dispatcher = dispatcher
        self.registry.register(_OutputCollector(self))
        if self.comparer is not None:
            self.registry.register(CompareCollector(self.compare_snapshot))
        return self

    @property
    def outputs(self):
        return self.dispatcher.outputs

    def replies_for(self, upstream):
        """The on_response callback (with on_sent) for the output of `upstream`, or None."""
        return Replies(self, upstream) if self.comparer is not None else None

    def dispatch(self, event):
        """One event from the source: filtered, seen by the Comparer, then offered to the outputs."""
        if self.filters is None and self.comparer is None:
            self.dispatcher.dispatch(event)
            return
        with self.lock:
            kept = self.filters.feed(event, self.clock()) if self.filters is not None else (event,)
            if self.comparer is not None:
                for e in kept:  # before the outputs see it: their callbacks then find the connection
                    self.comparer.feed(e)
        for e in kept:
            self.dispatcher.dispatch(e)

    def dispatch_all(self, events):
        for event in events:
            self.dispatch(event)

    def start(self):
        self.dispatcher.start()

    def close(self, timeout=2.0):
        self.dispatcher.close(timeout)

    def expire(self, now):
        if self.comparer is not None:
            with self.lock:
                self.comparer.expire(now)

    def compare_snapshot(self):
        with self.lock:
            return self.comparer.snapshot()

    def stats(self):
        """The dispatcher's and outputs' numbers (what wait_ready and the -v line read)."""
        return self.dispatcher.stats()

    def document(self):
        """The /stats JSON: the dispatcher and its outputs, `filters`, `compare` (None when off)."""
        doc = self.dispatcher.stats()
        with self.lock:
            doc["filters"] = self.filters.stats() if self.filters is not None else {}
            doc["compare"] = self.comparer.snapshot() if self.comparer is not None else None
        return doc

    def metrics(self):
        """The /metrics text (Prometheus exposition format) from the mirror's own registry."""
        return generate_latest(self.registry)


class _OutputCollector(Collector):
    """The dispatcher's and each output's counters, labelled by output."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def collect(self):
        stats = self.pipeline.dispatcher.stats()
        for key in ("events", "bytes", "conns"):
            yield CounterMetricFamily("gelf_mirror_%s" % key, "Events dispatched to the outputs: %s" % key,
                                      value=stats[key])
        counts = {}
        up = GaugeMetricFamily("gelf_mirror_output_up", "1 if the output's upstream answers, 0 if not",
                               labels=["output"])
        for out in stats["outputs"]:
            for key, value in out.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    family = counts.get(key)
                    if family is None:
                        family = counts[key] = CounterMetricFamily("gelf_mirror_output_" + key,
                                                                   "Per output: %s" % key, labels=["output"])
                    family.add_metric([out["name"]], value)
            if out.get("up") is not None:
                up.add_metric([out["name"]], 1 if out["up"] else 0)
        yield from counts.values()
        yield up


class Ticker:
    """About once a second: the Comparer's expire, the progress line on a TTY (`screen`, a text
    stream, or None), and with `verbose` the dispatcher's numbers in the log every REPORT_EVERY s."""

    def __init__(self, pipeline, screen=None, verbose=False, report=None, tick=TICK):
        self.pipeline, self.screen, self.verbose, self.report, self.tick = pipeline, screen, verbose, report, tick
        self._stop = threading.Event()
        self._drawn = False
        self._thread = threading.Thread(target=self._run, name="gelf-mirror-ticker", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self._drawn:
            self._write("\r\x1b[K")

    def _run(self):
        last_report = time.monotonic()
        while not self._stop.wait(self.tick):
            try:
                self.pipeline.expire(time.time())
                if self.screen is not None and self.pipeline.comparer is not None:
                    self._write("\r\x1b[K" + compare_view.progress_line(self.pipeline.compare_snapshot()))
                    self._drawn = True
                if self.verbose and self.report and time.monotonic() - last_report >= REPORT_EVERY:
                    last_report = time.monotonic()
                    self.report()
            except Exception:  # a bug here must not stop the mirror; said once per tick at most
                log.exception("gelf-mirror: the once-a-second tick failed")

    def _write(self, text):
        try:
            self.screen.write(text)
            self.screen.flush()
        except (OSError, ValueError):
            self.screen = None  # the terminal is gone
