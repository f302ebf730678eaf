"""gelf's log lines: repeats rate-limited per template and window (never used up for good), the
front door's lines one per window, and tokens redacted."""

import logging

from gelf.logs import RateLimit, Redact


def records(name, template, n, args=()):
    return [logging.LogRecord(name, logging.WARNING, __file__, 1, template, args, None) for _ in range(n)]


def test_a_repeated_line_passes_a_burst_then_waits_for_the_next_window_and_says_how_many():
    clock = [100.0]
    limit = RateLimit(burst=20, window=10, clock=lambda: clock[0])
    passed = [r for r in records("gelf.pump", "reading %s failed: %s", 1000, ("tap0", "EBADFD")) if limit.filter(r)]
    assert len(passed) == 20
    assert limit.filter(records("gelf.links", "another template", 1)[0])  # other lines are not held
    clock[0] += 10
    later = records("gelf.pump", "reading %s failed: %s", 1, ("tap0", "EBADFD"))[0]
    assert limit.filter(later) and later.getMessage() == \
        "reading tap0 failed: EBADFD (980 more like this held back)"


def test_the_front_door_gets_one_line_per_window():
    clock = [0.0]
    limit = RateLimit(burst=20, window=10, clock=lambda: clock[0])
    lines = records("gelf.gate", "refusing connections over %s, e.g. from %s", 500, ("--max-per-address", "x"))
    assert sum(map(limit.filter, lines)) == 1


def test_templates_are_bounded_by_forgetting_the_oldest():
    limit = RateLimit(burst=1, window=10, clock=lambda: 0.0)
    for i in range(5000):  # a peer that makes every line new
        assert limit.filter(records("gelf.pump", "line %d" % i, 1)[0])
    assert len(limit._windows) <= 1024


def test_tokens_are_redacted():
    record = records("cherrypy.access", '"GET /stats?token=%s&x=1 HTTP/1.1" 200', 1, ("s3cret",))[0]
    Redact().filter(record)
    assert record.getMessage() == '"GET /stats?token=REDACTED&x=1 HTTP/1.1" 200'


def test_peer_tokens_in_page_addresses_are_redacted():
    line = "GET /?peer=10.0.0.2:7001%23peer-secret&peer=ws://h/ws%3Ftoken%3Dother-secret HTTP/1.1"
    record = records("cherrypy.access", line, 1)[0]
    Redact().filter(record)
    assert "secret" not in record.getMessage() and record.getMessage().count("REDACTED") == 2
