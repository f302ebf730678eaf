"""Response comparison, against counts the test works out from the traffic it made up: which
requests it sent, which the staging server was told to fail, and the latencies it chose."""

import numpy
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from gelf.mirror.compare import CompareCollector, Comparer, progress_line, report
from gelf.mirror.events import TO_CLIENT, TO_SERVER, Event, Kind


def req(path, method=b"GET"):
    return method + b" " + path + b" HTTP/1.1\r\nHost: prod\r\n\r\n"


def resp(status, body, extra=b""):
    return (b"HTTP/1.1 %d X\r\nDate: Thu, 03 Dec 2026 20:%02d:00 GMT\r\n" % (status, status % 60) + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def data(conn, ts, direction, payload):
    return Event(Kind.DATA, conn, ts, direction, payload)


def exchange(cmp, conn, paths, staging, upstream="staging", t0=100.0):
    """Production answers 200 with a body naming the path; `staging(path)` says what staging
    answers. Requests go one by one on one keep-alive connection."""
    cmp.feed(Event(Kind.OPEN, conn, t0, TO_SERVER, b""))
    for i, path in enumerate(paths):
        t = t0 + i
        cmp.feed(data(conn, t, TO_SERVER, req(path)))
        cmp.on_sent(upstream, conn, len(req(path)), t + 0.001)
        cmp.feed(data(conn, t + 0.010, TO_CLIENT, resp(200, b"page " + path)))
        cmp.on_response(upstream, conn, staging(path), t + 0.021)
    cmp.feed(Event(Kind.CLOSE, conn, t0 + len(paths), TO_SERVER, b"fin"))


def test_acceptance_6_one_failing_path_is_the_one_mismatch():
    cmp = Comparer()
    paths = [b"/a", b"/b", b"/fail", b"/c?x=1", b"/fail?y=2", b"/d"] * 50
    for conn in range(4):
        exchange(cmp, conn, paths,
                 lambda p: resp(500, b"oops") if p.startswith(b"/fail") else resp(200, b"page " + p))
    snap = cmp.snapshot()
    row = snap["upstreams"]["staging"]
    n, failed = 4 * len(paths), 4 * 100
    assert (snap["requests"], snap["responses"]) == (n, n)
    assert (row["requests"], row["responses"], row["paired"], row["unpaired"]) == (n, n, n, 0)
    assert (row["status_match"], row["body_match"]) == (n - failed, n - failed)
    assert row["status_match_rate"] == row["body_match_rate"] == (n - failed) / n
    assert row["headers_match_rate"] == 1.0  # Date differs, and is ignored by default
    assert row["top_mismatches"] == [{"method": "GET", "path": "/fail", "count": failed}]
    text = report(snap)
    assert "status match 66.7% (800/1200)" in text and "GET /fail" in text and "/a" not in text
    assert "staging: 1200 paired, status 66.7%" in progress_line(snap)


def test_pipelined_and_either_side_first():
    cmp = Comparer()
    paths = [b"/1", b"/2", b"/3"]
    stream = b"".join(req(p) for p in paths)
    cmp.feed(data(7, 1.0, TO_SERVER, stream))
    cmp.on_sent("up", 7, len(stream), 1.0)
    answers = [resp(200, b"one"), resp(404, b"two"), resp(200, b"three")]
    cmp.on_response("up", 7, answers[0] + answers[1][:20], 1.5)  # staging is faster on the first two
    cmp.feed(data(7, 2.0, TO_CLIENT, b"".join(answers[:2]) + resp(200, b"3")))
    cmp.on_response("up", 7, answers[1][20:] + answers[2], 2.5)
    row = cmp.snapshot()["upstreams"]["up"]
    assert (row["paired"], row["status_match"], row["body_match"]) == (3, 3, 2)
    assert row["top_mismatches"] == [{"method": "GET", "path": "/3", "count": 1}]


def test_head_requests_pair_without_bodies():
    cmp = Comparer()
    stream = req(b"/h", b"HEAD") + req(b"/g")
    cmp.feed(data(1, 1.0, TO_SERVER, stream))
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    answers = head + resp(200, b"hello")
    cmp.feed(data(1, 2.0, TO_CLIENT, answers))
    cmp.on_sent("up", 1, len(stream), 1.0)
    cmp.on_response("up", 1, answers, 2.0)
    row = cmp.snapshot()["upstreams"]["up"]
    assert (row["paired"], row["status_match"], row["body_match"], row["broken"]) == (2, 2, 2, 0)


def test_ignored_headers_are_configurable():
    for ignore, want in ((None, 0), (["X-Build"], 1)):
        cmp = Comparer(ignore_headers=ignore)
        exchange(cmp, 1, [b"/x"], lambda p: resp(200, b"page " + p, b"X-Build: 2\r\n"))
        row = cmp.snapshot()["upstreams"]["staging"]
        assert (row["status_match"], row["body_match"], row["headers_match"]) == (1, 1, want)
    assert Comparer(ignore_headers=["X-Build"]).snapshot()["ignore_headers"] == ["x-build"]


def test_latency_percentiles_on_known_inputs():
    cmp = Comparer()
    prod = [0.001 * (i % 37 + 1) for i in range(500)]
    staging = [0.002 * (i % 53 + 1) for i in range(500)]
    t = 1000.0
    for i in range(500):
        cmp.feed(data(3, t, TO_SERVER, req(b"/l")))
        cmp.feed(data(3, t + prod[i], TO_CLIENT, resp(200, b"x")))
        cmp.on_sent("s", 3, len(req(b"/l")), t + 0.5)
        cmp.on_response("s", 3, resp(200, b"x"), t + 0.5 + staging[i])
        t += 1.0
    snap = cmp.snapshot()
    for got, values in ((snap["latency"], prod), (snap["upstreams"]["s"]["latency"], staging)):
        assert got["n"] == 500
        for key, q in (("p50", 50), ("p99", 99)):
            want = numpy.percentile(values, q, method="inverted_cdf")
            assert abs(got[key] - want) < 1e-6, (key, got[key], want)


def test_a_million_unpaired_responses_stay_bounded():
    cmp = Comparer(max_conns=100, max_pending=64)
    batch = resp(200, b"ok") * 1000
    for conn in range(1000):  # more connections than kept: the oldest go
        cmp.feed(data(conn, 1.0, TO_SERVER, req(b"/only")))
        cmp.on_response("up", conn, batch, 2.0)  # production never answers
    snap = cmp.snapshot()
    row = snap["upstreams"]["up"]
    assert row["responses"] == 1_000_000 and row["paired"] == 0
    assert snap["conns"] <= 100 and snap["held"] <= 100 * (64 + 1)
    assert row["unpaired"] >= 1_000_000 - 100 * 64
    assert snap["evicted"] == 900


def test_expire_forgets_closed_and_idle_connections():
    cmp = Comparer(linger=30, idle=300)
    exchange(cmp, 1, [b"/a"], lambda p: resp(200, b"page " + p), t0=100.0)
    cmp.feed(data(2, 100.0, TO_SERVER, req(b"/b")))
    cmp.expire(120.0)
    assert cmp.snapshot()["conns"] == 2
    cmp.expire(131.0)
    assert cmp.snapshot()["conns"] == 1
    cmp.expire(401.0)
    assert cmp.snapshot()["conns"] == 0
    cmp.on_response("up", 2, resp(200, b"late"), 402.0)
    assert cmp.snapshot()["unknown_conn"] == 1


def test_not_http_and_broken_answers_are_counted_not_raised():
    cmp = Comparer()
    cmp.feed(data(1, 1.0, TO_SERVER, b"\x16\x03\x01 TLS hello"))
    cmp.feed(data(2, 1.0, TO_SERVER, req(b"/ok")))
    cmp.on_sent("up", 2, len(req(b"/ok")), 1.0)
    cmp.on_response("up", 2, b"SSH-2.0-OpenSSH\r\n", 1.1)
    snap = cmp.snapshot()
    assert snap["not_http"] == 1 and snap["upstreams"]["up"]["broken"] == 1


def test_prometheus_families_carry_the_upstream_label():
    cmp = Comparer()
    exchange(cmp, 1, [b"/a", b"/fail"], lambda p: resp(500 if p == b"/fail" else 200, b"page " + p))
    reg = CollectorRegistry()
    reg.register(CompareCollector(cmp.snapshot))
    text = generate_latest(reg).decode()
    assert 'gelf_mirror_match_ratio{part="status",upstream="staging"} 0.5' in text
    assert 'gelf_mirror_upstream_paired_total{upstream="staging"} 2.0' in text
    assert 'gelf_mirror_mismatches{method="GET",path="/fail",upstream="staging"} 1.0' in text
    assert 'gelf_mirror_latency_seconds{quantile="0.99",upstream="production"}' in text
    assert "gelf_mirror_production_requests_total 2.0" in text


def test_production_answers_no_upstream_paired_are_counted_when_forgotten():
    cmp = Comparer(linger=1)
    stream = req(b"/1") + req(b"/2") + req(b"/3")
    cmp.feed(data(1, 1.0, TO_SERVER, stream))
    cmp.feed(data(1, 1.1, TO_CLIENT, resp(200, b"a") + resp(200, b"b") + resp(200, b"c")))
    cmp.on_sent("up", 1, len(stream), 1.0)
    cmp.on_response("up", 1, resp(200, b"a"), 1.2)  # staging answered only the first
    cmp.feed(Event(Kind.CLOSE, 1, 2.0, TO_SERVER, b"fin"))
    assert cmp.snapshot()["unpaired"] == 0  # still waiting for late answers
    cmp.expire(5.0)
    snap = cmp.snapshot()
    assert snap["unpaired"] == 2 and snap["upstreams"]["up"]["paired"] == 1


def test_report_reads_a_saved_stats_document():
    import json
    cmp = Comparer()
    exchange(cmp, 1, [b"/a", b"/fail"], lambda p: resp(500 if p == b"/fail" else 200, b"page " + p))
    snap = cmp.snapshot()
    saved = json.loads(json.dumps(snap))
    assert report(saved) == report(snap) and progress_line(saved) == progress_line(snap)
    assert "\n" not in progress_line(snap)
    empty = Comparer().snapshot()
    assert "no upstream has answered yet" in report(empty) and progress_line(empty).startswith("req 0")
