"""The WebSocket opening handshake's rules (RFC 6455 section 4), for both ends, without I/O.

ws4py performs the handshake (its WebSocketTool upgrades /ws, its client dials), but it answers
a malformed upgrade request with 500, takes protocol versions other than 13, and as a client it
accepts a 101 without Sec-WebSocket-Accept, Upgrade or Connection, or with an extension nobody
offered, while refusing a valid `Connection: keep-alive, Upgrade`. These checks run before
(server) and instead of (client) ws4py's.
"""

import base64
import binascii
import hashlib

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
VERSION = "13"


class HandshakeFailed(ValueError):
    """The other end's half of the handshake breaks RFC 6455."""


def accept_key(key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (both as sent: base64 text or bytes)."""
    key = key.encode("ascii") if isinstance(key, str) else key
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest()).decode("ascii")


def tokens(value):
    """The comma-separated tokens of a header value, lower case."""
    return {token.strip().lower() for token in (value or "").split(",") if token.strip()}


def check_request(method, header):
    """Why an upgrade request must be refused, as (status, text, extra headers), or None.

    `header(name)` returns a request header's value (or None), whatever the name's case.
    """
    if method != "GET":
        return 405, "The WebSocket handshake is a GET request.", {"Allow": "GET"}
    if "websocket" not in tokens(header("Upgrade")):
        return 426, "This is gelf's WebSocket endpoint: connect with a WebSocket client.", \
            {"Upgrade": "websocket", "Connection": "Upgrade"}
    if "upgrade" not in tokens(header("Connection")):
        return 400, "The Connection header must include Upgrade.", {}
    if (header("Sec-WebSocket-Version") or "").strip() != VERSION:
        return 426, "Only WebSocket version 13 (RFC 6455) is supported.", {"Sec-WebSocket-Version": VERSION}
    try:
        key = base64.b64decode((header("Sec-WebSocket-Key") or "").strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 16:
        return 400, "Sec-WebSocket-Key must be 16 bytes in base64.", {}
    return None


def check_response(header, key):
    """Raise HandshakeFailed unless a 101 response's headers complete the handshake for `key`
    (gelf offers no extension and no subprotocol)."""
    if "websocket" not in tokens(header("Upgrade")):
        raise HandshakeFailed("the response has no 'Upgrade: websocket'")
    if "upgrade" not in tokens(header("Connection")):
        raise HandshakeFailed("the response's Connection header lacks Upgrade")
    if (header("Sec-WebSocket-Accept") or "").strip() != accept_key(key):
        raise HandshakeFailed("the response's Sec-WebSocket-Accept does not match the key")
    if header("Sec-WebSocket-Extensions"):
        raise HandshakeFailed("the server chose an extension that was not offered")
    if header("Sec-WebSocket-Protocol"):
        raise HandshakeFailed("the server chose a subprotocol that was not offered")


def parse_headers(block):
    """A response's header lines (bytes, CRLF separated) as a case-insensitive getter."""
    found = {}
    for line in block.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            name = name.strip().lower()
            found[name] = "%s, %s" % (found[name], value.strip()) if name in found else value.strip()
    return lambda name: found.get(name.lower())
