"""The HTTP/1.x splitter of the mirror, against hand-written messages: the oracle is the bytes
the test wrote (each message's span is where the test put it) and hashlib on the body it wrote."""

import hashlib

from gelf.mirror.http import MAX_HEAD, Mode, Phase, Side, Splitter


def sha(body):
    return hashlib.sha256(body).hexdigest()


def get(target, extra=b""):
    return b"GET " + target + b" HTTP/1.1\r\nHost: prod.example\r\nAccept: */*\r\n" + extra + b"\r\n"


def post(target, body):
    return (b"POST " + target + b" HTTP/1.1\r\nHost: prod.example\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body)


def chunked(target, parts, trailers=b""):
    out = b"POST " + target + b" HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
    for part in parts:
        out += b"%x\r\n" % len(part) + part + b"\r\n"
    return out + b"0\r\n" + trailers + b"\r\n"


def response(status, body=b"", extra=b"", length=True):
    head = b"HTTP/1.1 %d X\r\nServer: t\r\n" % status + extra
    if length:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


def spans(messages):
    """[(message bytes, body)] -> what the splitter should report for each, from where they sit."""
    out, pos = [], 0
    for raw, body in messages:
        out.append((pos, pos + len(raw), len(body), sha(body)))
        pos += len(raw)
    return out


def run(splitter, reads, ts=1.0):
    done, heads = [], []
    for i, data in enumerate(reads):
        for phase, msg in splitter.feed(data, ts + i):
            (heads if phase is Phase.HEAD else done).append(msg)
    return heads, done


def summary(done):
    return [(m.start, m.end, m.body_len, m.body_sha256) for m in done]


def requests(reads):
    return run(Splitter(Side.REQUEST), reads)


def test_keep_alive_gets_one_read_each():
    msgs = [(get(b"/a?x=1"), b""), (get(b"/b"), b""), (get(b"http://h:8/c/d?q"), b"")]
    heads, done = requests([m for m, _ in msgs])
    assert summary(done) == spans(msgs)
    assert [(m.method, m.target, m.path) for m in done] == [
        ("GET", "/a?x=1", "/a"), ("GET", "/b", "/b"), ("GET", "http://h:8/c/d?q", "/c/d")]
    assert (b"Host", b"prod.example") in done[0].headers
    assert [m.index for m in done] == [0, 1, 2] and heads == done
    assert [m.first_ts for m in done] == [1.0, 2.0, 3.0] and [m.last_ts for m in done] == [1.0, 2.0, 3.0]


def test_pipelined_in_one_read_and_bodies():
    body = bytes(range(256)) * 40
    msgs = [(get(b"/1"), b""), (post(b"/up", body), body), (post(b"/empty", b""), b""), (get(b"/2"), b"")]
    _, done = requests([b"".join(m for m, _ in msgs)])
    assert summary(done) == spans(msgs)
    assert [m.method for m in done] == ["GET", "POST", "POST", "GET"]


def test_one_mebibyte_post_in_64k_reads():
    body = hashlib.sha256(b"seed").digest() * (1024 * 1024 // 32)
    stream = post(b"/big", body) + get(b"/after")
    reads = [stream[i:i + 65536] for i in range(0, len(stream), 65536)]
    _, done = requests(reads)
    assert summary(done) == spans([(post(b"/big", body), body), (get(b"/after"), b"")])


def test_chunked_with_trailers():
    parts = [b"hello ", b"\r\n\r\nworld", b"!" * 300]
    raw = chunked(b"/c", parts, trailers=b"X-Checksum: 1\r\nX-More: 2\r\n")
    msgs = [(raw, b"".join(parts)), (get(b"/next"), b"")]
    _, done = requests([raw + get(b"/next")])
    assert summary(done) == spans(msgs)
    assert done[1].target == "/next"


def test_every_split_point_gives_the_same_result():
    msgs = [(get(b"/a"), b""), (chunked(b"/c", [b"ab\r\n\r\ncd", b"e"], b"T: 1\r\n"), b"ab\r\n\r\ncde"),
            (post(b"/p", b"0123456789\r\n\r\n"), b"0123456789\r\n\r\n"), (get(b"/z"), b"")]
    stream = b"".join(m for m, _ in msgs)
    want = spans(msgs)
    for cut in range(len(stream) + 1):
        _, done = requests([stream[:cut], stream[cut:]])
        assert summary(done) == want, cut
    for cut in range(0, len(stream), 7):
        _, done = requests([stream[:cut], stream[cut:cut + 3], stream[cut + 3:]])
        assert summary(done) == want, cut
    _, done = requests([stream[i:i + 1] for i in range(len(stream))])
    assert summary(done) == want


def responses(reads, methods, close=False):
    s = Splitter(Side.RESPONSE, method_of=lambda i: methods[i] if i < len(methods) else None)
    heads, done = run(s, reads)
    if close:
        done += [m for phase, m in s.close(99.0) if phase is Phase.DONE]
    return s, done


def test_responses_head_and_no_body_statuses():
    msgs = [(response(200, b"x" * 10), b"x" * 10),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", b""),  # answers HEAD: no body
            (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
            (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", b""),
            (response(200, b"tail"), b"tail")]
    s, done = responses([b"".join(m for m, _ in msgs)], ["GET", "HEAD", "GET", "GET", "GET"])
    assert summary(done) == spans(msgs)
    assert [(m.index, m.status, m.method) for m in done] == [
        (0, 200, "GET"), (1, 200, "HEAD"), (2, 204, "GET"), (3, 304, "GET"), (4, 200, "GET")]
    assert s.mode is Mode.HTTP


def test_head_response_split_at_every_byte():
    stream = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n" + response(404, b"nope")
    for cut in range(len(stream) + 1):
        _, done = responses([stream[:cut], stream[cut:]], ["HEAD", "GET"])
        assert [(m.status, m.body_len) for m in done] == [(200, 0), (404, 4)], cut


def test_100_continue_belongs_to_the_final_response():
    req = (b"POST /u HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc")
    _, done = requests([req[:-3], req[-3:]])
    assert summary(done) == spans([(req, b"abc")])
    raw = b"HTTP/1.1 100 Continue\r\n\r\n" + response(201, b"made")
    _, done = responses([raw], ["POST"])
    assert [(m.index, m.status, m.start, m.end, m.body_len) for m in done] == [(0, 201, 0, len(raw), 4)]


def test_read_until_close_body():
    raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"all of it, until FIN"
    s, done = responses([raw[:30], raw[30:]], ["GET"], close=True)
    assert summary(done) == spans([(raw, b"all of it, until FIN")])
    assert done[0].last_ts == 99.0


def test_truncated_message_at_close():
    s = Splitter(Side.REQUEST)
    s.feed(post(b"/p", b"0123456789")[:-4], 1.0)
    assert s.close(2.0) == []
    assert (s.mode, s.reason, s.stopped_at) == (Mode.BROKEN, "truncated", 0)


def test_garbage_is_detected_not_raised():
    s = Splitter(Side.REQUEST)
    assert s.feed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200), 1.0) == []
    assert (s.mode, s.stopped_at, s.reason, s.count) == (Mode.BROKEN, 0, "malformed", 0)
    assert s.feed(get(b"/later"), 2.0) == []  # stays stopped; still counts the bytes
    assert s.offset == 211 + len(get(b"/later"))


def test_garbage_after_good_requests_stops_at_their_end():
    first = get(b"/ok")
    s = Splitter(Side.REQUEST)
    _, done = run(s, [first + b"NOT HTTP AT ALL\x00\r\n\r\n"])
    assert summary(done) == spans([(first, b"")])
    assert (s.mode, s.stopped_at) == (Mode.BROKEN, len(first))


def test_oversize_head_is_broken():
    s = Splitter(Side.REQUEST)
    s.feed(b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n", 1.0)
    assert (s.mode, s.reason) == (Mode.BROKEN, "oversize")


def test_upgrade_and_connect_become_tunnels():
    up = get(b"/ws", b"Upgrade: websocket\r\nConnection: Upgrade\r\n")
    s = Splitter(Side.REQUEST)
    _, done = run(s, [up + b"\x81\x05hello" + get(b"/not-parsed")])
    assert summary(done) == spans([(up, b"")])
    assert (s.mode, s.stopped_at, s.reason) == (Mode.TUNNEL, len(up), "upgrade")

    conn = b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n"
    s = Splitter(Side.REQUEST)
    _, done = run(s, [conn[:10], conn[10:] + b"\x00\x00binary"])
    assert [(m.method, m.target, m.end) for m in done] == [("CONNECT", "db:5432", len(conn))]
    assert (s.mode, s.stopped_at) == (Mode.TUNNEL, len(conn))

    ok = b"HTTP/1.1 200 Connection established\r\n\r\n"
    s, done = responses([ok + b"\x00binary"], ["CONNECT"])
    assert [(m.status, m.end) for m in done] == [(200, len(ok))]
    assert (s.mode, s.stopped_at) == (Mode.TUNNEL, len(ok))

    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    s, done = responses([switch + b"\x81\x02hi"], ["GET"])
    assert [(m.status, m.end) for m in done] == [(101, len(switch))]
    assert s.mode is Mode.TUNNEL


def test_response_with_unknown_method_is_read_as_get():
    s, done = responses([response(200, b"abc") + response(500, b"")], [])
    assert [(m.index, m.status, m.method, m.body_len) for m in done] == [(0, 200, None, 3), (1, 500, None, 0)]


def test_mutated_streams_never_raise_and_spans_tile_the_stream():
    import random
    rng = random.Random(5)
    good = {Side.REQUEST: get(b"/a") + post(b"/p", b"x" * 50) + chunked(b"/c", [b"ab", b"cd"], b"T: 1\r\n")
            + get(b"/u", b"Upgrade: x\r\nConnection: upgrade\r\n") + b"\x00\x01",
            Side.RESPONSE: response(200, b"ok") + b"HTTP/1.1 100 Continue\r\n\r\n" + response(204, length=False)
            + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + response(101)}
    for trial in range(600):
        side = rng.choice(list(good))
        data = bytearray(good[side])
        for _ in range(rng.randint(0, 4)):
            i = rng.randrange(len(data))
            data[i:i + rng.randint(0, 1)] = bytes([rng.choice(b"\r\n:0 9aZ-;\x00")])
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(0, 8)))
        s = Splitter(side, lambda i: rng.choice(["GET", "HEAD", "CONNECT", None]))
        done = []
        for a, b in zip([0] + cuts, cuts + [len(data)]):
            done += [m for phase, m in s.feed(bytes(data[a:b]), 1.0) if phase is Phase.DONE]
        done += [m for phase, m in s.close(2.0) if phase is Phase.DONE]
        assert s.offset == len(data)
        ends = [0] + [m.end for m in done]
        assert [m.start for m in done] == ends[:-1] and ends == sorted(ends), trial
        assert ends[-1] <= (len(data) if s.stopped_at is None else s.stopped_at)
