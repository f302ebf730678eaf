"""How a connection passes between the gate and cheroot's worker threads, both ways.

To a worker: the gate has already read the request head from the socket, so cheroot must read
those bytes first. cheroot reads through `makefile(sock)`, a buffered reader over a
socket.SocketIO; here the raw reader is a SocketIO that returns the gate's bytes before the
socket's (PrereadIO). It stays a SocketIO because ws4py takes the socket of an upgraded
connection from `rfile.raw._sock` and then detaches the reader.

Back from a worker: a kept-alive connection comes back through HTTPServer.put_conn (the gate's
put), with whatever cheroot read ahead (a pipelined request) still in its reader, which
take_unread() hands back to the gate. A closed one comes back through GateConnection.close,
which cheroot's worker calls both for a finished connection and for one that ws4py took over
(then `linger` is set and the socket stays open).
"""

import _pyio
import socket

from cheroot import makefile
from cheroot.server import HTTPConnection


class PrereadIO(socket.SocketIO):
    """A socket's raw reader that first returns the bytes the gate already read from it."""

    def __init__(self, sock, mode="rb"):
        super().__init__(sock, mode)
        self._preread = b""

    def give(self, data):
        self._preread = data

    def take(self):
        data, self._preread = self._preread, b""
        return data

    def readinto(self, b):
        if self._preread:
            n = min(len(b), len(self._preread))
            b[:n] = self._preread[:n]
            self._preread = self._preread[n:]
            return n
        return super().readinto(b)


class GateReader(makefile.StreamReader):
    """cheroot's buffered reader over a PrereadIO, whose unread bytes the gate can take back."""

    def __init__(self, sock, mode="rb", bufsize=_pyio.DEFAULT_BUFFER_SIZE):
        _pyio.BufferedReader.__init__(self, PrereadIO(sock, "rb"), bufsize)
        self.bytes_read = 0

    def take_unread(self):
        """Everything read from the socket but not yet by cheroot (a pipelined next request)."""
        data = self._read_buf[self._read_pos:] + self.raw.take()
        self._reset_read_buf()
        return data


def gate_makefile(sock, mode="r", bufsize=_pyio.DEFAULT_BUFFER_SIZE):
    """cheroot's MakeFile, with a GateReader for reading."""
    if "r" in mode:
        return GateReader(sock, mode, bufsize)
    return makefile.StreamWriter(sock, mode, bufsize)


class GateConnection(HTTPConnection):
    """cheroot's connection, which tells the gate when a worker closes it (or ws4py takes it)."""

    gate = None
    entry = None

    def close(self):
        try:
            super().close()
        finally:
            if self.gate is not None:
                self.gate.returned(self, keep=False)
