"""Direct links: this process dials a gelf server's /ws itself, with no browser (etherws style).

A DialLink keeps one WebSocket to one URL up: it dials, runs the connection until it drops,
then waits (1 s doubling to 30 s, with jitter) and dials again. Each change of state is logged
once, not every failed attempt. The same link serves `--connect` in a server and the headless
relay (relay.py); only where received messages go differs.
"""

import logging
import random
import socket
import ssl
import threading
import time
import urllib.parse

from ws4py.client import WebSocketBaseClient
from ws4py.exc import HandshakeError

from gelf import __version__, fastws, wire
from gelf.links import Link
from gelf.tap import MAX_MTU

log = logging.getLogger("gelf.client")

RETRY_MIN = 1.0
RETRY_MAX = 30.0
CONNECT_TIMEOUT = 10.0


def tls_context(cacert=None, insecure=False):
    """Verify servers against the system CAs plus `cacert`, unless `insecure`."""
    context = ssl.create_default_context()
    if cacert:
        try:
            context.load_verify_locations(cacert)
        except (OSError, ssl.SSLError) as err:
            raise ValueError("cannot load CA file %s: %s" % (cacert, getattr(err, "strerror", None) or err)) from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def dial_context(urls, cacert=None, insecure=False):
    """The TLS context for dialing `urls`, after checking that each is a WebSocket URL
    (ValueError, with a message for the user, otherwise)."""
    for url in urls:
        check_url(url)
    return tls_context(cacert, insecure)


def check_url(url):
    """The URL if it is a ws:// or wss:// URL with a host, else ValueError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("%r is not a ws:// or wss:// URL" % url)
    return url


def public_url(url):
    """The URL as shown in logs and /stats: without its token."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "token"]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def explain(err):
    """One human line for why a dial failed."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return ("certificate verify failed: %s (add the server's CA with --cacert, or use --insecure)"
                % (err.verify_message or err.reason))
    if isinstance(err, HandshakeError):
        if "403" in str(err):
            return "refused with 403: wrong or missing ?token= in the URL"
        return "WebSocket handshake failed: %s" % err
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, socket.timeout):
        return "timed out"
    if isinstance(err, socket.gaierror):
        return "cannot resolve the host name"
    return str(err) or type(err).__name__


class _Connection(fastws.FastReceive, WebSocketBaseClient):
    """One WebSocket connection of a DialLink; runs in the link's dialer thread."""

    def __init__(self, link, context):
        super().__init__(link.url, headers=[("User-Agent", "gelf/%s %s" % (__version__, link.kind))])
        self.link = link
        self.reader = fastws.FrameReader(expect_masked=False, max_message=link.max_message)
        self.deliver = link.deliver
        self.sock.settimeout(CONNECT_TIMEOUT)
        if self.scheme == "wss":
            # ws4py's own TLS setup verifies nothing by default: wrap the socket with our
            # verifying context and let ws4py speak WebSocket over it.
            self.sock = context.wrap_socket(self.sock, server_hostname=self.host)
            self._is_secure = True
            self.scheme = "ws"

    def handshake_ok(self):
        """The dialer thread runs the connection itself (see DialLink._run)."""


class DialLink(Link):
    """A link this process dials and keeps dialing; received messages go to `deliver`."""

    masked = True

    def __init__(self, url, links, deliver, drops, context=None, kind="direct", max_message=None):
        super().__init__(public_url(check_url(url)), drops)
        self.kind = kind
        self.max_message = max_message or wire.max_message(MAX_MTU)
        self.url = url
        self.links = links
        self.deliver = deliver
        self.context = context or tls_context()
        self.state = "connecting"
        self._conn = None
        self._wake = threading.Event()
        self._reported = None
        self._dialer = threading.Thread(target=self._run, name="gelf-dial-%d" % self.id, daemon=True)

    def start(self):
        super().start()
        self._dialer.start()

    def stop(self):
        super().stop()
        self._wake.set()
        self._abort()

    def join(self, timeout):
        self._dialer.join(timeout)

    def _socket(self):
        conn = self._conn
        return conn.sock if conn is not None else None

    def _abort(self):
        conn = self._conn
        if conn is not None:
            conn.close_connection()

    def _report(self, what, level=logging.INFO):
        if what != self._reported:
            self._reported = what
            log.log(level, "link to %s: %s", self.peer, what)

    def _sleep(self, delay):
        self._wake.wait(delay * random.uniform(0.8, 1.2))

    def _run(self):
        delay = RETRY_MIN
        while not self._stopped:
            self.state = "connecting"
            conn = None
            try:
                conn = _Connection(self, self.context)
                conn.connect()
            except (OSError, HandshakeError, ValueError) as err:
                if conn is not None:
                    conn.close_connection()
                self.state = "error"
                self._report("cannot connect: %s" % explain(err), logging.WARNING)
                self._sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            self._conn = conn
            self.since = time.time()
            self.state = "open"
            self._report("open")
            delay = RETRY_MIN
            self.links.add(self)
            try:
                conn.run()  # until the connection drops
            finally:
                self.links.remove(self)
                self._conn = None
                self._reset()
            if not self._stopped:
                self.state = "closed"
                self._report("closed")
                self._sleep(delay)
