"""tcp: replay each mirrored connection to a plain server (staging's web server, say).

One new TCP connection per mirrored connection, and the client's bytes written to it in the
order production received them. Nothing is parsed: HTTP keep-alive, pipelining and anything
else on the stream survive because the stream is replayed as it was, not re-built. What the
upstream answers is read (so it never blocks writing to us) and handed to `on_response(conn,
data, ts)` if one is given (b"" once the upstream closed its side): response comparison consumes
it. After each write, `on_response.on_sent(conn, nbytes, ts)` is called when the callback has one
(pipeline.Replies: both callbacks of one upstream travel as one object through upstreams.build).

One thread with one selector drives every replayed connection of this output; capture only
queues (outputs.Backlog). The failure policy, for this output alone:
- the upstream refuses or does not answer a connection (CONNECT_TIMEOUT): that connection is
  lost (`upstream_down`) and new ones are not even tried until a backoff (RETRY_MIN doubling
  to RETRY_MAX) has passed; the first connection after it is the redial;
- the upstream resets a connection: that one is lost (`upstream_reset`);
- the upstream takes nothing for STALL seconds while bytes wait: lost (`stalled`), and until
  then its bytes count against the Backlog's bound, so a stalled upstream makes this output
  lose connections (`queue_full`) rather than grow.
"""

import errno
import logging
import os
import selectors
import socket
import struct
import threading
import time

from gelf.mirror.events import Kind, TO_SERVER
from gelf.mirror.outputs import (QUEUE_BYTES, QUEUE_EVENTS, RETRY_MAX, RETRY_MIN, Backlog, Counts, Health,
                                 Output as Base, hostport)

log = logging.getLogger("gelf.mirror.tcp")

CONNECT_TIMEOUT = 5.0
STALL = 10.0  # seconds an upstream may take nothing while bytes wait for it
LINGER = 5.0  # seconds the upstream's answers are still read after our FIN
RECV_SIZE = 65536
TICK = 0.25
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_WAKE = object()


class Replay:
    """One mirrored connection replayed to the upstream."""

    __slots__ = ("conn", "sock", "out", "pending", "connected", "closing", "shut", "eof", "started",
                 "progress", "deadline", "events")

    def __init__(self, conn, sock, now):
        self.conn, self.sock = conn, sock
        self.out = []  # bytes (the first may be a memoryview, partly sent)
        self.pending = 0
        self.connected = self.closing = self.shut = self.eof = False
        self.started = self.progress = now
        self.deadline = None
        self.events = 0  # what the selector watches for


class Output(Base):
    scheme = "tcp"

    def __init__(self, host, port, on_response=None, max_events=QUEUE_EVENTS, max_bytes=QUEUE_BYTES,
                 stall=STALL, linger=LINGER, retry_min=RETRY_MIN, retry_max=RETRY_MAX):
        self.host, self.port = host, port
        self.name = "tcp://" + hostport(host, port)
        self.on_response = on_response
        self.on_sent = getattr(on_response, "on_sent", None)
        self.stall, self.linger = stall, linger
        self.health = Health(self.name, retry_min, retry_max)
        self.counts = Counts("conns", "replayed_bytes", "response_bytes", "queue_full", "lost_events",
                             "upstream_down", "upstream_reset", "stalled")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.backlog = Backlog(self.counts, self._wake, max_events, max_bytes)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, _READ, _WAKE)
        self._replays = {}  # conn -> Replay (output thread only)
        self._which = 0  # which of the host's addresses new connections go to (the next after a failure)
        self._stopping = None  # the time by which close() gives up
        self._thread = threading.Thread(target=self._run, name="gelf-mirror-tcp", daemon=True)

    # ---------------------------------------------------------------- any thread

    def start(self):
        self._thread.start()

    def offer(self, event):
        if event.direction != TO_SERVER:
            return True  # production's answers: not replayed
        return self.backlog.put(event)

    def stats(self):
        return dict(self.counts.snapshot(), upstream=self.name, up=self.health.up, open=len(self._replays),
                    queued_bytes=self.backlog.queued_bytes())

    def close(self, timeout=2.0):
        self._stopping = time.monotonic() + timeout
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout + 2)
        else:
            self._release()

    def _wake(self):
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # full (a wake-up is pending already), or closed

    # ---------------------------------------------------------------- the output's thread

    def _run(self):
        try:
            self._loop()
        except Exception:  # a bug: this output stops (its Backlog fills and counts), capture goes on
            log.exception("upstream %s: internal error; this output stops", self.name)
        finally:
            for replay in list(self._replays.values()):
                self._finish(replay, abort=True)
            self._release()

    def _loop(self):
        addrs = self._resolve()
        next_tick = time.monotonic() + TICK
        while not self._done():
            for key, mask in self._selector.select(TICK):
                if key.data is _WAKE:
                    self._drain_wake()
                else:
                    self._service(key.data, mask)
            events, abandoned = self.backlog.take()
            for event in events:
                self._handle(event, addrs)
            for conn in abandoned:  # after the events: an OPEN may be among them
                replay = self._replays.get(conn)
                if replay is not None:
                    self._finish(replay, abort=True)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK
                self._tick(now)

    def _done(self):
        if self._stopping is None:
            return False
        for replay in list(self._replays.values()):
            if not replay.closing:
                replay.closing = True
                if replay.connected:
                    self._flush(replay)
        return not self._replays or time.monotonic() >= self._stopping

    def _resolve(self):
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            log.warning("upstream %s: cannot resolve %s: %s", self.name, self.host, err.strerror)
            return None
        return [(info[0], info[4]) for info in infos]

    def _drain_wake(self):
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _handle(self, event, addrs):
        """One event from capture: start, feed or close a replayed connection."""
        replay = self._replays.get(event.conn)
        if event.kind == Kind.DATA:
            if replay is None:
                self.backlog.release(len(event.data))
                self.counts.add("lost_events")
                return
            replay.out.append(event.data)
            replay.pending += len(event.data)
            if replay.connected:
                self._flush(replay)
            return
        self.backlog.release(len(event.data))
        if event.kind == Kind.CLOSE:
            if replay is not None:
                replay.closing = True
                if replay.connected:
                    self._flush(replay)
            return
        if replay is not None:  # a second OPEN: the first connection's CLOSE never came
            self._finish(replay, abort=True)
        now = time.monotonic()
        if not addrs or not self.health.may_try(now):
            self.backlog.lose(event.conn, "upstream_down")
            if not addrs:
                self.health.failed("cannot resolve %s" % self.host)
            return
        addr = addrs[self._which % len(addrs)]
        sock = socket.socket(addr[0], socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(addr[1])
        replay = Replay(event.conn, sock, now)
        self._replays[event.conn] = replay
        self.counts.add("conns")
        if code not in (0, errno.EINPROGRESS):
            self._connect_failed(replay, os.strerror(code))
        else:
            self._watch(replay, _WRITE)

    def _service(self, replay, mask):
        if replay.conn not in self._replays:
            return
        if not replay.connected:
            code = replay.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._connect_failed(replay, os.strerror(code))
                return
            replay.connected = True
            replay.progress = time.monotonic()
            self.health.ok()
        if mask & _READ and not self._read(replay):
            return
        self._flush(replay)

    def _read(self, replay):
        """Read what the upstream answered; False if the replay is over."""
        try:
            data = replay.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = None
        if data:
            self.counts.add("response_bytes", len(data))
        if data is not None:
            self._tell(self.on_response, replay.conn, data)  # b"": the upstream closed its side
        if data:
            return True
        if data is None or replay.shut or replay.pending:  # a reset, or done, or cut off
            if replay.pending:
                self.backlog.lose(replay.conn, "upstream_reset", closed=replay.closing)
            self._finish(replay, abort=data is None)
            return False
        replay.eof = True  # the upstream closed its side; ours follows at CLOSE
        self._watch(replay, 0)
        return True

    def _flush(self, replay):
        """Write what waits; after CLOSE, once all is written, send our FIN."""
        sock, out = replay.sock, replay.out
        try:
            while out:
                sent = sock.send(out[0])
                self.backlog.release(sent)
                replay.pending -= sent
                self.counts.add("replayed_bytes", sent)
                replay.progress = time.monotonic()
                if sent:
                    self._tell(self.on_sent, replay.conn, sent)
                if sent < len(out[0]):
                    out[0] = memoryview(out[0])[sent:]
                    break
                out.pop(0)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.backlog.lose(replay.conn, "upstream_reset", closed=replay.closing)
            self._finish(replay, abort=True)
            return
        if replay.closing and not out and not replay.shut:
            replay.shut = True
            replay.deadline = time.monotonic() + self.linger
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if replay.eof:
                self._finish(replay)
                return
        self._watch(replay, (0 if replay.eof else _READ) | (_WRITE if out else 0))

    def _tell(self, callback, conn, what):
        """on_response or on_sent (response comparison), if given; a consumer's bug must not stop
        the replay: counted, logged."""
        if callback is None:
            return
        try:
            callback(conn, what, time.time())
        except Exception:
            self.counts.add("callback_failed")
            log.exception("upstream %s: a response-comparison callback failed", self.name)

    def _connect_failed(self, replay, why):
        self._which += 1  # a name with several addresses (localhost: ::1, 127.0.0.1): try the next
        self.health.failed(why)
        self.backlog.lose(replay.conn, "upstream_down", closed=replay.closing)
        self._finish(replay, abort=True)

    def _tick(self, now):
        for replay in list(self._replays.values()):
            if not replay.connected:
                if now - replay.started > CONNECT_TIMEOUT:
                    self._connect_failed(replay, "no answer in %g s" % CONNECT_TIMEOUT)
            elif replay.pending and now - replay.progress > self.stall:
                self.backlog.lose(replay.conn, "stalled", closed=replay.closing)
                self._finish(replay, abort=True)
            elif replay.shut and now >= replay.deadline:
                self._finish(replay)

    def _watch(self, replay, events):
        if events == replay.events:
            return
        if not replay.events:
            self._selector.register(replay.sock, events, replay)
        elif not events:
            self._selector.unregister(replay.sock)
        else:
            self._selector.modify(replay.sock, events, replay)
        replay.events = events

    def _finish(self, replay, abort=False):
        """The one way a replayed connection ends: its socket closed, its bytes released."""
        if self._replays.get(replay.conn) is not replay:
            return
        del self._replays[replay.conn]
        self._watch(replay, 0)
        self.backlog.release(replay.pending)
        replay.pending = 0
        replay.out.clear()
        if abort:
            try:
                replay.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        replay.sock.close()

    def _release(self):
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        self._selector.close()
