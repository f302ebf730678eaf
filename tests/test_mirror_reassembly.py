"""gelf.mirror.reassembly: Segments in, Events out, no sockets and no clock.

The oracle is the original bytes: whatever order, duplication and overlap the segments arrive
in, the DATA of each connection joined must equal what the client sent, exactly once.
"""

import random
import socket
import struct

import pytest
from hypothesis import given, settings, strategies as st

from gelf.mirror.events import TO_CLIENT, TO_SERVER, Event, Kind
from gelf.mirror.packets import Flag, Segment
from gelf.mirror.reassembly import Reassembler

SYN, ACK, FIN, RST, PSH = Flag.SYN, Flag.ACK, Flag.FIN, Flag.RST, Flag.PSH
SERVER = ("10.0.0.2", 80)
CLIENT = ("10.0.0.1", 40000)
M = 1 << 32


def up(seq, flags=ACK, data=b"", client=CLIENT, server=SERVER, ts=1.0):
    return Segment(ts, client, server, seq % M, 0, int(flags), data)


def down(seq, flags=ACK, data=b"", client=CLIENT, server=SERVER, ts=1.0):
    return Segment(ts, server, client, seq % M, 0, int(flags), data)


def run(r, segments, now=100.0):
    out = []
    for s in segments:
        out += r.feed(s, now)
    return out


def stream(events, conn=None, direction=TO_SERVER):
    return b"".join(e.data for e in events if e.kind == Kind.DATA and e.direction == direction
                    and (conn is None or e.conn == conn))


def kinds(events):
    return [(Kind(e.kind).name, e.data if e.kind == Kind.CLOSE else None) for e in events]


def address_v4(client, server):
    """ADDRESS as docs/mirror.md writes it: family, reserved, client port, server port, addresses."""
    return (bytes([4, 0]) + struct.pack("!HH", client[1], server[1])
            + socket.inet_aton(client[0]) + socket.inet_aton(server[0]))


def test_handshake_data_fin():
    r = Reassembler([80])
    ev = run(r, [up(999, SYN), down(5000, SYN | ACK), up(1000, ACK), up(1000, ACK | PSH, b"hello "),
                 up(1006, ACK | PSH, b"world"), up(1011, FIN | ACK)])
    assert ev[0] == Event(Kind.OPEN, 1, 1.0, TO_SERVER, address_v4(CLIENT, SERVER))
    assert kinds(ev) == [("OPEN", None), ("DATA", None), ("DATA", None), ("CLOSE", b"fin")]
    assert stream(ev) == b"hello world"
    s = r.stats()
    assert s["open"] == 0 and s["closed"]["fin"] == 1 and s["bytes_to_server"] == 11


def test_ipv6_address_in_open():
    c, srv = ("fd00::1", 5555), ("fd00::2", 80)
    ev = run(Reassembler([80]), [up(1, SYN, client=c, server=srv)])
    want = (bytes([6, 0]) + struct.pack("!HH", 5555, 80) + socket.inet_pton(socket.AF_INET6, "fd00::1")
            + socket.inet_pton(socket.AF_INET6, "fd00::2"))
    assert ev[0].data == want


def test_out_of_order_and_retransmission():
    r = Reassembler([80])
    ev = run(r, [up(0, SYN), up(7, ACK, b"world"), up(1, ACK, b"hello "), up(1, ACK, b"hello "),
                 up(7, ACK, b"world"), up(12, FIN | ACK)])
    assert stream(ev) == b"hello world" and kinds(ev)[-1] == ("CLOSE", b"fin")
    s = r.stats()
    assert s["out_of_order"] == 1 and s["retransmitted"] == 2 and s["waiting_bytes"] == 0


def test_overlap_first_arrived_bytes_win():
    r = Reassembler([80])
    ev = run(r, [up(0, SYN), up(6, ACK, b"AAAAA"), up(4, ACK, b"bbbbbbbbbb"), up(1, ACK, b"ccccccc")])
    # offsets 5..9 from A (first there), 3..4 and 10..12 from b (before c), only 0..2 from c
    assert stream(ev) == b"ccc" + b"bb" + b"AAAAA" + b"bbb"
    ev = run(r, [up(1, ACK, b"x" * 20)])
    assert stream(ev) == b"x" * 7  # only what nothing covered yet


def test_sequence_wrap():
    isn = M - 3
    r = Reassembler([80])
    ev = run(r, [up(isn, SYN), up(isn + 1 + 4, ACK, b"efgh"), up(isn + 1, ACK, b"abcd"),
                 up(isn + 9, FIN | ACK)])
    assert stream(ev) == b"abcdefgh" and kinds(ev)[-1] == ("CLOSE", b"fin")


def test_picked_up_mid_stream_direction_by_port():
    r = Reassembler([80], responses=True)
    ev = run(r, [down(7000, ACK, b"HTTP/1.1 200"), up(123456, ACK), up(123456, ACK, b"GET /")])
    assert kinds(ev)[:1] == [("OPEN", None)]
    assert ev[0].data == address_v4(CLIENT, SERVER)  # the client is the side without the port
    assert stream(ev) == b"GET /" and stream(ev, direction=TO_CLIENT) == b"HTTP/1.1 200"
    bare = Reassembler([80])
    assert run(bare, [up(5, ACK), up(5, FIN | ACK), up(5, RST)]) == []  # nothing to open a connection
    assert bare.stats()["ignored"] == 3


def test_fin_needs_every_followed_direction():
    r = Reassembler([80], responses=True)
    ev = run(r, [up(0, SYN), down(100, SYN | ACK), up(1, ACK, b"req"), up(4, FIN | ACK),
                 down(101, ACK, b"resp")])
    assert ("CLOSE", b"fin") not in kinds(ev)
    ev = run(r, [down(105, FIN | ACK)])
    assert kinds(ev) == [("CLOSE", b"fin")]


def test_rst_closes_at_once():
    r = Reassembler([80])
    ev = run(r, [up(0, SYN), up(1, ACK, b"abc"), up(10, ACK, b"zzz"), down(0, RST | ACK)])
    assert kinds(ev)[-1] == ("CLOSE", b"rst") and stream(ev) == b"abc"
    assert r.stats()["waiting_bytes"] == 0


def test_duplicates_after_close_are_not_a_new_connection():
    r = Reassembler([80])
    run(r, [up(0, SYN), up(1, ACK, b"abc"), up(4, FIN | ACK)])
    assert run(r, [up(1, ACK, b"abc"), up(0, SYN), up(4, FIN | ACK)]) == []  # an old SYN too
    ev = run(r, [up(5000, SYN), up(5001, ACK, b"new")])  # a new SYN: a new connection
    assert kinds(ev)[0] == ("OPEN", None) and ev[0].conn == 2 and stream(ev) == b"new"


def test_hole_timeout_then_ignored_until_a_new_syn():
    r = Reassembler([80], hole_timeout=2.0)
    ev = run(r, [up(0, SYN), up(1, ACK, b"ab"), up(10, ACK, b"late")], now=10.0)
    assert stream(ev) == b"ab"
    assert r.expire(11.9) == []
    ev = r.expire(12.0)
    assert kinds(ev) == [("CLOSE", b"hole")] and r.stats()["holes"] == 1
    assert run(r, [up(3, ACK, b"cdefghi"), up(14, ACK, b"more")], now=12.5) == []
    assert kinds(run(r, [up(777, SYN)], now=13.0)) == [("OPEN", None)]


def test_hole_bytes_bound():
    r = Reassembler([80], hole_bytes=100, stream_bytes=1000)
    ev = run(r, [up(0, SYN), up(50, ACK, b"x" * 60), up(200, ACK, b"y" * 40)])
    assert kinds(ev)[-1] == ("CLOSE", b"hole")


def test_total_memory_closes_the_largest():
    r = Reassembler([80], total_bytes=1000, hole_bytes=10_000, stream_bytes=10_000)
    a, b = ("10.0.0.1", 1), ("10.0.0.1", 2)
    ev = run(r, [up(0, SYN, client=a), up(0, SYN, client=b), up(10, ACK, b"s" * 300, client=a),
                 up(10, ACK, b"L" * 600, client=b), up(1000, ACK, b"L" * 200, client=b)])
    assert kinds(ev)[-1] == ("CLOSE", b"memory") and ev[-1].conn == 2
    s = r.stats()
    assert s["memory_closes"] == 1 and s["waiting_bytes"] == 300 and s["open"] == 1


def test_stream_count_bound_and_idle_expiry():
    r = Reassembler([80], max_streams=2, idle_timeout=60)
    ev = []
    for port in (1, 2, 3):
        ev += r.feed(up(0, SYN, client=("10.0.0.1", port)), now=float(port))
    assert ("CLOSE", b"memory") in kinds(ev) and r.stats()["open"] == 2
    assert r.expire(62.5) == [Event(Kind.CLOSE, 2, 62.5, TO_SERVER, b"idle")]
    assert kinds(r.shutdown(63.0)) == [("CLOSE", b"shutdown")]


def test_foreign_ports_ignored():
    r = Reassembler([80])
    assert r.feed(Segment(0, ("1.1.1.1", 5), ("2.2.2.2", 6), 0, 0, int(SYN), b""), 0) == []
    assert r.stats()["foreign"] == 1


# ---------------------------------------------------------------- property: the original, exactly

def _segments(data, isn, rng, client):
    """A connection's client side as a network might deliver it: cut, shuffled, duplicated,
    re-cut for retransmission (overlapping the first cut), the FIN anywhere after the SYN."""
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 30)))) if len(data) > 1 else []
    bounds = [0] + cuts + [len(data)]
    segs = [up(isn + 1 + s, ACK, data[s:e], client=client) for s, e in zip(bounds, bounds[1:]) if e > s]
    for _ in range(rng.randint(0, 6)):  # retransmissions with other boundaries, overlapping
        if data:
            s = rng.randrange(len(data))
            e = rng.randint(s + 1, min(len(data), s + 200))
            segs.append(up(isn + 1 + s, ACK, data[s:e], client=client))
    segs += [rng.choice(segs) for _ in range(rng.randint(0, 3)) if segs]  # duplicates
    segs.append(up(isn + 1 + len(data), FIN | ACK, client=client))
    rng.shuffle(segs)
    return [up(isn, SYN, client=client)] + segs + [up(isn, SYN, client=client)] * rng.randint(0, 1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=3000), min_size=1, max_size=4),
       st.integers(0, 5000), st.randoms(use_true_random=False))
def test_any_delivery_order_gives_the_original(payloads, isn_back, rng):
    per_conn = []
    for i, data in enumerate(payloads):
        isn = (M - 1 - isn_back - 7 * i) % M  # near the wrap: many streams cross 2**32
        per_conn.append(_segments(data, isn, rng, ("10.0.0.1", 40000 + i)))
    merged = []
    while any(per_conn):  # interleave the connections, each keeping its own (shuffled) order
        merged.append(rng.choice([c for c in per_conn if c]).pop(0))
    r = Reassembler([80])
    events = run(r, merged)
    opened = {e.conn: struct.unpack("!H", e.data[2:4])[0] - 40000 for e in events if e.kind == Kind.OPEN}
    assert sorted(opened.values()) == list(range(len(payloads)))  # each once, none twice
    for conn, i in opened.items():
        assert stream(events, conn) == payloads[i]
        closes = [e.data for e in events if e.conn == conn and e.kind == Kind.CLOSE]
        assert closes == [b"fin"]
    assert r.stats()["waiting_bytes"] == 0 and r.stats()["open"] == 0


@pytest.mark.parametrize("seed", range(20))
def test_picked_up_mid_stream_then_shuffled(seed):
    rng = random.Random(seed)
    data = rng.randbytes(rng.randint(1, 5000))
    isn = M - rng.randint(1, 3000)
    segs = [s for s in _segments(data, isn, rng, CLIENT) if not s.flags & SYN]
    first = min((s for s in segs if s.payload and s.seq == (isn + 1) % M), key=lambda s: -len(s.payload))
    r = Reassembler([80])
    ev = run(r, [first] + segs)
    assert stream(ev) == data and kinds(ev)[-1] == ("CLOSE", b"fin")


def test_a_hole_just_before_the_fin_times_out():
    r = Reassembler([80], hole_timeout=2.0)
    run(r, [up(0, SYN), up(1, ACK, b"ab"), up(8, FIN | ACK)], now=10.0)  # bytes 3..7 never seen
    assert kinds(r.expire(12.0)) == [("CLOSE", b"hole")]


def test_hole_timer_restarts_when_the_stream_moves():
    r = Reassembler([80], hole_timeout=2.0)
    run(r, [up(0, SYN), up(3, ACK, b"cd"), up(9, ACK, b"zz")], now=10.0)  # two holes: 1..2, 5..8
    run(r, [up(1, ACK, b"ab")], now=11.5)  # the first fills: progress
    assert r.expire(13.0) == []
    assert kinds(r.expire(13.5)) == [("CLOSE", b"hole")]


def test_a_lost_last_segment_shows_in_the_servers_ack():
    r = Reassembler([80], responses=True, hole_timeout=2.0)
    run(r, [up(0, SYN), down(500, SYN | ACK, b""), up(1, ACK, b"GET /a"), down(501, ACK, b"200", ts=1.0)],
        now=10.0)
    run(r, [down(504, ACK)._replace(ack=7 + 6)], now=10.5)  # acks 6 bytes the capture never saw
    assert r.expire(12.0) == []
    assert kinds(r.expire(12.5)) == [("CLOSE", b"hole")]


def test_acks_of_what_was_seen_and_of_the_fin_are_no_hole():
    r = Reassembler([80], responses=True, hole_timeout=2.0)
    ev = run(r, [up(0, SYN), down(500, SYN | ACK)._replace(ack=1), up(1, ACK, b"req")._replace(ack=501),
                 down(501, ACK, b"resp")._replace(ack=4), up(4, FIN | ACK)._replace(ack=505),
                 down(505, ACK)._replace(ack=5)], now=10.0)
    assert r.expire(30.0) == [] and ("CLOSE", b"fin") not in kinds(ev)
    assert kinds(run(r, [down(505, FIN | ACK)._replace(ack=5)], now=31.0)) == [("CLOSE", b"fin")]


def test_stream_bytes_bound_closes_with_memory():
    r = Reassembler([80], hole_bytes=10_000, stream_bytes=100)
    ev = run(r, [up(0, SYN), up(50, ACK, b"x" * 60), up(200, ACK, b"y" * 60)])
    assert kinds(ev)[-1] == ("CLOSE", b"memory") and r.stats()["waiting_bytes"] == 0


def test_tombstones_are_bounded_and_expire():
    r = Reassembler([80], max_tombstones=3, tombstone_timeout=60)
    for port in range(10):
        run(r, [up(0, SYN, client=("10.0.0.1", port)), up(1, FIN | ACK, client=("10.0.0.1", port))], now=1.0)
    assert r.stats()["tombstones"] == 3
    r.expire(61.0)
    assert r.stats()["tombstones"] == 0
    # with its tombstone gone, a late duplicate is taken for a connection picked up mid-stream
    assert kinds(run(r, [up(1, ACK, b"late", client=("10.0.0.1", 9))], now=62.0)) == [("OPEN", None), ("DATA", None)]
