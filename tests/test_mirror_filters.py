"""Mirror filters. Oracles: the request bytes the test wrote (a cut leaves the others exactly as
written), a direct count of the connections kept, and tokens worked out by hand."""

import ipaddress
import random
import struct

from gelf.mirror.events import TO_CLIENT, TO_SERVER, Event, Kind
from gelf.mirror.filters import HttpFilter, RateLimit, Sample, chain, endpoints


def address(client, cport, server, sport):
    """docs/mirror.md ADDRESS, written out by hand."""
    c, s = ipaddress.ip_address(client), ipaddress.ip_address(server)
    return struct.pack("!BBHH", c.version, 0, cport, sport) + c.packed + s.packed


def opened(conn, client="192.0.2.10", cport=40000, server="198.51.100.1", sport=80, ts=1.0):
    return Event(Kind.OPEN, conn, ts, TO_SERVER, address(client, cport, server, sport))


def data(conn, payload, direction=TO_SERVER, ts=1.0):
    return Event(Kind.DATA, conn, ts, direction, payload)


def closed(conn, ts=9.0):
    return Event(Kind.CLOSE, conn, ts, TO_SERVER, b"fin")


def get(path, method=b"GET"):
    return method + b" " + path + b" HTTP/1.1\r\nHost: prod\r\n\r\n"


def post(path, body):
    return b"POST " + path + b" HTTP/1.1\r\nHost: prod\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def resp(body):
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def through(f, events, now=1.0):
    out = []
    for event in events:
        out += f.feed(event, now)
    return out


def stream(events, conn=1, direction=TO_SERVER):
    return b"".join(e.data for e in events if e.kind == Kind.DATA and e.conn == conn and e.direction == direction)


def test_endpoints_v4_and_v6():
    assert endpoints(address("192.0.2.10", 40000, "198.51.100.1", 80)) == ("192.0.2.10", 40000, "198.51.100.1", 80)
    assert endpoints(address("2001:db8::1", 5, "2001:db8::2", 443)) == ("2001:db8::1", 5, "2001:db8::2", 443)
    assert endpoints(b"\x05\x00\x00\x01") is None and endpoints(b"\x04\x00" + bytes(7)) is None


def test_cut_requests_leave_the_others_byte_identical():
    reqs = [get(b"/api/1"), post(b"/admin/x", b"secret" * 100), get(b"/api/2?q=1"), get(b"/static/a.css"),
            post(b"/api/3", b"\r\n\r\n" * 50), get(b"/admin/y", b"DELETE")]
    allow = [get(b"/api/1"), get(b"/api/2?q=1"), post(b"/api/3", b"\r\n\r\n" * 50)]
    whole = b"".join(reqs)
    rng = random.Random(3)
    for trial in range(50):  # any split into reads gives the same cut
        cuts = sorted(rng.sample(range(1, len(whole)), rng.randint(0, 12)))
        pieces = [whole[a:b] for a, b in zip([0] + cuts, cuts + [len(whole)])]
        f = HttpFilter(allow=[r"^/api/"])
        out = through(f, [opened(1)] + [data(1, p) for p in pieces] + [closed(1)])
        assert stream(out) == b"".join(allow), trial
        assert out[0].kind == Kind.OPEN and out[-1].kind == Kind.CLOSE
    assert f.stats()["requests"] == 6 and f.stats()["kept"] == 3 and f.stats()["allow"] == 3


def test_deny_and_method_and_answers_cut_alike():
    reqs = [get(b"/a"), get(b"/health"), post(b"/b", b"xy"), get(b"/c", b"HEAD")]
    answers = [resp(b"A"), resp(b"ok"), resp(b"B"), b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"]
    f = HttpFilter(deny=[r"^/health$"], methods=["get", "post"])
    events = [opened(1), data(1, b"".join(reqs)), data(1, b"".join(answers), TO_CLIENT), closed(1)]
    out = through(f, events)
    assert stream(out) == reqs[0] + reqs[2]
    assert stream(out, direction=TO_CLIENT) == answers[0] + answers[2]
    assert (f.stats()["deny"], f.stats()["method"]) == (1, 1)


def test_answers_arriving_before_their_request_head_wait_for_it():
    f = HttpFilter(allow=["^/keep"])
    head = get(b"/keep")
    out = through(f, [opened(1), data(1, head[:10]), data(1, resp(b"k"), TO_CLIENT), data(1, head[10:])])
    assert stream(out) == head and stream(out, direction=TO_CLIENT) == resp(b"k")


def test_not_http_is_dropped_when_an_http_filter_is_set():
    f = HttpFilter(methods=["GET"])
    out = through(f, [opened(1), data(1, b"\x16\x03\x01 not http at all"), data(1, b"more"), closed(1)])
    assert out == []  # not even OPEN/CLOSE: nothing was kept
    assert f.stats()["not_http"] == 1 and f.stats()["bytes_dropped"] == len(b"\x16\x03\x01 not http at all") + len(b"more")
    # no HTTP filter in the chain: the same stream goes through untouched
    events = [opened(1), data(1, b"\x16\x03\x01 not http"), closed(1)]
    assert through(chain(Sample(100)), events) == events


def test_upgrade_tunnel_follows_its_request():
    up = b"GET /ws HTTP/1.1\r\nHost: p\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    for allow, want in ((["^/ws"], up + b"\x81\x02hi"), (["^/other"], b"")):
        out = through(HttpFilter(allow=allow), [opened(1), data(1, up + b"\x81\x02hi")])
        assert stream(out) == want


def test_sampling_is_stable_and_near_the_percentage():
    rng = random.Random(11)
    opens = [opened(i, "10.%d.%d.%d" % (rng.randrange(256), rng.randrange(256), rng.randrange(256)),
                    rng.randrange(1024, 65536), "192.0.2.80", 80) for i in range(10_000)]
    a, b = Sample(20), Sample(20)
    kept_a = {e.conn for e in opens if a.feed(e, 1.0)}
    # a second instance, numbering the same connections differently, keeps the same 4-tuples
    kept_b = {e.conn + 50_000 for e in opens if b.feed(e._replace(conn=e.conn + 50_000), 2.0)}
    assert {c + 50_000 for c in kept_a} == kept_b
    assert 1800 <= len(kept_a) <= 2200  # 20 % of 10 000; binomial sd is 40
    assert a.stats()["kept"] == len(kept_a)
    # later events of a kept connection pass, of a dropped one do not
    some_kept, some_dropped = min(kept_a), min(set(range(10_000)) - kept_a)
    assert a.feed(data(some_kept, b"x"), 1.0) and not a.feed(data(some_dropped, b"x"), 1.0)
    assert len(Sample(0).feed(opens[0], 1.0)) == 0 and len(Sample(100).feed(opens[0], 1.0)) == 1


def test_rate_cap_on_the_callers_clock():
    r = RateLimit(10)
    # 30 connections in the same instant: the bucket holds 10
    kept = [bool(r.feed(opened(i), 100.0)) for i in range(30)]
    assert kept == [True] * 10 + [False] * 20
    # half a second later, 5 tokens are back
    kept = [bool(r.feed(opened(100 + i), 100.5)) for i in range(10)]
    assert kept == [True] * 5 + [False] * 5
    # a steady 100 connections/s for 10 s keeps about 10/s
    n = sum(bool(r.feed(opened(1000 + i), 101.0 + i / 100)) for i in range(1000))
    assert 100 <= n <= 111
    # events of a connection follow its OPEN's fate
    assert r.feed(data(0, b"x"), 200.0) and not r.feed(data(29, b"x"), 200.0)


def test_chain_joins_filters_and_reports_each():
    f = chain(Sample(100), RateLimit(1), HttpFilter(allow=["^/yes"]))
    out = through(f, [opened(1), data(1, get(b"/yes") + get(b"/no")), closed(1), opened(2), data(2, get(b"/yes"))])
    assert stream(out) == get(b"/yes") and stream(out, conn=2) == b""
    stats = f.stats()
    assert stats["rate"]["dropped"] == 1 and stats["http"]["kept"] == 1 and stats["sample"]["kept"] == 2


def test_filtered_stream_still_pairs_in_the_comparer():
    from gelf.mirror.compare import Comparer
    reqs = [get(b"/a"), get(b"/secret"), get(b"/b")]
    answers = {b"/a": resp(b"A"), b"/secret": resp(b"S" * 40), b"/b": resp(b"B")}
    f, cmp = HttpFilter(deny=["^/secret"]), Comparer()
    events = [opened(1), data(1, b"".join(reqs), ts=1.0),
              data(1, b"".join(answers[p] for p in (b"/a", b"/secret", b"/b")), TO_CLIENT, ts=1.1), closed(1)]
    out = through(f, events)
    for event in out:
        cmp.feed(event)
    replayed = stream(out)  # what an output writes to staging, which answers like production
    cmp.on_sent("staging", 1, len(replayed), 1.0)
    cmp.on_response("staging", 1, answers[b"/a"] + answers[b"/b"], 1.2)
    row = cmp.snapshot()["upstreams"]["staging"]
    assert replayed == reqs[0] + reqs[2]
    assert (row["requests"], row["paired"], row["status_match"], row["body_match"]) == (2, 2, 2, 2)
