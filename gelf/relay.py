"""Headless relay: the page's job in a Python process, for hosts with no browser.

`gelf relay URL URL ...` dials every server and sends each message from one to all the
others, exactly once per message id (origin, seq), so relays can be combined with pages,
direct links and other relays in any topology without storms. It needs no tap and no root,
and never sees a key: it moves sealed messages it cannot read.
"""

import logging
import signal
import sys
import threading

from gelf import __version__, wire
from gelf.client import DialLink, dial_context, normalize_url
from gelf.links import LinkSet
from gelf.logs import setup_logging
from gelf.options import Parser
from gelf.loop import LinkLoop
from gelf.seen import SeenFilter
from gelf.stats import Drops

log = logging.getLogger("gelf")


class Relay:
    def __init__(self, urls, context):
        self.links = LinkSet()
        self.drops = Drops()
        self.seen = SeenFilter()
        self.loop = LinkLoop()
        self.dials = [DialLink(url, self.links, self.deliver, self.drops, self.loop, context, kind="relay")
                      for url in urls]

    def deliver(self, data, link):
        """Forward a message to every other server, unless it was already relayed."""
        try:
            message = wire.parse_header(data)
        except wire.WireError as err:
            self.drops.add(err.reason)
            return
        if not self.seen.fresh(message.origin, message.seq):
            self.drops.add("replay")
            return
        self.links.offer(data, exclude=link)

    def start(self):
        self.loop.start()
        for dial in self.dials:
            dial.start()

    def stop(self):
        for dial in self.dials:
            dial.stop()
        self.loop.stop()
        self.loop.join()
        for dial in self.dials:
            dial.join(2)


def build_parser():
    parser = Parser(
        prog="gelf relay",
        description="Relay gelf servers without a browser: every message from one server goes to "
        "all the others, as the relay page does.")
    parser.add_argument("urls", nargs="+", metavar="URL",
                        help="a server, as host:port (ws://host:port/ws), ws://host:port/ws or "
                        "wss://...; add #TOKEN (or ?token=TOKEN) for a server started with --token")
    parser.add_argument("--cacert", metavar="FILE", help="also trust this CA for wss:// servers")
    parser.add_argument("--insecure", action="store_true",
                        help="do not verify wss:// certificates (anyone on the path can then read tokens)")
    parser.add_argument("-d", "--debug", action="store_true", help="log every link event")
    parser.add_argument("--version", action="version", version="gelf " + __version__)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.urls) < 2:
        parser.error("give at least two server URLs to relay between")
    try:
        args.urls = [normalize_url(url) for url in args.urls]
        context = dial_context(args.urls, args.cacert, args.insecure)
    except ValueError as err:
        parser.error(str(err))
    setup_logging(args.debug)
    if args.insecure:
        log.warning("warning: --insecure: wss:// certificates are not verified")
    relay = Relay(args.urls, context)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("Relay linking %d servers", len(args.urls))
    relay.start()
    while not stop.wait(0.5):
        pass
    relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
