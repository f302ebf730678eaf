"""A raw WebSocket client for tests that need to misbehave: upgrade /ws by hand, then read,
write or withhold bytes as the test pleases. Loopback only."""

import base64
import os
import socket
import time

from gelf.fastws import Connection, Event


def upgrade(port, host="127.0.0.1", path="/ws", source=None, rcvbuf=None, context=None,
            headers=(), timeout=30):
    """A socket with the /ws upgrade done (101 read), or AssertionError with the response."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source:
        sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect((host, port))
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname=host)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", *headers]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1)  # byte by byte: nothing past the handshake is consumed
        assert chunk, f"connection closed during the handshake: {response!r}"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


class Client:
    """A WebSocket client over an upgraded socket, driven by hand."""

    def __init__(self, sock):
        self.sock = sock
        self.ws = Connection(client=True, max_message=1 << 24)
        self.events = []

    def send(self, payload):
        self.sock.sendall(self.ws.send_binary(payload))

    def read_until(self, pred, timeout=30):
        """Read until pred(events) holds (or the server closes: an ("eof", None) event)."""
        deadline = time.monotonic() + timeout
        while not pred(self.events):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"read_until: last events {self.events[-3:]}")
            self.sock.settimeout(left)
            data = self.sock.recv(1 << 16)
            if not data:
                self.events.append(("eof", None))
                break
            self.events += self.ws.receive_data(data)
            out = self.ws.data_to_send()
            if out:
                self.sock.sendall(out)
        return self.events

    def closed(self, timeout=30):
        """Read until the server closes TCP; the Close event it sent, or None."""
        self.read_until(lambda ev: ev and ev[-1][0] == "eof", timeout)
        return next((v for k, v in self.events if k is Event.CLOSE), None)
