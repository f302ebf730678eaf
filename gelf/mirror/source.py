"""Where capture mode's events come from: live capture, then TCP reassembly.

This is the one place that joins capture.py and reassembly.py (docs/mirror.md) to the outputs:
`live_events` yields lists of Events until `stop` is set. Tests and --replay feed the
Dispatcher from other sources; nothing else in the outputs knows where events come from.
"""

import socket
import time

from gelf.mirror import capture, reassembly
from gelf.options import UserError


def check_privileges():
    """Capture needs CAP_NET_RAW (an AF_PACKET socket): say so before anything is created."""
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0).close()
    except PermissionError:
        raise UserError("capturing packets needs CAP_NET_RAW: run as root, or give the program the "
                        "capability (setcap cap_net_raw+ep, or AmbientCapabilities=CAP_NET_RAW in a "
                        "systemd unit)") from None
    except OSError as err:
        raise UserError("cannot open a packet socket: %s" % (err.strerror or err)) from None


def live_events(port, bind, stop, responses=False, tick=0.25):
    """Batches of Events for the connections to `port` (to address `bind` only, if given)."""
    try:
        live = capture.LiveCapture([port], bind=bind, responses=responses)
    except capture.CaptureError as err:  # no CAP_NET_RAW, a bad --bind, no packet ring...
        raise UserError(str(err)) from None
    reassembler = reassembly.Reassembler([port], responses=responses)
    next_expire = time.monotonic() + tick
    try:
        while not stop.is_set():
            batch = []
            for segment in live.read(timeout=tick):
                batch += reassembler.feed(segment, time.time())
            if time.monotonic() >= next_expire:
                next_expire = time.monotonic() + tick
                batch += reassembler.expire(time.time())
            if batch:
                yield batch
        yield reassembler.shutdown(time.time())
    finally:
        live.close()
