"""Upstreams (-u): what the user wrote, and which output serves it.

Written as Gopher writes them: `host`, `host:port`, `[v6]:port` (a plain server's port defaults
to 80). Such an upstream may be a relay or a plain server, and by default capture finds out by
itself with one probe (`auto`); `relay://host:port` (or `ws://`, `wss://`) and `tcp://host:port`
say it outright and send no probe.

The probe: one TCP connection to the upstream carrying one request, `GET / HTTP/1.1` with
`Connection: close` and `User-Agent: gelf-mirror/VERSION probe`; the answer's head (at most
16 KiB, within PROBE_TIMEOUT) is read and the connection closed. A relay marks every answer with
`X-Gelf-Mirror: relay` (relay.py); anything else is a plain server. So a plain server sees one
extra request in its access log when capture starts, nothing more. A TLS relay answers plain
HTTP with gelf's 400 marked `X-Gelf-Refused: tls`; the probe then asks again over TLS (--cacert,
--insecure) and dials wss://. An upstream that cannot be reached yet is probed again with
backoff (0.5 s doubling to 30 s); until it answers, what would go to it is lost, counted
`probing`.
"""

import ipaddress
import logging
import socket
import threading
import urllib.parse
from typing import NamedTuple

from gelf import __version__, httphead
from gelf.mirror.outputs import RETRY_MAX, RETRY_MIN, Counts, Output as Base, hostport, lookup

log = logging.getLogger("gelf.mirror.upstreams")

DEFAULT_PORT = 80
SCHEMES = ("auto", "tcp", "relay", "ws", "wss")
PROBE_TIMEOUT = 3.0


class Upstream(NamedTuple):
    scheme: str  # one of SCHEMES
    host: str  # without brackets
    port: int

    def hostport(self):
        return hostport(self.host, self.port)

    def __str__(self):
        return ("" if self.scheme == "auto" else self.scheme + "://") + self.hostport()


def parse(text):
    """An Upstream from -u's text; ValueError, in words for the user, if it is not one."""
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "auto", text
    if scheme not in SCHEMES[1:] + (("auto",) if not sep else ()):
        raise ValueError("%r: unknown scheme %s:// (use tcp:// for a plain server, relay:// for a "
                         "gelf-mirror relay, or no scheme to let capture find out)" % (text, scheme))
    path_start = rest.find("/")
    if path_start >= 0:
        if scheme not in ("ws", "wss") or rest[path_start:] not in ("/", "/ws"):
            raise ValueError("%r: give host:port only (a path is allowed only as ws://host:port/ws)" % text)
        rest = rest[:path_start]
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError("%r: write an IPv6 upstream as [address]:port" % text)
        port_text = tail[1:] if tail else None
    elif rest.count(":") > 1:
        host, port_text = rest, None  # a bare IPv6 address
    else:
        host, _, port_text = rest.partition(":")
        port_text = port_text if ":" in rest else None
    if not host:
        raise ValueError("%r has no host" % text)
    if rest.startswith("[") or rest.count(":") > 1:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("%r: %s is not an IPv6 address" % (text, host)) from None
    port = DEFAULT_PORT if scheme != "wss" else 443
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError("%r has no valid port (1-65535)" % text)
        port = int(port_text)
    return Upstream(scheme, host, port)


def relay_url(upstream, token=None, tls=False):
    """The ws:// or wss:// URL a relay output dials (client.DialLink's form)."""
    scheme = "wss" if tls or upstream.scheme == "wss" else "ws"
    query = "?" + urllib.parse.urlencode({"token": token}) if token else ""
    return "%s://%s/ws%s" % (scheme, upstream.hostport(), query)


def probe(upstream, context=None, timeout=PROBE_TIMEOUT):
    """'relay', 'relay-tls' or 'plain'; OSError if the upstream cannot be reached now."""
    head = _ask(upstream, None, timeout)
    fields = _fields(head)
    if fields.get("x-gelf-mirror") == "relay":
        return "relay"
    if fields.get(httphead.REFUSED_HEADER.lower()) == "tls" and context is not None:
        if _fields(_ask(upstream, context, timeout)).get("x-gelf-mirror") == "relay":
            return "relay-tls"
    return "plain"


def _ask(upstream, context, timeout):
    request = ("GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: gelf-mirror/%s probe\r\nConnection: close\r\n\r\n"
               % (upstream.hostport(), __version__)).encode()
    with socket.create_connection((upstream.host, upstream.port), timeout) as sock:
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=upstream.host)
        sock.sendall(request)
        head = b""
        try:
            while httphead.head_end(head) < 0 and len(head) < httphead.MAX_HEAD:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
        except socket.timeout:
            pass  # a server that says nothing to HTTP: plain, as far as we can tell
        return head


def _fields(head):
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            fields[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return fields


def build(upstream, sealer=None, token=None, context=None, on_response=None):
    """The output for an upstream whose kind is known (or a Probing one that finds out)."""
    if upstream.scheme == "tcp":
        return lookup("tcp")(upstream.host, upstream.port, on_response=on_response)
    if upstream.scheme in ("relay", "ws", "wss"):
        return lookup("relay")(relay_url(upstream, token), sealer, context)
    return Probing(upstream, sealer, token, context, on_response)


class Probing(Base):
    """An `auto` upstream: probes in its own thread, then hands everything to the output it found."""

    scheme = "auto"

    def __init__(self, upstream, sealer, token, context, on_response):
        self.upstream = upstream
        self.name = str(upstream)
        self.args = (sealer, token, context, on_response)
        self.counts = Counts("probing")
        self.found = None  # the output, once the probe has answered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gelf-mirror-probe", daemon=True)

    def start(self):
        self._thread.start()

    def offer(self, event):
        found = self.found
        if found is None:
            self.counts.add("probing")
            return False
        return found.offer(event)

    def stats(self):
        if self.found is None:
            return dict(self.counts.snapshot(), upstream=self.name, up=False, state="probing")
        return dict(self.found.stats(), **self.counts.snapshot())

    def close(self, timeout=2.0):
        self._stop.set()
        self._thread.join(timeout + PROBE_TIMEOUT)
        if self.found is not None:
            self.found.close(timeout)

    def _run(self):
        sealer, token, context, on_response = self.args
        delay, said = RETRY_MIN, False
        while not self._stop.is_set():
            try:
                kind = probe(self.upstream, context)
            except OSError as err:
                if not said:
                    log.warning("upstream %s: cannot reach it to tell a relay from a plain server (%s): "
                                "trying again, less and less often", self.name, err.strerror or err)
                    said = True
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            scheme = "tcp" if kind == "plain" else "wss" if kind == "relay-tls" else "relay"
            output = build(self.upstream._replace(scheme=scheme), sealer, token, context, on_response)
            log.info("upstream %s is %s: sending to %s", self.name,
                     "a plain server" if kind == "plain" else "a gelf-mirror relay", output.name)
            output.start()
            self.found = output
            return
