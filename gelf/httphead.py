"""Request heads as the gate sees them: where a head ends, whether gelf will take it, and the
short answers the gate sends by itself. Bytes in, verdicts and bytes out; no sockets.

The gate (gate.py) reads a request's head before any worker thread sees the connection, so it
needs only three facts: has the blank line arrived, is the head within MAX_HEAD, and does a body
follow. Everything else about the request (its line, its headers, the 400s for malformed ones)
stays cheroot's job: the worker parses the same bytes again.
"""

from gelf import __version__

GELF_HEADER = "X-Gelf"
"""Says "this is gelf" on every response, so that a relaying page can tell gelf's refusals (a
token, an origin, TLS, a limit) from some other web server at the address it was given."""
REFUSED_HEADER = "X-Gelf-Refused"
"""On a refusal, why, in one word: token, origin, tls, limit, request."""
EXPOSED = "%s, %s" % (GELF_HEADER, REFUSED_HEADER)  # headers a page may read

MAX_HEAD = 16 * 1024
"""Largest request head the gate reads (request line and headers): Node.js's default
(--max-http-header-size). gelf's longest URL, a page with a few peers and tokens, is under 1 KiB;
at 4096 connections the heads being read take at most 64 MiB."""

REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}

TLS_ON_PLAIN_HTTP = ("The client started a TLS handshake, but this server only speaks plain HTTP on this "
                     "port: use http:// or ws://.")
PLAIN_HTTP_ON_TLS = ("The client sent a plain HTTP request, but this server only speaks HTTPS on "
                     "this port.")  # cheroot's own words for this mistake


def head_end(data, start=0):
    """The index just past the blank line that ends the head in `data`, or -1.

    The blank line is CRLF CRLF, or LF LF from a sloppy client (cheroot then answers 400 itself).
    `start` is where the previous search left off, so a head dribbled a byte at a time is scanned
    once in all, not once per byte.
    """
    start = max(0, start - 3)
    crlf = data.find(b"\n\r\n", start)
    lf = data.find(b"\n\n", start)
    if crlf < 0 and lf < 0:
        return -1
    if lf < 0 or (0 <= crlf < lf):
        return crlf + 3
    return lf + 2


def refusal_of_start(data):
    """(400, reason) if `data`, the first bytes of a request, cannot begin an HTTP request, else
    None. A request starts with its method (upper-case letters), or an empty line to be skipped.
    Without this a TLS ClientHello sent to the plain port (a wss:// link dialing ws://) would wait
    for a blank line that never comes, and its client for a TLS answer: both until a timeout."""
    first = data[:1]
    if not first or first.isupper() or first in b"\r\n":
        return None
    if first == b"\x16":
        return 400, TLS_ON_PLAIN_HTTP
    return 400, "This is not an HTTP request."


def refusal(head):
    """(status, one-line reason) if gelf will not take this complete head, else None.

    gelf has no endpoint that takes a request body, so a head announcing one is refused before a
    worker would wait for the body: that wait is what a slow client could hold a thread with.
    """
    for line in bytes(head).split(b"\n")[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return 413, "gelf takes no request body."
        if name == b"content-length":
            value = value.strip()
            if not value.isdigit():
                return 400, "Bad Content-Length."
            if int(value) > 0:
                return 413, "gelf takes no request body."
    return None


def response(status, text, why="request"):
    """A complete HTTP/1.1 response that closes the connection: status line, a plain-text reason,
    readable by any page (the reason names no secret), saying it comes from gelf and why."""
    body = (text + "\n").encode("utf-8")
    head = ["HTTP/1.1 %d %s" % (status, REASONS[status]), "Content-Type: text/plain; charset=utf-8",
            "Content-Length: %d" % len(body), "%s: %s" % (GELF_HEADER, __version__),
            "%s: %s" % (REFUSED_HEADER, why), "Access-Control-Expose-Headers: %s" % EXPOSED,
            "Access-Control-Allow-Origin: *", "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
