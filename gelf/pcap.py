"""--pcap: every frame crossing the tap, both directions, in a classic pcap file.

The format (tcpdump's, LINKTYPE_ETHERNET, microsecond timestamps) is a 24-byte file header and
a 16-byte header before each frame. Frames from a tap with offloads carry a virtio_net_hdr,
which is stripped: the file holds Ethernet frames (TCP super-frames of up to 64 KiB as they
are). Each batch of records is one unbuffered write, so `tcpdump -r` sees every frame at once
and never half a record. The disk stays bounded: when the file would grow past its size, it
becomes FILE.1 (replacing the older one) and a new FILE starts. A failed write (disk full)
logs one warning and ends the capture; the data path carries on.
"""

import logging
import os
import struct
import threading
import time

from gelf.offload import VNET_HDR_SIZE

log = logging.getLogger("gelf.pcap")

MAGIC = 0xA1B2C3D4  # microsecond timestamps
LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
FILE_HEADER = struct.pack("<IHHiIII", MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET)
RECORD = struct.Struct("<IIII")  # seconds, microseconds, captured length, original length


class NoCapture:
    """What the pump calls without --pcap."""

    def frames(self, frames, vnet):
        pass

    def close(self):
        pass


class Capture:
    """A pcap file of at most about `max_bytes` (plus its previous part, `path`.1); thread-safe."""

    def __init__(self, path, max_bytes):
        self.path = str(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._file = None
        self._open()  # an OSError here is the caller's to report

    def _open(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=0)
        self.size = 0
        self._put(FILE_HEADER)

    def _put(self, data):
        if self._file.write(data) != len(data):
            raise OSError("short write (disk full?)")
        self.size += len(data)

    def frames(self, frames, vnet):
        """Record frames read from or written to the tap; `vnet`: each starts with a virtio_net_hdr."""
        if self._file is None or not frames:
            return
        now = time.time()
        sec, usec = int(now), int(now % 1 * 1_000_000)
        skip = VNET_HDR_SIZE if vnet else 0
        parts = []
        for frame in frames:
            frame = memoryview(frame)[skip:]
            parts += (RECORD.pack(sec, usec, min(len(frame), SNAPLEN), len(frame)), frame[:SNAPLEN])
        data = b"".join(parts)
        with self._lock:
            if self._file is None:
                return
            try:
                if self.size + len(data) > self.max_bytes and self.size > len(FILE_HEADER):
                    self._file.close()
                    os.replace(self.path, self.path + ".1")
                    self._open()
                self._put(data)
            except (OSError, ValueError) as err:
                log.warning("warning: cannot write --pcap file %s (%s): capture stopped", self.path, err)
                self._close()

    def close(self):
        with self._lock:
            self._close()

    def _close(self):
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass
