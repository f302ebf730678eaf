#!/usr/bin/env python3
"""R2 of the gelf benchmark: the minimal Python tap-to-tap copier (no offloads, no batching).

    tapcopy.py TAP1 TAP2   creates both taps (IFF_TAP | IFF_NO_PI), prints "ready", then copies
                           every frame from one to the other in two threads until SIGTERM.
"""

import os
import signal
import sys
import threading

from pytun import IFF_NO_PI, IFF_TAP, TunTapDevice


def copy(src, dst):
    read, write = os.read, os.write
    while True:
        frame = read(src, 65536)
        try:
            write(dst, frame)
        except OSError:  # the other tap is down (not moved or configured yet): drop
            pass


def main(name1, name2):
    taps = [TunTapDevice(name=n, flags=IFF_TAP | IFF_NO_PI) for n in (name1, name2)]
    a, b = (t.fileno() for t in taps)
    for src, dst in ((a, b), (b, a)):
        threading.Thread(target=copy, args=(src, dst), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print("ready", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    main(*sys.argv[1:3])
