"""One direction of a TCP connection as reassembly keeps it: the offset delivered so far, and
the pieces waiting past a hole.

Sequence numbers become 64-bit stream offsets relative to the next expected byte (a signed
32-bit distance, RFC 1982 style), so the wrap at 2**32 is invisible past `offset()`. Waiting
pieces are a sorted list of disjoint (offset, bytes): an overlap keeps the bytes that arrived
first, and a later segment only fills what nothing covered yet. Few pieces wait at once in
practice (a hole is short-lived), so bisect on a plain list beats a tree.
"""

from bisect import bisect_right

SEQ_MASK = 0xFFFFFFFF
_HALF = 1 << 31


class Stream:
    """One direction. Offsets are relative to `base`, the sequence number of byte 0."""

    __slots__ = ("base", "next", "fin", "known", "starts", "pieces", "size", "gap_since")

    def __init__(self, base):
        self.base = base
        self.next = 0  # offset of the next byte to deliver
        self.fin = None  # offset of the FIN, once seen
        self.known = 0  # bytes before this offset exist: the FIN's, or what the peer acknowledged
        self.starts = []  # offsets of the pieces waiting past a hole, sorted, disjoint
        self.pieces = []
        self.size = 0  # bytes waiting
        self.gap_since = None

    def offset(self, seq):
        d = (seq - self.base - self.next) & SEQ_MASK
        return self.next + (d - (1 << 32) if d >= _HALF else d)

    def done(self):
        return self.fin is not None and self.next >= self.fin

    def insert(self, a, data):
        """Keep the parts of data (at offset a, past `next`) that no waiting piece covers."""
        starts, pieces = self.starts, self.pieces
        i = bisect_right(starts, a)
        if i and starts[i - 1] + len(pieces[i - 1]) > a:  # the piece before covers our start
            cut = starts[i - 1] + len(pieces[i - 1]) - a
            a, data = a + cut, data[cut:]
        added = 0
        while data:
            if i < len(starts) and starts[i] < a + len(data):
                s = starts[i]
                if s > a:
                    starts.insert(i, a)
                    pieces.insert(i, data[:s - a])
                    added += s - a
                    i += 1
                cut = s + len(pieces[i]) - a
                a, data = a + cut, data[cut:]
                i += 1
            else:
                starts.insert(i, a)
                pieces.insert(i, data)
                added += len(data)
                break
        self.size += added
        return added

    def drain(self, out):
        """Move the pieces that now touch `next` to out; return the bytes freed."""
        starts, pieces = self.starts, self.pieces
        n, freed = 0, 0
        while n < len(starts) and starts[n] <= self.next:
            piece = pieces[n]
            freed += len(piece)
            end = starts[n] + len(piece)
            if end > self.next:
                out.append(piece[self.next - starts[n]:])
                self.next = end
            n += 1
        if n:
            del starts[:n], pieces[:n]
            self.size -= freed
        return freed
