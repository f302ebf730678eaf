"""TCP reassembly: captured segments in, ordered stream events out (docs/mirror.md).

No I/O and no clock: `feed(segment, now)` and `expire(now)` return lists of Events, and every
timer runs on the `now` the caller passes. The rules, in the order they apply:

- Direction comes from the server ports (the capture's port), not from who sent the SYN, so a
  connection already open when capture started is picked up at the first segment seen that
  carries data (or a SYN). A bare ACK, FIN or RST of an unknown connection opens nothing.
- Sequence numbers become 64-bit stream offsets (stream.py: Stream.offset), so the wrap at
  2**32 is invisible here.
- In order bytes go out at once as DATA. Bytes before the next expected one are
  retransmissions (dropped, counted). Bytes past a hole wait in the Stream. Overlaps: the bytes
  that arrived FIRST win, everywhere (a later segment only fills what nothing covered yet).
  Retransmitted TCP bytes are the same bytes, so the choice matters only against a forger, and
  one rule is easier to test than the kernel's mix (it lets a segment that covers older ones
  replace them).
- FIN: the direction ends at the FIN's offset; bytes past it are dropped. The connection ends
  with CLOSE `fin` when every followed direction has delivered up to its FIN (only the client's,
  unless `responses`). RST ends it at once with `rst`; bytes waiting behind a hole are dropped.
- Hole policy: a hole that has not filled after `hole_timeout` seconds, or with `hole_bytes`
  waiting past it, ends the connection with CLOSE `hole`. A hole is bytes missing before
  bytes that arrived, before the FIN, or (with `responses`, which shows the peer's ACKs)
  before what the peer acknowledged: the only way to see a lost last segment. A hole in the server-to-client
  direction does the same: the capture runs on the server, which sent those bytes, so only a
  ring overflow makes one, and a half-compared connection would mislead the report.
- Bounds: `stream_bytes` waiting in one direction, `total_bytes` in all (the largest connection
  is closed), `max_streams` connections (the least recently active is closed): CLOSE `memory`.
  No segment for `idle_timeout`: CLOSE `idle`. `shutdown(now)`: CLOSE `shutdown` for all.
- After any CLOSE, the 4-tuple is remembered (a tombstone) and its segments are ignored until a
  new client SYN with a different sequence number (a duplicated old SYN is not a new
  connection), or until the tuple has been quiet for `tombstone_timeout`. Without it, a
  duplicate arriving after the FIN would be picked up as a new connection and replayed twice.
"""

import itertools
from collections import OrderedDict

from gelf.mirror.events import REASONS, TO_CLIENT, TO_SERVER, Event, Kind, address
from gelf.mirror.packets import Flag
from gelf.mirror.stream import SEQ_MASK, Stream

HOLE_TIMEOUT = 2.0
HOLE_BYTES = 1 << 20
STREAM_BYTES = 1 << 20
TOTAL_BYTES = 64 << 20
IDLE_TIMEOUT = 60.0
TOMBSTONE_TIMEOUT = 60.0
MAX_STREAMS = 100_000
MAX_TOMBSTONES = 100_000

CLOSE_REASONS = REASONS

_FIN, _SYN, _RST, _ACK = int(Flag.FIN), int(Flag.SYN), int(Flag.RST), int(Flag.ACK)


class _Conn:
    __slots__ = ("id", "key", "streams", "last", "isn")

    def __init__(self, cid, key, now):
        self.id, self.key, self.last = cid, key, now
        self.streams = [None, None]
        self.isn = None  # the client SYN's sequence number, when seen

    def size(self):
        return sum(s.size for s in self.streams if s is not None)


class Reassembler:
    def __init__(self, server_ports, responses=False, hole_timeout=HOLE_TIMEOUT, hole_bytes=HOLE_BYTES,
                 stream_bytes=STREAM_BYTES, total_bytes=TOTAL_BYTES, idle_timeout=IDLE_TIMEOUT,
                 max_streams=MAX_STREAMS, tombstone_timeout=TOMBSTONE_TIMEOUT, max_tombstones=MAX_TOMBSTONES):
        self.ports = frozenset(server_ports)
        self.responses = responses
        self.hole_timeout, self.hole_bytes = hole_timeout, hole_bytes
        self.stream_bytes, self.total_bytes = stream_bytes, total_bytes
        self.idle_timeout, self.max_streams = idle_timeout, max_streams
        self.tombstone_timeout, self.max_tombstones = tombstone_timeout, max_tombstones
        self._conns = OrderedDict()  # (client, server) -> _Conn, least recently active first
        self._gaps = {}  # key -> _Conn with bytes waiting behind a hole (the hole timers)
        self._tombs = OrderedDict()  # key -> (last segment, client ISN), least recently seen first
        self._waiting = 0  # bytes behind holes, all connections
        self._ids = itertools.count(1)
        self._n = dict.fromkeys(("opened", "segments", "foreign", "ignored", "out_of_order",
                                 "retransmitted", "bytes_to_server", "bytes_to_client"), 0)
        self._closed = dict.fromkeys(CLOSE_REASONS, 0)

    def feed(self, seg, now):
        """Events caused by one segment (the capture's hot path: keep it a straight line)."""
        n = self._n
        n["segments"] += 1
        if seg.dst[1] in self.ports:
            d, key = TO_SERVER, (seg.src, seg.dst)
        elif seg.src[1] in self.ports:
            d, key = TO_CLIENT, (seg.dst, seg.src)
        else:
            n["foreign"] += 1
            return []
        flags, out = seg.flags, []
        new_syn = d == TO_SERVER and flags & (_SYN | _ACK | _RST) == _SYN
        conn = self._conns.get(key)
        if conn is None:
            tomb = self._tombs.get(key)
            if tomb is not None and (not new_syn or seg.seq == tomb[1]):
                self._tombs[key] = (now, tomb[1])
                self._tombs.move_to_end(key)
                n["ignored"] += 1
                return out
            if flags & _RST or not (flags & _SYN or seg.payload) or (d == TO_CLIENT and not self.responses):
                n["ignored"] += 1
                return out
            self._tombs.pop(key, None)
            conn = self._open(key, seg, now, out)
        elif new_syn and conn.streams[0] is not None and (seg.seq + 1) & SEQ_MASK != conn.streams[0].base:
            # a SYN that does not start the stream we follow: the tuple was reused, we missed the end
            self._close(conn, "rst", seg.ts, now, out)
            self._tombs.pop(key, None)
            conn = self._open(key, seg, now, out)
        else:
            self._conns.move_to_end(key)
            conn.last = now
        if new_syn:
            conn.isn = seg.seq
        if flags & _RST:
            self._close(conn, "rst", seg.ts, now, out)
            return out
        if d == TO_CLIENT and not self.responses:
            return out
        st = conn.streams[d]
        if st is None:
            st = conn.streams[d] = Stream((seg.seq + 1 if flags & _SYN else seg.seq) & SEQ_MASK)
        data = seg.payload
        a = st.offset(seg.seq) + (1 if flags & _SYN else 0)
        end = a + len(data)
        if flags & _FIN and st.fin is None and end >= st.next:
            st.fin = end
            st.known = max(st.known, end)
        if st.fin is not None and end > st.fin:
            data, end = data[:max(0, st.fin - a)], max(a, st.fin)
        before = st.next
        if data:
            if end <= st.next:
                n["retransmitted"] += 1
            elif a <= st.next and not st.starts:  # in order, nothing waiting: the common case
                chunks = [data[st.next - a:] if a < st.next else data]
                st.next = end
                self._deliver(conn, st, d, chunks, seg.ts, out)
            else:
                if a < st.next:
                    data, a = data[st.next - a:], st.next
                if a > st.next:
                    n["out_of_order"] += 1
                added = st.insert(a, data)
                self._waiting += added
                if not added:
                    n["retransmitted"] += 1
                chunks = []
                self._waiting -= st.drain(chunks)
                if chunks:
                    self._deliver(conn, st, d, chunks, seg.ts, out)
        if st.done() and all(s is not None and s.done() for s in self._followed(conn)):
            self._close(conn, "fin", seg.ts, now, out)
            return out
        self._track(conn, st, before, seg.ts, now, out)
        other = conn.streams[1 - d]
        if flags & _ACK and other is not None and key in self._conns:
            # The peer acknowledged bytes we may never have seen (the capture lost the last
            # segment before a pause): a hole at the end, which no later segment would reveal.
            acked = other.offset(seg.ack)
            if other.fin is not None:
                acked = min(acked, other.fin)  # the FIN's own sequence number is no byte
            if acked > other.known:
                other.known = acked
                self._track(conn, other, other.next, seg.ts, now, out)
        return out

    def expire(self, now):
        """CLOSE events for idle connections and holes past their timeout; old tombstones go."""
        out = []
        while self._conns:
            conn = next(iter(self._conns.values()))
            if now - conn.last < self.idle_timeout:
                break
            self._close(conn, "idle", now, now, out)
        for conn in list(self._gaps.values()):
            if any(s is not None and s.gap_since is not None and now - s.gap_since >= self.hole_timeout
                   for s in conn.streams):
                self._close(conn, "hole", now, now, out)
        while self._tombs:
            key, (seen, _) = next(iter(self._tombs.items()))
            if now - seen < self.tombstone_timeout:
                break
            del self._tombs[key]
        return out

    def shutdown(self, now):
        """CLOSE `shutdown` for every open connection (the capture is ending)."""
        out = []
        for conn in list(self._conns.values()):
            self._close(conn, "shutdown", now, now, out)
        return out

    def stats(self):
        s = dict(self._n)
        s.update(open=len(self._conns), waiting_bytes=self._waiting, tombstones=len(self._tombs),
                 closed=dict(self._closed), holes=self._closed["hole"], memory_closes=self._closed["memory"])
        return s

    # ------------------------------------------------------------ internals

    def _followed(self, conn):
        return conn.streams if self.responses else conn.streams[:1]

    def _open(self, key, seg, now, out):
        while len(self._conns) >= self.max_streams:
            self._close(next(iter(self._conns.values())), "memory", seg.ts, now, out)
        conn = _Conn(next(self._ids), key, now)
        self._conns[key] = conn
        self._n["opened"] += 1
        out.append(Event(Kind.OPEN, conn.id, seg.ts, TO_SERVER, address(6 if ":" in key[0][0] else 4, *key)))
        return conn

    def _deliver(self, conn, st, d, chunks, ts, out):
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._n["bytes_to_server" if d == TO_SERVER else "bytes_to_client"] += len(data)
        out.append(Event(Kind.DATA, conn.id, ts, d, data))

    def _track(self, conn, st, before, ts, now, out):
        """Start the hole timer of st (restart it if st moved since `before`), or stop it."""
        if st.starts or st.next < st.known:
            if st.gap_since is None or st.next != before:
                st.gap_since = now
                self._gaps[conn.key] = conn
            self._check_hole(conn, st, ts, now, out)
        elif st.gap_since is not None:
            st.gap_since = None
            if all(s is None or s.gap_since is None for s in conn.streams):
                self._gaps.pop(conn.key, None)

    def _check_hole(self, conn, st, ts, now, out):
        if now - st.gap_since >= self.hole_timeout or st.size >= self.hole_bytes:
            self._close(conn, "hole", ts, now, out)
        elif st.size > self.stream_bytes:
            self._close(conn, "memory", ts, now, out)
        while self._waiting > self.total_bytes and self._gaps:
            self._close(max(self._gaps.values(), key=_Conn.size), "memory", ts, now, out)

    def _close(self, conn, reason, ts, now, out):
        del self._conns[conn.key]
        self._gaps.pop(conn.key, None)
        self._waiting -= conn.size()
        self._closed[reason] += 1
        out.append(Event(Kind.CLOSE, conn.id, ts, TO_SERVER, reason.encode()))
        self._tombs[conn.key] = (now, conn.isn)
        self._tombs.move_to_end(conn.key)
        while len(self._tombs) > self.max_tombstones:
            self._tombs.popitem(last=False)
