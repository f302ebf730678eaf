"""The pump: frames from the tap out to the links, messages from the links into the tap.

The reader thread polls the tap fd, drains every frame that is ready (up to one batch),
encodes them as one gelf message and offers the same bytes to every link. `deliver` is the
way back: it validates a received message, forwards it unchanged to every other link (the
server is a hub, so any connected graph of servers is one segment) and writes its frames to
the tap. Nothing that fails validation goes anywhere; each drop is counted by reason. A message
id (origin, seq) is handled once, which is what keeps cycles in the topology from storming.
"""

import errno
import logging
import os
import select
import threading
import time

from gelf import offload, pcap, wire
from gelf.seen import SeenFilter
from gelf.stats import Traffic
from gelf.switch import LOCAL

log = logging.getLogger("gelf.pump")

POLL_MS = 200  # how quickly the reader notices a stop request
WARN_AGAIN = 600.0  # seconds before the same peer's misconfiguration is warned about again
MAX_WARNINGS = 256  # (reason, origin) pairs remembered; the oldest is forgotten first
# What reading a tap whose interface was deleted (or whose namespace was) gives: it never recovers.
TAP_GONE = (errno.EBADFD, errno.ENODEV, errno.ENXIO, errno.EIO, errno.EBADF)

WARNINGS = {
    "auth": "messages from origin %s (via %s) fail authentication: its key does not match this "
            "server's; dropping them",
    "not_sealed": "origin %s (via %s) sends unencrypted frames but this server has a key: the key "
                  "does not match (give it the same --key); dropping them",
    "no_key": "origin %s (via %s) sends encrypted frames but this server has no key: the key does "
              "not match (start it with the same --key); dropping them",
}


class TapGone(Exception):
    """The tap cannot be read any more: its interface was deleted."""


class Pump:
    def __init__(self, tap, links, drops, origin=None, sealer=None, switch=None, capture=None, on_fatal=None):
        self.tap = tap
        self.on_fatal = on_fatal  # called once, with a sentence, if the tap is gone for good
        self.capture = capture or pcap.NoCapture()  # --pcap
        self.sealer = sealer
        self.switch = switch  # a MacTable with --learn; None: hub
        self.seen = SeenFilter()
        self._warned = {}  # (reason, origin) -> when it was last warned about
        self.links = links
        self.drops = drops
        self.origin = origin if origin is not None else int.from_bytes(os.urandom(4), "big")
        # Starting at the clock in ns keeps (origin, seq) unique across restarts: see docs/design.md.
        self.seq = time.time_ns()
        self.max_message = wire.max_message(tap.mtu)
        self.read = Traffic()
        self.written = Traffic()
        self._written_lock = threading.Lock()
        self._sending = threading.Lock()
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gelf-pump", daemon=True)

    def start(self):
        self._running.set()
        self._thread.start()

    def stop(self):
        self._running.clear()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    # tap -> links

    def _run(self):
        poller = select.poll()
        poller.register(self.tap.fileno(), select.POLLIN)
        try:
            while self._running.is_set():
                if not poller.poll(POLL_MS):
                    continue
                with self._sending:
                    self._send_ready()
        except TapGone as err:
            self._running.clear()
            if self.on_fatal:
                self.on_fatal(str(err))
            else:
                log.error("%s", err)

    def _send_ready(self):
        """Send what the tap has ready as one message. Callers hold `_sending`, which keeps the
        tap's frames in order and their sequence numbers unique."""
        frames = self._drain()
        if frames:
            self.seq += 1
            flags = wire.FLAG_OFFLOAD if self.tap.offload else 0
            eth = self._ethernet(frames, flags)
            if self.switch:
                self.switch.learn(eth, LOCAL)
            self._forward(wire.encode(frames, self.origin, self.seq, flags, sealer=self.sealer), eth)

    def _drain(self):
        """Every frame ready on the tap, up to one batch (wire.BATCH_FRAMES / BATCH_BYTES)."""
        frames = []
        size = 0
        while len(frames) < wire.BATCH_FRAMES and size < wire.BATCH_BYTES:
            try:
                frame = self.tap.read()
            except OSError as err:
                if err.errno in TAP_GONE:
                    raise TapGone("the tap %s is gone (its interface or its network namespace was "
                                  "deleted): %s" % (self.tap.name, err.strerror)) from None
                log.warning("reading %s failed: %s", self.tap.name, err)
                break
            if frame is None:
                break
            frames.append(frame)
            size += len(frame)
        self.read.add(size, len(frames))
        self.capture.frames(frames, self.tap.offload)
        return frames

    # links -> tap

    def deliver(self, data, link=None):
        """Validate one received message, forward it to the other links, write its frames to the tap."""
        drops = link.drops if link is not None else self.drops
        if not data:
            drops.add("empty")
            return
        if len(data) > self.max_message:
            drops.add("oversize")
            return
        try:
            message = wire.decode(data, self.tap.mtu, self.sealer)
        except wire.WireError as err:
            drops.add(err.reason)
            self._warn_once(err.reason, data, link)
            log.debug("dropped message from %s: %s", link.peer if link else "?", err)
            return
        if message.origin == self.origin:
            drops.add("loop")  # our own message came back around
            return
        if not self.seen.fresh(message.origin, message.seq):
            drops.add("replay")  # a replay, or a copy that came by another path
            return
        eth = self._ethernet(message.frames, message.flags)
        if self.switch:
            self.switch.learn(eth, link)
        offloaded = message.flags & wire.FLAG_OFFLOAD
        for frame, ethernet in zip(message.frames, eth):
            if self.switch and not self._is_local(ethernet):
                continue
            try:
                self._write(frame, offloaded)
            except offload.OffloadError as err:
                drops.add("offload")
                log.debug("cannot unpack a super-frame: %s", err)
            except OSError as err:
                drops.add("tap_write")
                log.debug("writing to %s failed: %s", self.tap.name, err)
        # Forwarded after the tap has it: the local host's answer need not wait for the copies
        # to every other link (a hub with many links).
        self._forward(data, eth, exclude=link)
        # The kernel answers some frames while we write them (an echo reply, a TCP ACK): they
        # are on the tap already. Sending them from this thread saves waking the reader thread
        # and handing it the GIL, a good part of a round trip; if the reader is busy, it has them.
        if self._sending.acquire(blocking=False):
            try:
                self._send_ready()
            except TapGone:
                pass  # the reader thread reports it
            finally:
                self._sending.release()

    def _write(self, frame, offloaded):
        """Write one received frame, matching the sender's offload to our tap's."""
        tap = self.tap
        if offloaded and not tap.offload:
            frames = offload.to_frames(frame)  # the software fallback: segments, checksums
            for plain in frames:
                tap.write(plain)
        elif tap.offload and not offloaded:
            tap.write_parts((offload.PLAIN, frame))
            frames = (frame,)
        else:
            tap.write(frame)
            frames = (frame,)
        with self._written_lock:
            for written in frames:
                self.written.add(len(written))
        self.capture.frames(frames, bool(offloaded and tap.offload))

    @staticmethod
    def _ethernet(frames, flags):
        """The Ethernet frames themselves (without a virtio header), for switching."""
        if flags & wire.FLAG_OFFLOAD:
            return [memoryview(frame)[offload.VNET_HDR_SIZE:] for frame in frames]
        return frames

    def _forward(self, message, frames, exclude=None):
        """Offer a message to the links that need it: all but `exclude` (hub), or with --learn
        only those where its destinations were learned."""
        ports = self.switch.destinations(frames) if self.switch else None
        if ports is not None:
            live = set(self.links)
            if all(port is LOCAL or port in live for port in ports):
                for link in ports:
                    if link is not LOCAL and link is not exclude:
                        link.offer(message)
                return
        self.links.offer(message, exclude=exclude)

    def _is_local(self, frame):
        ports = self.switch.destinations([frame])
        return ports is None or LOCAL in ports

    def _warn_once(self, reason, data, link):
        """One warning per misconfigured peer (origin) every WARN_AGAIN seconds, not one per
        message. The table is bounded by forgetting the oldest entry, so a peer inventing
        origins cannot use warnings up: a real mismatch later is still reported."""
        text = WARNINGS.get(reason)
        if text is None:
            return
        key = (reason, bytes(data[4:8]).hex())
        now = time.monotonic()
        last = self._warned.pop(key, None)
        if last is not None and now - last < WARN_AGAIN:
            self._warned[key] = last
            return
        if len(self._warned) >= MAX_WARNINGS:
            self._warned.pop(next(iter(self._warned)))
        self._warned[key] = now
        log.warning(text, key[1], "link %d %s" % (link.id, link.peer) if link else "?")
