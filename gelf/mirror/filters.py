"""What is mirrored: whole connections sampled (`--sample PCT`) or capped (`--rate N`), and HTTP
requests picked by path and method (`--allow-path`, `--deny-path`, `--method`). docs/mirror.md,
"HTTP, filters and response comparison", has the flags.

Each filter has `feed(event, now) -> [Event]` and `stats()`; `chain(...)` joins them. Pure: the
caller passes `now` (its clock) and the events; nothing here waits, reads a clock or opens a socket.

The HTTP filter cuts whole requests out of the client's stream, as they were sent (spans from
http.Splitter, never re-encoded), and production's answers to them out of the server's stream,
so that what is replayed and what is compared still pair up one to one. A connection's OPEN is
held back until its first byte is kept: a connection with nothing kept reaches no output. Bytes
wait only while a request's head is incomplete (at most http.MAX_HEAD).

Sampling hashes the 4-tuple of the OPEN event (BLAKE2b, not hash(): the same on every instance
and every run), so a capture and a relay that both sample keep the same connections.
"""

import hashlib
import ipaddress
import re
import struct

from gelf.mirror.events import TO_CLIENT, TO_SERVER, Event, Kind
from gelf.mirror.http import Mode, Phase, Side, Splitter

MAX_CONNS = 100_000  # connections a filter remembers; past it the oldest is forgotten (counted)
MAX_DECISIONS = 4096  # per connection: requests decided whose answer has not gone by yet
MAX_HELD = 256 * 1024  # server bytes held for a request not yet decided; past it they are dropped
ADDRESS = struct.Struct("!BxHH")  # docs/mirror.md ADDRESS: family, reserved, client port, server port


def endpoints(data):
    """(client ip, client port, server ip, server port) from an OPEN event's data, or None."""
    if len(data) < ADDRESS.size:
        return None
    family, cport, sport = ADDRESS.unpack_from(data)
    size = {4: 4, 6: 16}.get(family)
    if size is None or len(data) != ADDRESS.size + 2 * size:
        return None
    client = ipaddress.ip_address(bytes(data[6:6 + size]))
    server = ipaddress.ip_address(bytes(data[6 + size:]))
    return (str(client), cport, str(server), sport)


def _remember(table, key, value, stats):
    table[key] = value
    if len(table) > MAX_CONNS:
        del table[next(iter(table))]
        stats["forgotten"] += 1


class _ConnFilter:
    """Keeps or drops whole connections, decided once, at OPEN (or the first event seen)."""

    name = "conn"

    def __init__(self):
        self.kept = {}  # conn -> bool
        self.counts = {"conns": 0, "kept": 0, "dropped": 0, "forgotten": 0}

    def feed(self, event, now):
        keep = self.kept.get(event.conn)
        if keep is None:
            keep = self._decide(event, now)
            self.counts["conns"] += 1
            self.counts["kept" if keep else "dropped"] += 1
            _remember(self.kept, event.conn, keep, self.counts)
        if event.kind == Kind.CLOSE:
            self.kept.pop(event.conn, None)
        return [event] if keep else []

    def stats(self):
        return dict(self.counts)


class Sample(_ConnFilter):
    """`--sample PCT`: keeps PCT % of connections, chosen by a stable hash of the 4-tuple."""

    name = "sample"

    def __init__(self, percent):
        super().__init__()
        self.threshold = int(percent / 100 * 2 ** 64)
        self.counts["no_address"] = 0

    def _decide(self, event, now):
        ends = endpoints(event.data) if event.kind == Kind.OPEN else None
        if ends is None:  # picked up without an OPEN: the id is all there is (stable per capture)
            self.counts["no_address"] += 1
            key = b"conn %d" % event.conn
        else:
            key = ("%s %d %s %d" % ends).encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") < self.threshold


class RateLimit(_ConnFilter):
    """`--rate N`: at most N new connections per second (a token bucket holding one second's
    worth, so a burst of N passes and then N per second), on the caller's clock."""

    name = "rate"

    def __init__(self, per_second):
        super().__init__()
        self.rate = float(per_second)
        self.burst = max(1.0, self.rate)
        self.tokens, self.last = self.burst, None

    def _decide(self, event, now):
        if self.last is not None and now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now if self.last is None else max(self.last, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _Lane:
    """One direction of one connection: bytes held until the message they belong to is decided."""

    __slots__ = ("split", "buf", "base", "cur", "ends")

    def __init__(self, split):
        self.split, self.buf, self.base, self.cur, self.ends = split, bytearray(), 0, 0, {}

    def drain(self, decide):
        """The kept runs of bytes, in order; stops at bytes whose message is not decided yet."""
        out, run, split = [], bytearray(), self.split
        while self.buf:
            end = None
            if split.mode is not Mode.HTTP and self.base >= split.stopped_at:
                # a tunnel follows the request that opened it; bytes past a break are dropped
                keep = split.mode is Mode.TUNNEL and self.cur > 0 and decide(self.cur - 1) is True
                upto = self.base + len(self.buf)
            else:
                keep = decide(self.cur)
                if keep is None:
                    break
                end = self.ends.get(self.cur)
                if end is None and split.mode is not Mode.HTTP:
                    end = split.stopped_at
                upto = self.base + len(self.buf) if end is None else min(end, self.base + len(self.buf))
            n = upto - self.base
            if keep:
                run += self.buf[:n]
            elif run:
                out.append(bytes(run))
                run = bytearray()
            del self.buf[:n]
            self.base = upto
            if end is not None and upto == end:
                self.ends.pop(self.cur, None)
                self.cur += 1
        if run:
            out.append(bytes(run))
        return out


class _Flow:
    __slots__ = ("req", "resp", "decided", "floor", "held_open", "opened")

    def __init__(self):
        self.decided = {}  # request index -> (keep, method)
        self.floor = 0  # decisions below it were forgotten: those answers are dropped
        self.req = _Lane(Splitter(Side.REQUEST))
        self.resp = _Lane(Splitter(Side.RESPONSE, self.method_of))
        self.held_open, self.opened = None, False

    def method_of(self, index):
        entry = self.decided.get(index)
        return entry[1] if entry else None

    def decide(self, index):
        entry = self.decided.get(index)
        if entry is not None:
            return entry[0]
        if index < self.floor or self.req.split.mode is not Mode.HTTP:
            return False  # forgotten, or a request that will never be parsed
        return None


class HttpFilter:
    """`--allow-path REGEX` (any of them must match), `--deny-path REGEX` (none may match),
    `--method GET,POST`: regexes are searched in the request target as sent (path and query).
    Only in a chain when one of them is given: then a stream that is not HTTP is dropped."""

    name = "http"

    def __init__(self, allow=(), deny=(), methods=()):
        self.allow = [re.compile(r) for r in allow]
        self.deny = [re.compile(r) for r in deny]
        self.methods = frozenset(m.upper() for m in methods)
        self.flows = {}
        self.counts = dict.fromkeys(("requests", "kept", "method", "allow", "deny", "not_http", "broken",
                                     "tunnel", "conns", "forgotten", "bytes_dropped"), 0)

    def reject(self, method, target):
        """The reason a request is cut (method, allow, deny), or None when it is kept."""
        if self.methods and method not in self.methods:
            return "method"
        if self.allow and not any(r.search(target) for r in self.allow):
            return "allow"
        if any(r.search(target) for r in self.deny):
            return "deny"
        return None

    def feed(self, event, now):
        flow = self.flows.get(event.conn)
        if flow is None:
            flow = _Flow()
            self.counts["conns"] += 1
            _remember(self.flows, event.conn, flow, self.counts)
        if event.kind == Kind.OPEN:
            flow.held_open = event
            return []
        if event.kind == Kind.CLOSE:
            del self.flows[event.conn]
            return [event] if flow.opened else []
        lane = flow.req if event.direction == TO_SERVER else flow.resp
        mode = lane.split.mode
        items = lane.split.feed(event.data, event.ts)
        lane.buf += event.data
        for phase, msg in items:
            if phase is Phase.DONE:
                lane.ends[msg.index] = msg.end
            elif lane is flow.req:
                self._decide(flow, msg)
        split = lane.split
        if lane is flow.req and mode is Mode.HTTP and split.mode is not Mode.HTTP:
            self.counts["tunnel" if split.mode is Mode.TUNNEL else "not_http" if split.count == 0 else "broken"] += 1
        out = self._drain(event, lane, flow)
        if lane is flow.req and flow.resp.buf:  # answers that waited for this request's head
            out += self._drain(event._replace(direction=TO_CLIENT), flow.resp, flow)
        if out and not flow.opened:
            flow.opened = True
            if flow.held_open is not None:
                out.insert(0, flow.held_open)
        return out

    def _drain(self, event, lane, flow):
        size = len(lane.buf)
        runs = lane.drain(flow.decide)
        if len(lane.buf) > MAX_HELD:
            lane.base += len(lane.buf)
            lane.buf.clear()
        self.counts["bytes_dropped"] += size - len(lane.buf) - sum(map(len, runs))
        return [Event(Kind.DATA, event.conn, event.ts, event.direction, run) for run in runs]

    def _decide(self, flow, msg):
        reason = self.reject(msg.method, msg.target or "")
        self.counts["requests"] += 1
        self.counts[reason or "kept"] += 1
        flow.decided[msg.index] = (reason is None, msg.method)
        answered = flow.resp.cur
        while flow.decided and (next(iter(flow.decided)) < answered or len(flow.decided) > MAX_DECISIONS):
            flow.floor = max(flow.floor, next(iter(flow.decided)) + 1)
            del flow.decided[next(iter(flow.decided))]

    def stats(self):
        return dict(self.counts, open=len(self.flows))


class Chain:
    """Filters in order: each event goes through the first, what comes out through the next."""

    def __init__(self, filters):
        self.filters = list(filters)

    def feed(self, event, now):
        events = [event]
        for f in self.filters:
            events = [out for e in events for out in f.feed(e, now)]
            if not events:
                break
        return events

    def stats(self):
        return {f.name: f.stats() for f in self.filters}


def chain(*filters):
    return Chain(filters)
