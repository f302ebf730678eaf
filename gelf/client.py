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

from gelf import __version__, fastws, handshake, wire
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
    """The TLS context for dialing `urls` (already normalized), after checking that the TLS
    options apply to one of them (ValueError, with a message for the user, otherwise)."""
    if (cacert or insecure) and not any(url.startswith("wss://") for url in urls):
        raise ValueError("%s only applies to wss:// links, and no link is wss://"
                         % ("--insecure" if insecure else "--cacert"))
    return tls_context(cacert, insecure)


def check_url(url):
    """The URL if it is a ws:// or wss:// URL with a host and a valid port, else ValueError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("%r is not a ws:// or wss:// URL" % public_url(url))
    try:
        port = parts.port  # None: the scheme's own (80, 443)
    except ValueError:
        port = 0
    if port == 0 or parts.netloc.endswith(":"):
        raise ValueError("%r has no valid port (1-65535)" % public_url(url))
    return url


def normalize_url(text):
    """A server given as the page takes it: host:port, [v6]:port or a ws(s):// URL, each with an
    optional #token. Returns the ws(s)://host:port/ws URL (the token as ?token=); ValueError else."""
    text = text.strip()
    address, _, token = text.partition("#")
    if "#" in text and not token:
        raise ValueError("%r has an empty token after '#'" % address)
    if "://" not in address:
        if address.count(":") != 1 and not address.startswith("["):
            raise ValueError("%r is not host:port, [ipv6]:port or a ws:// URL" % address)
        address = "ws://%s/ws" % address
    parts = urllib.parse.urlsplit(address)
    if parts.path in ("", "/"):
        parts = parts._replace(path="/ws")
    if token:
        query = urllib.parse.parse_qsl(parts.query)
        if any(key == "token" for key, _ in query):
            raise ValueError("%r gives a token twice (#token and ?token=): keep one" % public_url(address))
        parts = parts._replace(query=urllib.parse.urlencode(query + [("token", token)]))
    return check_url(urllib.parse.urlunsplit(parts))


def public_url(url):
    """The URL as shown in logs and /stats: without its token."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "token"]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def explain(err, url=""):
    """One human line for why a dial failed."""
    plain = url.startswith("ws://")
    if isinstance(err, ssl.SSLError) and not isinstance(err, ssl.SSLCertVerificationError) \
            and ("WRONG_VERSION_NUMBER" in str(err) or "record layer" in str(err)):
        return "the server does not speak TLS: use ws:// for it (%s)" % (err.reason or err)
    if isinstance(err, ssl.SSLCertVerificationError):
        return ("certificate verify failed: %s (add the server's CA with --cacert, or use --insecure)"
                % (err.verify_message or err.reason))
    if isinstance(err, HandshakeError):
        if "403" in str(err):
            return "refused with 403: wrong or missing ?token= in the URL"
        if plain and "400" in str(err):
            return "the server answered 400 Bad Request: if it serves https, use wss:// for it"
        return "WebSocket handshake failed: %s" % err
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if plain and isinstance(err, ConnectionResetError):
        return "connection reset by the server: if it serves https, use wss:// for it"
    if isinstance(err, socket.timeout):
        return "timed out"
    if isinstance(err, socket.gaierror):
        return "cannot resolve the host name"
    return str(err) or type(err).__name__


class _Handshake(WebSocketBaseClient):
    """ws4py's client, for the opening handshake only; the link loop runs the connection."""

    def __init__(self, link, context):
        super().__init__(link.url, headers=[("User-Agent", "gelf/%s %s" % (__version__, link.kind))])
        self.received = b""
        self.sock.settimeout(CONNECT_TIMEOUT)
        if self.scheme == "wss":
            # ws4py's own TLS setup verifies nothing by default: wrap the socket with our
            # verifying context and let ws4py speak WebSocket over it.
            self.sock = context.wrap_socket(self.sock, server_hostname=self.host)
            self._is_secure = True
            self.scheme = "ws"

    def process_handshake_header(self, headers):
        """RFC 6455 4.1's checks of the 101 response, stricter than ws4py's (handshake.py)."""
        try:
            handshake.check_response(handshake.parse_headers(headers), self.key)
        except handshake.HandshakeFailed as err:
            raise HandshakeError(str(err)) from None
        return [], []

    def handshake_ok(self):
        """The handshake is done; DialLink hands the socket to the link loop."""

    def process(self, data):
        """Bytes that came right behind the server's handshake: the first frames."""
        self.received += data


class DialLink(Link):
    """A link this process dials and keeps dialing; received messages go to `deliver`.

    The dialer thread only dials: it connects and does the handshake (bounded by
    CONNECT_TIMEOUT), hands the socket to the link loop, and waits until the loop ends the
    connection before it dials again. /stats lists the link all along, with its state
    (connecting, open, retrying), its last error and when the next try comes.
    """

    client = True

    def __init__(self, url, links, deliver, drops, loop, context=None, kind="direct", max_message=None):
        url = normalize_url(url)
        super().__init__(public_url(url), drops, deliver)
        self.kind = kind
        self.max_message = max_message or wire.max_message(MAX_MTU)
        self.url = url
        self.links = links
        self.context = context or tls_context()
        self.state = "connecting"
        self.error = None  # why the last try failed, in words
        self.next_try = None  # when the next try comes (time.time())
        self._dials = loop
        self._stopped = False
        self._wake = threading.Event()
        self._ended = threading.Event()
        self._reported = None
        self._dialer = threading.Thread(target=self._run, name="gelf-dial-%d" % self.id, daemon=True)
        links.keep(self)

    def start(self):
        self._dialer.start()

    def stop(self):
        self._stopped = True
        self._wake.set()
        self._ended.set()
        self._dials.close(self)

    def join(self, timeout):
        self._dialer.join(timeout)

    def opened(self):
        self.links.add(self)
        self._report("open")

    def ended(self, code, why):
        self.links.remove(self)
        self.state = "closed"
        self._report("closed" + (": %s" % why if why and not self._stopped else ""))
        self._ended.set()

    def describe(self):
        info = super().describe()
        info.update(error=self.error, next_try=self.next_try)
        return info

    def _report(self, what, level=logging.INFO):
        if what != self._reported:
            self._reported = what
            log.log(level, "link to %s: %s", self.peer, what)

    def _wait(self, delay, state):
        delay *= random.uniform(0.8, 1.2)
        self.next_try = time.time() + delay
        self.state = state
        self._wake.wait(delay)

    def _run(self):
        delay = RETRY_MIN
        while not self._stopped:
            self.state = "connecting"
            self.next_try = None
            handshake = None
            try:
                handshake = _Handshake(self, self.context)
                handshake.connect()
            except (OSError, HandshakeError, ValueError) as err:
                if handshake is not None:
                    handshake.close_connection()
                self.error = explain(err, self.url)
                self._report("cannot connect: %s" % self.error, logging.WARNING)
                self._wait(delay, "retrying")
                delay = min(delay * 2, RETRY_MAX)
                continue
            self.error = None
            delay = RETRY_MIN
            self._ended.clear()
            ws = fastws.Connection(client=True, max_message=self.max_message)
            self._dials.attach(self, handshake.sock, ws, handshake.received)
            self._ended.wait()
            if not self._stopped:
                self._wait(delay, "retrying")
