"""Command line: parse, check what the user can get wrong, then run the server until a signal."""

import argparse
import errno
import logging
import socket
import sys

import cherrypy

from gelf import __version__, server
from gelf.links import LinkSet
from gelf.pump import Pump
from gelf.stats import Drops
from gelf.tap import MAX_MTU, MIN_MTU, Tap, TapError

log = logging.getLogger("gelf")


class UserError(Exception):
    """A mistake in how gelf was started: one line to the user, exit status 1."""


def _port(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a port number" % text) from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("port %d is out of range (1..65535)" % value)
    return value


def _mtu(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text) from None
    if not MIN_MTU <= value <= MAX_MTU:
        raise argparse.ArgumentTypeError("MTU %d is out of range (%d..%d)" % (value, MIN_MTU, MAX_MTU))
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="gelf",
        description="Ethernet over WebSockets: create a tap device and serve the relay page. "
        "Open http://HOST:PORT/ in a browser that can reach several gelf servers and add "
        "them: their taps become one Ethernet segment.",
    )
    parser.add_argument("port", type=_port, help="TCP port for the relay page and the /ws WebSocket")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s; 0.0.0.0 or :: for all)")
    parser.add_argument("--dev", metavar="NAME",
                        help="name of the tap device to create (default: the first free tapN)")
    parser.add_argument("--mtu", type=_mtu, default=1500,
                        help="MTU of the tap; frames up to MTU+18 bytes are carried (default: %(default)s)")
    parser.add_argument("-d", "--debug", action="store_true",
                        help="log every link event and dropped message, and CherryPy's own log")
    parser.add_argument("--version", action="version", version="gelf " + __version__)
    return parser


def setup_logging(debug):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[Gelf] %(message)s"))
    root = logging.getLogger("gelf")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


def check_port(host, port):
    """Fail early, with a clear reason, if the server could not bind host:port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UserError("cannot listen on %s: %s" % (host, err.strerror)) from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError("port %d on %s is already in use" % (port, host)) from None
            if err.errno == errno.EACCES:
                raise UserError("port %d is privileged: run as root or pick a port above 1023" % port) from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise UserError("address %s is not on this machine" % host) from None
            raise UserError("cannot listen on %s port %d: %s" % (host, port, err.strerror)) from None


def run(args):
    check_port(args.host, args.port)
    tap = Tap(args.dev, args.mtu)
    log.info("Created interface: %s", tap.name)
    engine = cherrypy.engine
    links = LinkSet()
    drops = Drops()
    pump = Pump(tap, links, drops)
    try:
        server.mount(engine, args.host, args.port, tap, pump, links, drops, debug=args.debug)
        engine.signal_handler.handlers = {"SIGTERM": engine.exit, "SIGINT": engine.exit}
        engine.signal_handler.subscribe()
        engine.subscribe("stop", pump.stop)
        engine.start()
        pump.start()
        log.info("Relay listening: %s %d", args.host, args.port)
        engine.block()
    finally:
        pump.stop()
        links.stop_all()
        tap.close()


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    try:
        run(args)
    except (UserError, TapError) as err:
        print("gelf: error: %s" % err, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
