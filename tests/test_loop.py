"""The link loop and a link's sender over real socket pairs: order, bounded queues, peers that
never read, keepalive, the closing handshake, half a TLS record, and sockets closed at once.

Each test's peer is the other end of a socketpair (or a TLS pair over one), driven by hand;
the link under test is a server-side link in a LinkLoop, as server.py makes them."""

import os
import socket
import ssl
import struct
import threading
import time

import pytest

import helpers

from gelf.fastws import CloseCode, Connection, Event
from gelf import links, loop as link_loop
from gelf.links import QUEUE_BYTES, QUEUE_MESSAGES, Link
from gelf.loop import LinkLoop
from gelf.stats import Drops

WAIT = 30  # seconds: generous bounds for things that must happen (speed is for make bench)


class RecordingLink(Link):
    def __init__(self, name="peer"):
        super().__init__(name, Drops(), self._deliver)
        self.delivered = []
        self.opens = 0
        self.endings = []
        self.done = threading.Event()

    def _deliver(self, payload, link):
        self.delivered.append(bytes(payload))

    def opened(self):
        self.opens += 1

    def ended(self, code, why):
        super().ended(code, why)
        self.endings.append((code, why))
        self.done.set()


class Peer:
    """The far end of a link: a WebSocket client driven by hand over its socket."""

    def __init__(self, sock):
        self.sock = sock
        self.ws = Connection(client=True, max_message=1 << 24)
        self.events = []

    def send(self, data):
        self.sock.sendall(data)

    def read_until(self, pred, timeout=WAIT):
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while not pred(self.events):
            if time.monotonic() > deadline:
                raise TimeoutError("peer saw %r" % self.events[-5:])
            data = self.sock.recv(1 << 16)
            if not data:
                self.events.append(("eof", None))
                break
            self.events += self.ws.receive_data(data)
        return self.events

    def messages(self):
        return [bytes(v) for k, v in self.events if k is Event.BINARY]


@pytest.fixture
def loop():
    loops = []

    def make(**kw):
        lp = LinkLoop(**kw)
        lp.start()
        loops.append(lp)
        return lp

    yield make
    for lp in loops:
        lp.stop(grace=0.2)
        lp.join(10)


def attach(lp, **kw):
    ours, theirs = socket.socketpair()
    link = RecordingLink()
    lp.attach(link, ours, Connection(client=False, max_message=1 << 20), **kw)
    wait(lambda: link.opens == 1, "the link to open")
    return link, Peer(theirs), ours


def wait(pred, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.01)


def test_every_message_arrives_once_in_order_from_many_threads(loop, monkeypatch):
    monkeypatch.setattr(links, "QUEUE_DELAY", None)  # about order: a busy machine's delays are no drop here
    link, peer, _ = attach(loop())
    per_thread, threads, sizes = 400, 4, [60, 1514, 9000, 70000]

    def produce(t):
        for i in range(per_thread):
            while len(link._queue) > QUEUE_MESSAGES // 2 or link._queued > QUEUE_BYTES // 2:  # pace: order, not drops
                time.sleep(0.001)
            link.offer(b"%d:%d:" % (t, i) + b"x" * sizes[i % 4])

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    peer.read_until(lambda ev: len(peer.messages()) >= per_thread * threads)
    for w in workers:
        w.join(WAIT)
    got = peer.messages()
    assert link.drops.snapshot()["queue_full"] == 0 and len(got) == per_thread * threads
    for t in range(threads):  # each producer's messages arrive complete and in its order
        mine = [m for m in got if m.startswith(b"%d:" % t)]
        assert [int(m.split(b":")[1]) for m in mine] == list(range(per_thread))
        assert all(len(m) == len(b"%d:%d:" % (t, i)) + sizes[i % 4] for i, m in enumerate(mine))
    assert link.tx.count == per_thread * threads


def test_a_peer_that_never_reads_drops_its_own_messages_then_is_closed(loop):
    lp = loop(stall=1.0)
    stuck, stuck_peer, _ = attach(lp)
    stuck_peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    healthy, healthy_peer, _ = attach(lp)
    done = threading.Event()

    def offer_a_lot():  # the tap reader's part: it must never wait for the stuck peer
        for i in range(QUEUE_MESSAGES * 4):
            stuck.offer(b"y" * 65536)
            if i % 64 == 0:
                healthy.offer(b"still here %d" % i)
        done.set()

    threading.Thread(target=offer_a_lot, daemon=True).start()
    assert done.wait(WAIT), "offering to a stuck peer blocked the offering thread"
    stuck.count_drops()
    assert stuck.drops.snapshot()["queue_full"] > 0 and len(stuck._queue) <= QUEUE_MESSAGES
    healthy_peer.read_until(lambda ev: len(healthy_peer.messages()) == 16)
    assert healthy.drops.snapshot()["queue_full"] == 0
    assert stuck.done.wait(WAIT), "a peer that took nothing was never closed"
    assert stuck.endings[0][0] == CloseCode.ABNORMAL and "took nothing" in stuck.endings[0][1]
    assert stuck.sock is None and not healthy.done.is_set() and len(lp) == 1


def test_a_silent_peer_is_pinged_then_closed_and_an_answering_one_stays(loop):
    lp = loop(keepalive=0.5)
    silent, silent_peer, _ = attach(lp)
    alive, alive_peer, _ = attach(lp)
    stop = threading.Event()

    def answer_pings():  # a live peer: its WebSocket answers pings with pongs
        alive_peer.sock.settimeout(0.2)
        while not stop.is_set():
            try:
                data = alive_peer.sock.recv(4096)
            except socket.timeout:
                continue
            if not data:
                return
            alive_peer.events += alive_peer.ws.receive_data(data)
            alive_peer.send(alive_peer.ws.data_to_send())

    threading.Thread(target=answer_pings, daemon=True).start()
    assert silent.done.wait(WAIT)
    assert "keepalive" in silent.endings[0][1]
    silent_peer.read_until(lambda ev: ev and ev[-1][0] == "eof")
    assert (Event.PING, b"gelf keepalive") in silent_peer.events
    stop.set()
    assert not alive.done.is_set() and any(k is Event.PING for k, _ in alive_peer.events)


def test_a_close_from_the_peer_is_answered_and_the_socket_closed(loop):
    link, peer, ours = attach(loop())
    peer.send(peer.ws.send_binary(b"one message"))
    peer.send(peer.ws.send_close(CloseCode.NORMAL, "bye"))
    events = peer.read_until(lambda ev: ev and ev[-1][0] == "eof")
    assert (Event.CLOSE, (1000, "")) in events  # the reply echoes the code
    assert link.done.wait(WAIT) and link.endings == [(1000, "bye")]
    assert link.delivered == [b"one message"] and ours.fileno() == -1


@pytest.mark.parametrize("how", ["fin", "rst", "protocol error"])
def test_every_other_ending_ends_the_link_once(loop, how):
    link, peer, _ = attach(loop())
    if how == "fin":
        peer.sock.shutdown(socket.SHUT_WR)
    elif how == "rst":
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.sock.close()
    else:
        peer.send(b"\x83\x80\0\0\0\0")  # opcode 3 is reserved
    assert link.done.wait(WAIT)
    time.sleep(0.3)
    assert len(link.endings) == 1
    if how == "protocol error":
        assert link.endings[0][0] == CloseCode.PROTOCOL_ERROR and link.drops.snapshot()["malformed"] == 1
        assert (Event.CLOSE, (1002, "unknown opcode 3")) in peer.read_until(lambda ev: ev and ev[-1][0] == "eof")


def test_stop_closes_every_link_with_going_away(loop):
    lp = loop()
    links = [attach(lp) for _ in range(3)]
    lp.stop(grace=1.0)
    lp.join(WAIT)
    for link, peer, ours in links:
        assert link.done.is_set() and ours.fileno() == -1
        assert (Event.CLOSE, (1001, "server shutting down")) in peer.read_until(lambda ev: ev and ev[-1][0] == "eof")


def test_the_descriptor_is_closed_even_with_file_objects_left(loop):
    """cheroot leaves file objects of an upgraded socket to the garbage collector."""
    lp = loop()
    ours, theirs = socket.socketpair()
    leftover = ours.makefile("rb")  # what the HTTP server keeps
    fd = ours.fileno()
    link = RecordingLink()
    lp.attach(link, ours, Connection(client=False, max_message=100))
    wait(lambda: link.opens == 1, "open")
    theirs.close()
    assert link.done.wait(WAIT)
    with pytest.raises(OSError):
        os.fstat(fd)
    del leftover


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return helpers.make_certificate(tmp_path_factory.mktemp("tls"))


def tls_pair(certificate):
    """(server-side SSLSocket, client-side SSLSocket) over a socketpair, handshake done."""
    a, b = socket.socketpair()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*map(str, certificate))
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    result = {}
    t = threading.Thread(target=lambda: result.update(s=server_ctx.wrap_socket(a, server_side=True)))
    t.start()
    client = client_ctx.wrap_socket(b, server_hostname="localhost")
    t.join(WAIT)
    return result["s"], client


def test_half_a_tls_record_holds_up_no_other_link(loop, certificate):
    lp = loop()
    tls_ours, tls_client = tls_pair(certificate)
    slow = RecordingLink("tls")
    lp.attach(slow, tls_ours, Connection(client=False, max_message=1 << 20))
    other, other_peer, _ = attach(lp)
    wait(lambda: slow.opens == 1, "open")
    tls_client.sendall(Connection(client=True, max_message=100).send_binary(b"whole"))
    wait(lambda: slow.delivered == [b"whole"], "a whole TLS record's message")
    # Then the first 20 bytes of a 64-byte record, straight onto the wire under the TLS socket:
    # the server's TLS socket is readable but has no whole record, and never will.
    os.write(tls_client.fileno(), b"\x17\x03\x03\x00\x40" + b"\x00" * 20)
    other_peer.send(other_peer.ws.send_binary(b"through"))
    wait(lambda: b"through" in other.delivered, "the plain link's message while a TLS record is half there")
    other.offer(b"back")
    other_peer.read_until(lambda ev: b"back" in other_peer.messages())
    slow.offer(b"to the tls peer")  # written by the loop thread, record by record
    tls_client.settimeout(WAIT)
    reader = Connection(client=True, max_message=100)
    assert reader.receive_data(tls_client.recv(4096)) == [(Event.BINARY, b"to the tls peer")]
    assert not slow.done.is_set()


def test_pings_whose_pongs_are_never_read_grow_nothing(loop):
    link, peer, _ = attach(loop())
    ping = peer.ws.send_ping(b"p" * 125)
    for _ in range(80):  # 80 000 pings: 10 MB of pongs, more than the socket buffers and the queue
        peer.send(bytes(ping) * 1000)
    wait(lambda: link.describe()["drops"]["queue_full"] > 0, "pongs to be dropped once the queue is full")
    assert len(link._queue) <= QUEUE_MESSAGES and link._queued < QUEUE_BYTES + (1 << 20)
    assert not link.done.is_set()


def test_links_share_one_queue_budget():
    from gelf.links import QUEUE_BUDGET, QUEUE_BYTES_MIN, LinkSet

    links = LinkSet()
    few = [Link("l%d" % i, Drops()) for i in range(10)]
    for link in few:
        links.add(link)
    assert {link.queue_bytes for link in few} == {QUEUE_BYTES}
    many = [Link("m%d" % i, Drops()) for i in range(1000)]
    for link in many:
        links.add(link)
    assert {link.queue_bytes for link in links} == {max(QUEUE_BYTES_MIN, QUEUE_BUDGET // 1010)}
    assert sum(link.queue_bytes for link in links) <= QUEUE_BUDGET + len(links) * QUEUE_BYTES_MIN
    for link in many:
        links.remove(link)
    assert {link.queue_bytes for link in few} == {QUEUE_BYTES}


def _fill_socket(link, peer, ours):
    """Make the link's socket full, so that what is offered next waits in its queue."""
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    while not link.waiting():
        link.offer(b"f" * 65536)


def test_a_message_late_in_a_standing_queue_is_dropped_not_sent(loop, monkeypatch):
    monkeypatch.setattr(links, "QUEUE_DELAY", 1.0)  # long, so a busy machine cannot make "new" late
    link, peer, ours = attach(loop())
    _fill_socket(link, peer, ours)
    link.offer(b"old")
    for _ in range(4):  # a standing queue behind it: the peer reads nothing meanwhile
        link.offer(b"s" * 8192)
    time.sleep(1.5)  # longer than the bound
    link.offer(b"new")
    peer.read_until(lambda ev: b"new" in peer.messages())
    link.count_drops()
    assert b"old" not in peer.messages()
    assert link.drops.snapshot()["queue_delay"] >= 1 and link.drops.snapshot()["queue_full"] == 0


def test_a_lone_late_message_is_sent_a_busy_machine_is_no_standing_queue(loop, monkeypatch):
    monkeypatch.setattr(links, "QUEUE_DELAY", 0.1)
    link, peer, ours = attach(loop())
    _fill_socket(link, peer, ours)
    link.offer(b"lonely")  # waits far longer than the bound, but nothing stands behind it
    time.sleep(1.0)
    peer.read_until(lambda ev: b"lonely" in peer.messages())
    link.count_drops()
    assert link.drops.snapshot()["queue_delay"] == 0


def test_link_sockets_get_the_latency_options(loop):
    lp = loop()
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()):
        ours, _ = server.accept()
        link = RecordingLink()
        lp.attach(link, ours, Connection(client=False, max_message=1 << 20))
        wait(lambda: link.opens == 1, "the link to open")
        assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == link_loop.NOTSENT_LOWAT
        release = tuple(int(n) for n in os.uname().release.split(".")[:2] if n.isdigit())
        if release >= (6, 15):  # the option exists from Linux 6.15 on; older kernels keep their default
            assert ours.getsockopt(socket.IPPROTO_TCP, link_loop.TCP_RTO_MAX_MS) == link_loop.RTO_MAX_MS
