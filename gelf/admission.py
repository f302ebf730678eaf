"""Who may hold a connection: at most so many in total and so many per client address.

Every connection the server accepts takes a slot here, keyed by its socket object, until it
ends: while the gate reads its request, while a worker answers it, and for as long as it stays
open as a WebSocket (the WebSocket handler gives the slot back when it closes). Over a limit the
gate refuses the connection at once (503), so one address can fill its own share but never the
server's.

An "address" is an IPv4 address, or an IPv6 /64: one host or one home network gets a /64, so
counting single IPv6 addresses would let one client take every slot.

A slot is also given back when its socket object is garbage-collected, so a path that forgets
to release one cannot lock an address out for good.
"""

import collections
import ipaddress
import threading
import weakref


def address_key(host):
    """What the per-address limit counts: the IPv4 address (also when IPv4-mapped), or the /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network((ip, 64), strict=False))
    return str(ip)


class Admission:
    """Connection slots, counted per address and in total. Thread-safe: the gate admits, worker
    threads and WebSocket handlers release."""

    def __init__(self, max_connections, max_per_address):
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self._lock = threading.Lock()
        self._held = {}  # id(sock) -> (weak reference to sock, address key)
        self._per_address = collections.Counter()
        self._collected = collections.deque()  # (id, weak reference) of garbage-collected sockets

    def admit(self, sock, key):
        """Take a slot for `sock` from address `key`: None, or (the limit's flag, one line for
        the client) when a limit is reached."""
        with self._lock:
            self._forget_collected()
            if len(self._held) >= self.max_connections:
                return "--max-connections", (
                    "The server holds as many connections as it may (%d); try again later."
                    % self.max_connections)
            if self._per_address[key] >= self.max_per_address:
                return "--max-per-address", (
                    "Too many connections from %s (at most %d); close some and try again."
                    % (key, self.max_per_address))
            self._held[id(sock)] = (self._ref(sock), key)
            self._per_address[key] += 1
            return None

    def rekey(self, old, new):
        """The slot of socket `old` now belongs to `new` (the TLS socket that wraps it)."""
        with self._lock:
            self._forget_collected()
            entry = self._take(old)
            if entry is not None:
                self._held[id(new)] = (self._ref(new), entry[1])

    def release(self, sock):
        """Give back the slot of `sock`; any later call for the same socket does nothing."""
        with self._lock:
            entry = self._take(sock)
            if entry is not None:
                self._drop(entry[1])

    def count(self, key=None):
        """Slots held in total, or by one address."""
        with self._lock:
            self._forget_collected()
            return len(self._held) if key is None else self._per_address[key]

    def _take(self, sock):
        entry = self._held.get(id(sock))
        if entry is None or entry[0]() is not sock:
            return None
        del self._held[id(sock)]
        return entry

    def _drop(self, key):
        self._per_address[key] -= 1
        if self._per_address[key] <= 0:
            del self._per_address[key]

    def _forget_collected(self):
        # A collected socket's id may already belong to a new socket: only the same weak
        # reference identifies the old entry.
        while self._collected:
            sock_id, ref = self._collected.popleft()
            entry = self._held.get(sock_id)
            if entry is not None and entry[0] is ref:
                del self._held[sock_id]
                self._drop(entry[1])

    def _ref(self, sock):
        collected = self._collected
        return weakref.ref(sock, lambda ref, sock_id=id(sock): collected.append((sock_id, ref)))


class Turns:
    """Which waiting request gets the next free worker thread.

    At most `per_address` requests of one address are in workers at once, and never more than
    `workers` in all; addresses with requests waiting take turns (round robin), each address's
    requests in the order they came. So an address that sends many requests, or reads its
    responses slowly, holds at most its share of the workers, and everybody else's requests still
    get one. Bookkeeping only, used from the gate's one thread.
    """

    def __init__(self, workers, per_address):
        self.workers = workers
        self.per_address = per_address
        self.busy = collections.Counter()  # address -> requests in workers
        self.inflight = 0
        self._waiting = {}  # address -> deque of requests
        self._turns = collections.deque()  # addresses that may have a worker, in turn
        self._in_turns = set()

    def wait(self, key, request):
        """`request` from address `key` waits for a worker."""
        self._waiting.setdefault(key, collections.deque()).append(request)
        self._offer(key)

    def next(self):
        """The request to give a worker now (it then counts as in a worker), or None."""
        if self.inflight >= self.workers or not self._turns:
            return None
        key = self._turns.popleft()
        self._in_turns.discard(key)
        queue = self._waiting[key]
        request = queue.popleft()
        if not queue:
            del self._waiting[key]
        self.busy[key] += 1
        self.inflight += 1
        self._offer(key)
        return request

    def done(self, key):
        """A worker is done with a request of address `key`."""
        self.busy[key] -= 1
        if self.busy[key] <= 0:
            del self.busy[key]
        self.inflight -= 1
        self._offer(key)

    def waiting(self):
        return sum(len(queue) for queue in self._waiting.values())

    def _offer(self, key):
        if key in self._waiting and self.busy[key] < self.per_address and key not in self._in_turns:
            self._turns.append(key)
            self._in_turns.add(key)
