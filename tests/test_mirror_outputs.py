"""Outputs against real TCP servers on loopback (ports 18100-18129): byte-identical replay per
connection, a dead or stalled upstream losing only its own data (counted) and recovering, and
--record then --replay."""

import hashlib
import os
import time

import pytest

from gelf.mirror import events
from gelf.mirror.dispatch import Dispatcher
from gelf.mirror.outputs import lookup
from gelf.mirror.outputs.tcp import Output as TcpOutput
from mirror_helpers import Sink, connection, interleave, port_in, wait_for

LOW, HIGH = 18100, 18129


@pytest.fixture
def sinks():
    made = []

    def make(**kw):
        sink = Sink(port_in(LOW, HIGH), **kw)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.stop()


@pytest.fixture
def outputs():
    made = []

    def make(cls=TcpOutput, *args, **kw):
        output = cls(*args, **kw)
        made.append(output)
        return output

    yield make
    for output in made:
        output.close(0.5)


def http_stream(n, tag):
    """Keep-alive and pipelined requests, with bodies, as one client would send them; cut into
    uneven chunks (segments) so that nothing lines up with request boundaries."""
    parts = []
    for i in range(n):
        body = os.urandom(97 * (i + 1))
        head = b"POST /%s/%d HTTP/1.1\r\nHost: staging\r\nContent-Length: %d\r\n\r\n" % (tag, i, len(body))
        parts.append(head + body)
        parts.append(b"GET /%s/%d HTTP/1.1\r\nHost: staging\r\n\r\n" % (tag, i))
    data = b"".join(parts)
    cuts = [0]
    while cuts[-1] < len(data):
        cuts.append(cuts[-1] + 1 + (cuts[-1] * 7919) % 1400)
    return data, [data[a:b] for a, b in zip(cuts, cuts[1:])]


def test_tcp_replay_is_byte_identical_per_connection(sinks, outputs):
    sink = sinks(reply=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    responses = {}
    output = outputs(TcpOutput, "127.0.0.1", sink.port,
                     on_response=lambda conn, data, ts: responses.setdefault(conn, bytearray()).extend(data))
    output.start()
    wanted, streams = {}, []
    for tag in range(12):
        data, chunks = http_stream(5, b"c%d" % tag)
        conn, evs = connection(chunks)
        wanted[conn] = data
        streams.append(evs)
    dispatcher = Dispatcher([output])
    dispatcher.dispatch_all(interleave(streams))
    wait_for(lambda: sum(sink.snapshot()[1]) == len(wanted), 30, what="every replayed connection closed")
    got, _ = sink.snapshot()
    assert sorted(hashlib.sha256(s).hexdigest() for s in got) == \
        sorted(hashlib.sha256(d).hexdigest() for d in wanted.values())
    assert set(responses) == set(wanted)  # every connection's answers came back, under its id
    stats = output.stats()
    assert stats["conns"] == 12 and stats["replayed_bytes"] == sum(map(len, wanted.values()))
    assert stats["queue_full"] == stats["upstream_down"] == 0
    assert dispatcher.stats()["conns"] == 12


def test_ipv6_upstream(outputs):
    sink = Sink(port_in(LOW, HIGH, family=__import__("socket").AF_INET6, host="::1"), host="::1")
    try:
        output = outputs(TcpOutput, "::1", sink.port)
        output.start()
        conn, evs = connection([b"GET / HTTP/1.1\r\n", b"Host: x\r\n\r\n"])
        Dispatcher([output]).dispatch_all(evs)
        wait_for(lambda: sink.snapshot()[1] == [True], 20, what="the v6 replay")
        assert sink.snapshot()[0] == [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]
        assert output.name == "tcp://[::1]:%d" % sink.port
    finally:
        sink.stop()


def test_dead_upstream_loses_only_its_own_and_recovers(sinks, outputs):
    good = sinks()
    dead_port = port_in(LOW, HIGH)  # nothing listens there yet
    dead = outputs(TcpOutput, "127.0.0.1", dead_port, retry_min=0.2, retry_max=1.0)
    alive = outputs(TcpOutput, "127.0.0.1", good.port)
    dispatcher = Dispatcher([dead, alive])
    dispatcher.start()
    sent = []
    for i in range(10):
        data, chunks = http_stream(2, b"d%d" % i)
        sent.append(data)
        dispatcher.dispatch_all(connection(chunks)[1])
        time.sleep(0.02)
    wait_for(lambda: sum(good.snapshot()[1]) == 10, 30, what="the live upstream to get everything")
    assert sorted(good.snapshot()[0]) == sorted(sent)
    wait_for(lambda: dead.stats()["upstream_down"] == 10, 20, what="the dead upstream's losses counted")
    assert dead.stats()["up"] is False and alive.stats()["upstream_down"] == 0
    # the upstream comes back: after its backoff, new connections reach it
    revived = Sink(dead_port)
    try:
        def delivered():
            data, chunks = http_stream(1, b"back")
            dispatcher.dispatch_all(connection(chunks)[1])
            return data in revived.snapshot()[0] or any(s.startswith(b"POST /back") for s in revived.snapshot()[0])
        wait_for(delivered, 30, interval=0.3, what="the revived upstream to get connections")
        wait_for(lambda: dead.stats()["up"] is True, 10, what="the output to see it up")
    finally:
        revived.stop()


def test_stalled_upstream_overflows_alone_and_recovers(sinks, outputs):
    stalled = sinks(reading=False, rcvbuf=4096)
    good = sinks()
    slow = outputs(TcpOutput, "127.0.0.1", stalled.port, max_bytes=256 * 1024, stall=3.0)
    fast = outputs(TcpOutput, "127.0.0.1", good.port)
    dispatcher = Dispatcher([slow, fast])
    dispatcher.start()
    sent = []
    for i in range(8):
        data = os.urandom(512 * 1024)
        sent.append(data)
        dispatcher.dispatch_all(connection([data[j:j + 16384] for j in range(0, len(data), 16384)])[1])
    wait_for(lambda: sum(good.snapshot()[1]) == 8, 60, what="the good upstream to get everything")
    assert sorted(good.snapshot()[0]) == sorted(sent)
    assert slow.stats()["queue_full"] > 0
    assert fast.stats()["queue_full"] == 0 and fast.stats()["lost_events"] == 0
    # the stalled connections are given up (bounded memory), then the upstream reads again
    wait_for(lambda: slow.stats()["open"] == 0, 30, what="stalled replays given up")
    assert slow.backlog.queued_bytes() == 0
    stalled.resume()
    data = os.urandom(100_000)
    dispatcher.dispatch_all(connection([data[:50_000], data[50_000:]])[1])
    wait_for(lambda: data in stalled.snapshot()[0], 30, what="the recovered upstream to get a new connection")


def record(path, evs):
    out = lookup("file")(path)
    out.start()
    Dispatcher([out]).dispatch_all(evs)
    out.close(5)
    return out


def test_record_then_replay_same_events_in_order(tmp_path, sinks, outputs):
    from gelf.mirror.replay import Replayer

    path = str(tmp_path / "rec.gelfmir")
    base = time.time()
    streams = []
    for i in range(6):
        data, chunks = http_stream(2, b"r%d" % i)
        streams.append(connection(chunks, ts=base + i * 0.01)[1])
    evs = interleave(streams)
    record(path, evs)
    with open(path, "rb") as handle:
        again = list(events.read_file(handle))
    assert [(e.kind, e.conn, e.data) for e in again] == [(e.kind, e.conn, e.data) for e in evs]
    seen = []

    class Collect:
        def offer(self, event):
            seen.append(event)
            return True

    Replayer(path, Dispatcher([Collect()]), speed=1.0).run()
    assert [(e.kind, e.data) for e in seen] == [(e.kind, e.data) for e in evs]


def test_replay_speed_200_takes_about_half_the_time(tmp_path, sinks, outputs):
    from gelf.mirror.replay import Replayer

    path = str(tmp_path / "paced.gelfmir")
    base = 1_700_000_000.0
    evs = []
    for i in range(10):  # ten connections, 0.15 s apart: 1.35 s of recorded time
        evs += connection([b"GET /%d HTTP/1.1\r\n\r\n" % i], ts=base + i * 0.15)[1]
    record(path, evs)
    sink = sinks()
    output = outputs(TcpOutput, "127.0.0.1", sink.port)
    dispatcher = Dispatcher([output])
    dispatcher.start()
    took = {}
    for speed in (1.0, 2.0):
        start = time.monotonic()
        Replayer(path, dispatcher, speed=speed).run()
        took[speed] = time.monotonic() - start
    assert took[1.0] >= 1.2  # the recorded pace is kept
    assert took[2.0] < 0.8 * took[1.0]
    wait_for(lambda: sum(sink.snapshot()[1]) == 20, 30, what="both replays delivered")
    assert sorted(sink.snapshot()[0]) == sorted([b"GET /%d HTTP/1.1\r\n\r\n" % i for i in range(10)] * 2)


def test_upstream_taking_nothing_is_given_up_counted(sinks, outputs):
    """A connection whose upstream takes nothing for `stall` seconds ends (counted `stalled`),
    and its bytes leave the Backlog: the bound holds however long the upstream sleeps."""
    stalled = sinks(reading=False, rcvbuf=4096)
    output = outputs(TcpOutput, "127.0.0.1", stalled.port, stall=1.0)
    output.start()
    data = os.urandom(4 << 20)
    Dispatcher([output]).dispatch_all(connection([data[i:i + 65536] for i in range(0, len(data), 65536)])[1])
    wait_for(lambda: output.stats()["stalled"] == 1, 30, what="the stalled replay given up")
    assert output.stats()["open"] == 0 and output.backlog.queued_bytes() == 0
    assert output.stats()["queue_full"] == 0
