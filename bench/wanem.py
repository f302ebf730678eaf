#!/usr/bin/env python3
"""The WAN of the gelf WAN benchmark (bench/wan.py): a switch whose ports are WAN links.

    wanem.py CONTROL NAME=TAP [NAME=TAP ...]

creates one tap per port (IFF_TAP | IFF_NO_PI, no offloads: the kernel hands over finished
frames of at most 1514 bytes with their checksums done), prints "ready", then forwards Ethernet
frames between the ports as a learning switch until SIGTERM. The bench moves each tap into the
namespace of the host behind that port. Every frame leaving through a port gets the properties
of the link towards that host, in this order:

    down     the link is cut: every frame is dropped, also those already under way (flap test)
    loss     each frame is dropped with this probability
    rate     bit/s: frames are serialized at this rate behind a drop-tail queue holding
             `queue` seconds of the rate (the bottleneck router's buffer); 0 = no limit
    delay    seconds on the wire after that, plus a uniform random -jitter..+jitter; the
             order of frames is kept...
    reorder  ...except for this fraction of frames, which skip the delay and overtake
             (netem's reorder)

It stands in for `tc qdisc ... netem` and `tbf` on a router: the kernel of the machine the bench
was written on has neither sch_netem nor sch_fq (no way to delay packets in the kernel). A
frame's departure and arrival times are computed when it arrives, so the loop wakes up only to
deliver: in CPython that costs about 10 us per frame.

Control: a Unix stream socket at CONTROL, one JSON request per connection, one JSON line back:
    {"set": {"b": {"delay": 0.025, "loss": 0.01}}}  replace the properties of ports (others 0)
    {"down": true} / {"down": false}                 cut or restore every port
    {"stats": true}                                  counters (see Port.snapshot, and "syn":
        TCP SYNs without ACK the hosts sent, by destination port: connection attempts)
Every reply is {"ok": true, ...} or {"ok": false, "error": "..."}. The process also exits when
the bench that started it is gone (its parent changes), so it cannot outlive a killed bench.
"""

import heapq
import json
import os
import random
import select
import signal
import socket
import sys
import time

from pytun import IFF_NO_PI, IFF_TAP, TunTapDevice

PROPERTIES = ("delay", "jitter", "loss", "reorder", "rate", "queue")
READ_BURST = 64  # frames read from one tap before looking at the others


class Port:
    """One link: its properties, its serializer's state and its counters."""

    def __init__(self, name, tap):
        self.name = name
        self.tap = tap
        self.fd = tap.fileno()
        self.down = False
        self.configure({})
        self.free_at = 0.0  # when the serializer has sent everything queued so far
        self.last_arrival = 0.0  # frames keep their order (unless reordered)
        self.frames = self.bytes = 0
        self.drops = {"down": 0, "loss": 0, "queue": 0, "write": 0}
        self.max_queue = 0  # bytes waiting in the bottleneck queue, at most

    def configure(self, props):
        unknown = set(props) - set(PROPERTIES)
        if unknown:
            raise ValueError("unknown properties %s" % ", ".join(sorted(unknown)))
        for key in PROPERTIES:
            value = float(props.get(key, 0))
            if value < 0 or (key in ("loss", "reorder") and value > 1):
                raise ValueError("%s=%s is out of range" % (key, value))
            setattr(self, key, value)
        if self.rate and not self.queue:
            raise ValueError("a rate needs a queue (seconds of the rate)")

    def schedule(self, now, size):
        """When a frame of `size` bytes offered now arrives at the far end, or None if dropped."""
        if self.down:
            self.drops["down"] += 1
            return None
        if self.loss and random.random() < self.loss:
            self.drops["loss"] += 1
            return None
        depart = now
        if self.rate:
            start = max(now, self.free_at)
            queued = (start - now) * self.rate / 8
            if queued + size > self.queue * self.rate / 8:
                self.drops["queue"] += 1
                return None
            self.max_queue = max(self.max_queue, int(queued) + size)
            depart = self.free_at = start + size * 8 / self.rate
        if self.reorder and random.random() < self.reorder:
            return depart
        arrival = depart + self.delay
        if self.jitter:
            arrival += random.uniform(-self.jitter, self.jitter)
        arrival = self.last_arrival = max(arrival, self.last_arrival)
        return arrival

    def snapshot(self):
        props = {key: getattr(self, key) for key in PROPERTIES}
        return dict(props, down=self.down, frames=self.frames, bytes=self.bytes,
                    drops=dict(self.drops), max_queue=self.max_queue)


def tcp_syn_port(frame):
    """The destination port of an IPv4 TCP SYN (without ACK), else None."""
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    at = 14 + (frame[14] & 0x0F) * 4
    if len(frame) < at + 14 or frame[at + 13] & 0x12 != 0x02:
        return None
    return int.from_bytes(frame[at + 2:at + 4], "big")


class Switch:
    def __init__(self, ports):
        self.ports = ports
        self.by_fd = {p.fd: p for p in ports}
        self.macs = {}  # source MAC -> the port it was seen on
        self.heap = []  # (arrival time, sequence number, port, frame)
        self.seq = 0
        self.syn = {}  # destination TCP port -> SYNs seen

    def receive(self, src, frame, now):
        """A frame the host behind port `src` sent: out through the port of its destination
        (learned from source addresses), or through every other port."""
        self.macs[frame[6:12]] = src
        syn = tcp_syn_port(frame)
        if syn is not None:
            self.syn[syn] = self.syn.get(syn, 0) + 1
        dst = None if frame[0] & 1 else self.macs.get(frame[0:6])
        for port in (dst,) if dst is not None else self.ports:
            if port is src:
                continue
            arrival = port.schedule(now, len(frame))
            if arrival is not None:
                self.seq += 1
                heapq.heappush(self.heap, (arrival, self.seq, port, frame))

    def deliver(self, now):
        """Write every frame whose time has come; return the seconds until the next one."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            _, _, port, frame = heapq.heappop(heap)
            if port.down:
                port.drops["down"] += 1
                continue
            try:
                os.write(port.fd, frame)
            except OSError:  # the host's side is not up (yet): the frame is lost
                port.drops["write"] += 1
                continue
            port.frames += 1
            port.bytes += len(frame)
        return heap[0][0] - now if heap else None

    def control(self, request):
        if "set" in request:
            named = {p.name: p for p in self.ports}
            unknown = set(request["set"]) - set(named)
            if unknown:
                raise ValueError("unknown ports %s" % ", ".join(sorted(unknown)))
            for name, props in request["set"].items():
                named[name].configure(props)
        if "down" in request:
            for port in self.ports:
                port.down = bool(request["down"])
        reply = {"ok": True}
        if request.get("stats"):
            reply["ports"] = {p.name: p.snapshot() for p in self.ports}
            reply["syn"] = {str(k): v for k, v in sorted(self.syn.items())}
            reply["in_flight"] = len(self.heap)
        return reply


def serve_control(server, switch):
    conn, _ = server.accept()
    with conn:
        conn.settimeout(2)
        data = b""
        try:
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            reply = switch.control(json.loads(data))
        except (ValueError, TypeError, AttributeError, OSError) as err:
            reply = {"ok": False, "error": str(err)}
        try:
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass


def main(argv):
    if len(argv) < 3 or any("=" not in arg for arg in argv[1:]):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    parent = os.getppid()
    ports = []
    for arg in argv[1:]:
        name, tap = arg.split("=", 1)
        dev = TunTapDevice(name=tap, flags=IFF_TAP | IFF_NO_PI)
        os.set_blocking(dev.fileno(), False)
        dev.up()
        ports.append(Port(name, dev))
    switch = Switch(ports)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(argv[0])
    control.listen(4)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fds = [p.fd for p in ports] + [control.fileno()]
    print("ready", flush=True)
    clock, read = time.monotonic, os.read
    check_parent = clock() + 1
    try:
        while True:
            now = clock()
            if now > check_parent:
                if os.getppid() != parent:
                    return 0  # the bench is gone
                check_parent = now + 1
            wait = switch.deliver(now)
            ready, _, _ = select.select(fds, [], [], 1.0 if wait is None else min(wait, 1.0))
            for fd in ready:
                port = switch.by_fd.get(fd)
                if port is None:
                    serve_control(control, switch)
                    continue
                for _ in range(READ_BURST):
                    try:
                        frame = read(fd, 65536)
                    except BlockingIOError:
                        break
                    switch.receive(port, frame, clock())
    finally:
        control.close()
        os.unlink(argv[0])
        for port in ports:
            port.tap.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
