"""The link loop: one thread owns every WebSocket once its opening handshake is done.

It takes the place of ws4py's WebSocketManager (the WebSocketPlugin drives it the same way:
start, add, close_all, stop, join; see server.py) and also runs the links this process dials.
With one epoll object it reads every socket (non-blocking: a read takes what has arrived, and
for TLS only whole records), writes a link's queue when its socket is writable, and keeps
every link's time: keepalive pings, the no-progress limit, the closing handshake's deadline.
Nothing here waits for a peer, so a peer that never reads, sends half a frame or half a TLS
record costs the others nothing, and an idle connection costs no thread: an epoll entry.

Every way a connection ends (Close frame, FIN, RST, protocol or TLS error, a timeout, shutdown)
goes through `_finish`, which closes the socket at once and calls `link.ended()` once.
"""

import collections
import logging
import os
import select
import socket
import struct
import threading
import time

from gelf import fastws

log = logging.getLogger("gelf.loop")

TICK = 0.25  # seconds between timer checks
CLOSE_TIMEOUT = 3.0  # seconds a closing handshake may take before the socket is closed anyway
KEEPALIVE = 15.0
STALL = 10.0
# Unsent bytes a link's socket may hold before it reports itself full: without a bound, the
# kernel takes megabytes for a peer that never reads (loopback's 64 KiB segments let it grow
# past 1 MB per socket), all copied before the link counts as stuck, and bufferbloat on a slow
# path (links.py: 16 KiB and the queue's delay bound took a loaded 40 ms path's ping from
# 611 ms to 60-77 ms; 256 KiB alone left 328 ms). Bytes in flight are still ruled by TCP's own
# window and buffer tuning; LAN throughput did not change measurably.
NOTSENT_LOWAT = 16 * 1024
# TCP retransmits at least this often (TCP_RTO_MAX_MS, Linux 6.15 and later; option 44 of
# <linux/tcp.h>, which Python's socket module lacks). After a 10 s outage of the path, traffic
# through a link was back 0.9 s after the path returned instead of 7.1-7.7 s, when TCP's
# doubled timer next fired. With the cap, TCP gives up on a dead path after about 14 s rather
# than some 15 minutes; the keepalive would close such a link within 2 x --keepalive anyway.
RTO_MAX_MS = 1000
TCP_RTO_MAX_MS = 44
READ = select.EPOLLIN | select.EPOLLRDHUP
WRITE = select.EPOLLOUT


class LinkLoop:
    """The thread that reads, writes and times every connected link."""

    def __init__(self, keepalive=KEEPALIVE, stall=STALL, close_timeout=CLOSE_TIMEOUT, name="gelf-links"):
        self.keepalive = keepalive  # ping after this long without a byte from the peer; close after twice
        self.stall = stall  # close a link whose peer took nothing this long while frames waited
        self.close_timeout = close_timeout
        self._epoll = select.epoll()
        self._links = {}  # fd -> Link (loop thread only)
        self._calls = collections.deque()  # work handed to the loop thread by others
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._running = False
        self._stopping = None  # the time by which a stop gives up on closing handshakes
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ---------------------------------------------------------------- any thread

    def start(self):
        self._running = True
        self._thread.start()

    def attach(self, link, sock, ws, received=b""):
        """Hand a connected socket (its handshake done; `received`: bytes read past it) to the loop."""
        self._call(lambda: self._attach(link, sock, ws, received))

    def close(self, link, code=fastws.CloseCode.GOING_AWAY, reason="going away"):
        """Close one link with the closing handshake (a dialing link being stopped)."""
        self._call(lambda: self._close(link, code, reason))

    def close_all(self, code=fastws.CloseCode.GOING_AWAY, reason="server shutting down"):
        self._call(lambda: [self._close(link, code, reason) for link in list(self._links.values())])

    def stop(self, grace=0.5):
        """Close every link (Close frames, up to `grace` seconds for the handshakes), then end."""
        if not self._thread.is_alive():
            self._release()
            return
        deadline = time.monotonic() + grace
        self.close_all()
        self._call(lambda: setattr(self, "_stopping", deadline))

    def join(self, timeout=5):
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def watch(self, link, writable):
        """Watch the link's socket for writability too (or no longer). Called with the link's lock
        held, from any thread: epoll_ctl is safe while the loop waits in epoll_wait."""
        try:
            self._epoll.modify(link.sock.fileno(), READ | WRITE if writable else READ)
        except (OSError, ValueError):
            pass  # not registered yet (attach registers with the right events), or being finished

    def __len__(self):
        return len(self._links)

    def _call(self, fn):
        self._calls.append(fn)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already
        except OSError:
            pass  # the loop has ended; nothing will run it

    # ---------------------------------------------------------------- the loop thread

    def _run(self):
        next_tick = time.monotonic() + TICK
        try:
            while self._running:
                events = self._epoll.poll(max(0.0, next_tick - time.monotonic()))
                for fd, mask in events:
                    if fd == self._wake_r:
                        self._run_calls()
                        continue
                    link = self._links.get(fd)
                    if link is None:
                        continue
                    try:
                        self._service(link, mask)
                    except Exception:  # a bug, not the peer's doing: that link pays for it, not all
                        log.exception("link %d (%s): internal error", link.id, link.peer)
                        self._finish(link, fastws.CloseCode.INTERNAL_ERROR, "internal error")
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK
                    self._tick(now)
        finally:
            for link in list(self._links.values()):
                self._finish(link, fastws.CloseCode.GOING_AWAY, "server stopped")
            self._release()

    def _run_calls(self):
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._calls:
            self._calls.popleft()()

    def _service(self, link, mask):
        """One socket's events: read, write, then see whether the connection is over."""
        if mask & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
            if not link.receive():
                self._finish(link, link.ws.close_code, link.why or link.ws.close_reason)
                return
        if mask & WRITE or link.waiting():
            if not link.flush():
                link.ws.receive_eof()
                self._finish(link, link.ws.close_code, link.why)
                return
        self._settle(link)

    def _settle(self, link):
        """Close the socket once the closing handshake is done and our Close is written. A client
        first gives the server the chance to close TCP (RFC 6455 7.1.1), for up to close_timeout."""
        ws = link.ws
        if ws.state is not fastws.State.CLOSED or link.waiting():
            return
        if ws.failed or not ws.client:
            self._finish(link, ws.close_code, ws.close_reason)
        elif link.deadline is None:
            link.deadline = time.monotonic() + self.close_timeout

    def _attach(self, link, sock, ws, received):
        try:
            sock.setblocking(False)
            _tune(sock)
            fd = sock.fileno()
            link.attach(sock, ws, self)
            self._epoll.register(fd, READ)
        except OSError as err:  # the peer is already gone
            log.debug("link %d (%s): cannot attach: %s", link.id, link.peer, err)
            link.detach()
            _close_socket(sock)
            link.ended(fastws.CloseCode.ABNORMAL, str(err))
            return
        self._links[fd] = link
        link.opened()
        if received:
            link.feed(received)
            self._settle(link)
        if self._stopping is not None:
            self._close(link, fastws.CloseCode.GOING_AWAY, "server shutting down")

    def _close(self, link, code, reason):
        if link.ws is None or link.sock is None or link.sock.fileno() not in self._links:
            return
        link.close(code, reason, self.close_timeout)
        if link.waiting():
            link.flush()
        self._settle(link)

    def _tick(self, now):
        if self._stopping is not None and (not self._links or now >= self._stopping):
            self._running = False
            return
        for link in list(self._links.values()):
            ws = link.ws
            link.count_drops()
            if link.deadline is not None and now >= link.deadline:
                self._finish(link, ws.close_code if ws.close_received else fastws.CloseCode.ABNORMAL,
                             "the closing handshake timed out", abort=True)
            elif link.waiting() and now - link.progress > self.stall:
                self._finish(link, fastws.CloseCode.ABNORMAL, "the peer took nothing for %g s" % self.stall,
                             abort=True)
            elif self.keepalive and ws.state is fastws.State.OPEN:
                if link.pinged is None:
                    if now - link.heard > self.keepalive:
                        link.pinged = now
                        link.send_control(ws.send_ping(b"gelf keepalive"))
                elif now - link.pinged > self.keepalive:
                    self._finish(link, fastws.CloseCode.ABNORMAL,
                                 "no answer to a keepalive ping in %g s" % self.keepalive, abort=True)

    def _finish(self, link, code, why, abort=False):
        """The one way a connection ends: forget it, close its socket now, tell its link. `abort`
        (a peer given up on: stalled, silent, or deaf to the closing handshake) resets the
        connection, so the kernel drops what it still holds for that peer at once."""
        link.count_drops()
        sock = link.detach()
        if sock is None:
            return
        if abort:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        fd = sock.fileno()
        if self._links.get(fd) is link:
            del self._links[fd]
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass
        _close_socket(sock)
        link.ended(code if code is not None else fastws.CloseCode.ABNORMAL, why)

    def _release(self):
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        self._epoll.close()


def _tune(sock):
    """TCP options every link's socket gets. An option the kernel does not know (TCP_RTO_MAX_MS
    before Linux 6.15), or a socket that is not TCP (a socketpair in tests), is left as it is."""
    for option, value in ((socket.TCP_NODELAY, 1), (socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT),
                          (TCP_RTO_MAX_MS, RTO_MAX_MS)):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except OSError:
            pass


def _close_socket(sock):
    """Close the file descriptor now. sock.close() alone waits for every file object made from
    the socket to be closed too, and the HTTP server's (cheroot's) are left to the garbage
    collector after an upgrade: that kept the descriptors of closed WebSockets open for many
    seconds. detach() hands the descriptor over whatever refers to the socket object."""
    try:
        fd = sock.detach()
    except OSError:
        return
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
