"""Response comparison: is each upstream answering what production answered? (issue 9; the
fields and the callback contract are in docs/mirror.md, "HTTP, filters and response comparison").

Production's side comes from capture: the client's requests (TO_SERVER) and production's
responses (TO_CLIENT) of each connection, fed with `feed(event)` *after* the filter chain, so
that the stream compared is the stream replayed. An upstream's side comes from the output that
replayed the connection: `on_sent` as it writes the request bytes, `on_response` as the answer
arrives. The k-th response of production and the k-th of an upstream on the same connection
answer the same request; they are compared on status, body SHA-256 and the headers left after
the ignored ones (volatile by nature, like Date, or framing the body compare already covers).

Everything a peer can grow is bounded: connections (least recently used first out), per
connection the requests and responses waiting for their counterpart (`max_pending`), latency
samples (a reservoir per side) and the table of mismatching method+path pairs (`top_size`
entries, space-saving counts when it is full). Pure: the caller passes every time.

Cost, measured here: about 50 us per keep-alive GET with an HTTP filter, production and one
upstream (each exchange is parsed five times: filter and comparer, each direction, plus the
upstream's answer; the splitter alone is about 3 us per request). Filter and comparer parse on
their own so that either works without the other.
"""

import collections
import random

from gelf.mirror.events import TO_SERVER, Kind
from gelf.mirror.http import Mode, Phase, Side, Splitter
from gelf.mirror.compare_view import CompareCollector, progress_line, report  # noqa: F401 (the API)

DEFAULT_IGNORE = ("date", "server", "set-cookie", "etag", "last-modified", "age", "expires")
FRAMING = ("connection", "keep-alive", "transfer-encoding", "content-length")  # always ignored
PRODUCTION = "production"


class Reservoir:
    """A uniform sample of at most `size` values (Algorithm R), for percentiles in bounded memory;
    exact while fewer than `size` values were added. Seeded, so runs repeat."""

    def __init__(self, size=4096, seed=0):
        self.size, self.count, self.samples = size, 0, []
        self._rng = random.Random(seed)

    def add(self, value):
        self.count += 1
        if len(self.samples) < self.size:
            self.samples.append(value)
        else:
            j = self._rng.randrange(self.count)
            if j < self.size:
                self.samples[j] = value

    def percentile(self, q):
        """Nearest-rank percentile (q in 0..100) of the sample, None when empty."""
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        rank = max(1, -(-len(ordered) * q // 100))  # ceil
        return ordered[int(rank) - 1]

    def summary(self):
        return {"p50": self.percentile(50), "p99": self.percentile(99), "n": self.count}


class TopTable:
    """Counts per key in at most `size` entries: exact while there are fewer distinct keys; when
    full, a new key takes the smallest entry's place and count + 1 (space-saving), so a frequent
    key is never lost."""

    def __init__(self, size=256):
        self.size, self.counts = size, {}

    def add(self, key):
        counts = self.counts
        if key in counts:
            counts[key] += 1
        elif len(counts) < self.size:
            counts[key] = 1
        else:
            smallest = min(counts, key=counts.get)
            counts[key] = counts.pop(smallest) + 1

    def top(self, n):
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


class _Side:
    """One upstream's view of one connection."""
    __slots__ = ("up", "split", "pending", "written", "sent_ts", "next_unsent", "stopped")

    def __init__(self, up, method_of):
        self.up = up  # the upstream's totals
        self.stopped = False  # its answers stopped being HTTP (counted once)
        self.split = Splitter(Side.RESPONSE, method_of)
        self.pending = {}  # index -> response record waiting for production's
        self.written = 0  # request bytes the output wrote
        self.sent_ts = {}  # index -> when the request's last byte was written
        self.next_unsent = 0


class _Conn:
    __slots__ = ("requests", "req_split", "prod_split", "prod", "ups", "closed_at", "last", "stopped")

    def __init__(self, now):
        method_of = self.method_of
        self.requests = {}  # index -> (method, path, end offset, ts of its last byte)
        self.req_split = Splitter(Side.REQUEST)
        self.prod_split = Splitter(Side.RESPONSE, method_of)
        self.prod = {}  # index -> production's response record
        self.ups = {}  # upstream name -> _Side
        self.closed_at, self.last, self.stopped = None, now, False

    def method_of(self, index):
        request = self.requests.get(index)
        return request[0] if request else None


class _Upstream:
    """Totals for one upstream."""

    def __init__(self, top_size, reservoir):
        self.counts = dict.fromkeys(("requests", "responses", "paired", "unpaired", "status_match",
                                     "body_match", "headers_match", "broken"), 0)
        self.latency = Reservoir(reservoir, seed=1)
        self.mismatches = TopTable(top_size)


def _put(table, key, value, cap):
    """Insert into a dict kept at most `cap` long, oldest out; returns what went out, or None."""
    table[key] = value
    if len(table) > cap:
        return table.pop(next(iter(table)))
    return None


class Comparer:
    def __init__(self, ignore_headers=None, max_conns=10_000, max_pending=64, top_size=256,
                 reservoir=4096, linger=30.0, idle=300.0):
        names = DEFAULT_IGNORE if ignore_headers is None else ignore_headers
        self.ignore = frozenset(n.lower().encode("latin-1") for n in tuple(names) + FRAMING)
        self.ignore_names = sorted(n.lower() for n in names)
        self.max_conns, self.max_pending, self.top_size = max_conns, max_pending, top_size
        self.linger, self.idle, self.reservoir = linger, idle, reservoir
        self.conns = collections.OrderedDict()
        self.upstreams = {}
        self.latency = Reservoir(reservoir, seed=0)
        self.counts = dict.fromkeys(("requests", "responses", "not_http", "broken", "tunnel",
                                     "evicted", "unknown_conn", "unpaired"), 0)

    # ------------------------------------------------------------ production (capture)

    def feed(self, event):
        """A capture event, after filtering (both directions)."""
        c = self._conn(event.conn, event.ts, create=True)
        if event.kind == Kind.DATA:
            if event.direction == TO_SERVER:
                self._requests(c, c.req_split.feed(event.data, event.ts))
                if c.req_split.mode is not Mode.HTTP and not c.stopped:
                    c.stopped = True
                    split = c.req_split
                    kind = "tunnel" if split.mode is Mode.TUNNEL else "not_http" if split.count == 0 else "broken"
                    self.counts[kind] += 1
            else:
                self._production(c, c.prod_split.feed(event.data, event.ts))
        elif event.kind == Kind.CLOSE:
            c.closed_at = event.ts
            self._production(c, c.prod_split.close(event.ts))

    def _requests(self, c, items):
        for phase, msg in items:
            if phase is Phase.DONE:
                self.counts["requests"] += 1
                _put(c.requests, msg.index, (msg.method, msg.path, msg.end, msg.last_ts), self.max_pending)
        for side in c.ups.values():  # written before we knew it (feed() came late): no send time
            self._stamp(c, side, None)

    def _production(self, c, items):
        for phase, msg in items:
            if phase is not Phase.DONE:
                continue
            self.counts["responses"] += 1
            request = c.requests.get(msg.index)
            if request is not None and request[3] is not None and msg.first_ts is not None:
                self.latency.add(msg.first_ts - request[3])
            method, path = (request[0], request[1]) if request else (msg.method or "?", "?")
            record = [msg.status, msg.body_sha256, self._headers(msg), method, path, 0]  # 0: times paired
            old = _put(c.prod, msg.index, record, self.max_pending)
            self.counts["unpaired"] += old is not None and old[5] == 0
            for name, side in c.ups.items():
                theirs = side.pending.pop(msg.index, None)
                if theirs is not None:
                    self._pair(name, record, theirs)

    def _headers(self, msg):
        """A digest of the headers compared: hash() is enough, both sides live in this process."""
        ignore = self.ignore
        return hash(tuple(sorted((n.lower(), v.strip()) for n, v in msg.headers if n.lower() not in ignore)))

    # ------------------------------------------------------------ upstreams (outputs)

    def on_sent(self, upstream, conn, nbytes, ts):
        """The output wrote `nbytes` more of the connection's client stream to `upstream` at `ts`."""
        c = self._conn(conn, ts)
        if c is not None:
            side = self._side(c, upstream)
            side.written += nbytes
            self._stamp(c, side, ts)

    def on_response(self, upstream, conn, data, ts):
        """`data` arrived from `upstream` on the replay of `conn` at `ts`; b"" means it closed."""
        c = self._conn(conn, ts)
        if c is None:
            return
        side = self._side(c, upstream)
        items = side.split.feed(data, ts) if data else side.split.close(ts)
        up = side.up
        for phase, msg in items:
            if phase is not Phase.DONE:
                continue
            up.counts["responses"] += 1
            sent = side.sent_ts.pop(msg.index, None)
            latency = None if sent is None or msg.first_ts is None else msg.first_ts - sent
            record = (msg.status, msg.body_sha256, self._headers(msg), latency)
            ours = c.prod.get(msg.index)
            if ours is not None:
                self._pair(upstream, ours, record)
            else:
                up.counts["unpaired"] += _put(side.pending, msg.index, record, self.max_pending) is not None
        if side.split.mode is Mode.BROKEN and not side.stopped:
            side.stopped = True
            up.counts["broken"] += 1

    def _stamp(self, c, side, ts):
        """Requests whose last byte the output has now written get `ts` as their send time."""
        if not c.requests:
            return
        k = max(side.next_unsent, next(iter(c.requests)))
        while k in c.requests and c.requests[k][2] <= side.written:
            if ts is not None:
                _put(side.sent_ts, k, ts, self.max_pending)
            side.up.counts["requests"] += 1
            k += 1
        side.next_unsent = k

    def _pair(self, upstream, ours, theirs):
        up = self.upstreams[upstream]
        counts = up.counts
        counts["paired"] += 1
        ours[5] += 1
        status, body = ours[0] == theirs[0], ours[1] == theirs[1]
        counts["status_match"] += status
        counts["body_match"] += body
        counts["headers_match"] += ours[2] == theirs[2]
        if theirs[3] is not None:
            up.latency.add(theirs[3])
        if not (status and body):
            up.mismatches.add((ours[3], ours[4]))

    # ------------------------------------------------------------ reading it

    def snapshot(self, top=10):
        """The /stats JSON: totals, then per upstream counts, match rates (None before any pair),
        latency percentiles in seconds and the `top` mismatching method+path pairs."""
        upstreams = {}
        for name, up in sorted(self.upstreams.items()):
            row = dict(up.counts)
            paired = row["paired"]
            for part in ("status", "body", "headers"):
                row[part + "_match_rate"] = row[part + "_match"] / paired if paired else None
            row["latency"] = up.latency.summary()
            row["top_mismatches"] = [{"method": m, "path": p, "count": n} for (m, p), n in up.mismatches.top(top)]
            upstreams[name] = row
        held = sum(len(c.requests) + len(c.prod) + sum(len(s.pending) + len(s.sent_ts) for s in c.ups.values())
                   for c in self.conns.values())
        return dict(self.counts, conns=len(self.conns), held=held, latency=self.latency.summary(),
                    ignore_headers=self.ignore_names, upstreams=upstreams)

    # ------------------------------------------------------------ connections

    def _conn(self, conn, now, create=False):
        c = self.conns.get(conn)
        if c is None:
            if not create:
                self.counts["unknown_conn"] += 1
                return None
            c = self.conns[conn] = _Conn(now)
            if len(self.conns) > self.max_conns:
                self._drop(self.conns.popitem(last=False)[1], "evicted")
        else:
            self.conns.move_to_end(conn)
        c.last = now
        return c

    def _side(self, c, upstream):
        side = c.ups.get(upstream)
        if side is None:
            up = self.upstreams.get(upstream)
            if up is None:
                up = self.upstreams[upstream] = _Upstream(self.top_size, self.reservoir)
            side = c.ups[upstream] = _Side(up, c.method_of)
        return side

    def expire(self, now):
        """Forget connections closed `linger` seconds ago (late upstream answers had their
        chance) or silent for `idle`; call it now and then with the caller's clock."""
        old = [k for k, c in self.conns.items()
               if (c.closed_at is not None and now - c.closed_at >= self.linger) or now - c.last >= self.idle]
        for k in old:
            self._drop(self.conns.pop(k), None)

    def _drop(self, c, reason):
        if reason:
            self.counts[reason] += 1
        self.counts["unpaired"] += sum(1 for record in c.prod.values() if record[5] == 0)
        for side in c.ups.values():
            side.up.counts["unpaired"] += len(side.pending)
