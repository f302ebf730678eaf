"""Command line: parse, check what the user can get wrong, then run the server until a signal."""

import errno
import grp
import ipaddress
import logging
import os
import pwd
import socket
import sys
import threading

import cherrypy
from cherrypy.process.plugins import DropPrivileges

from gelf import __version__, gate, guard, keys, loop, options, pcap, server, wire
from gelf.client import DialLink, dial_context, normalize_url
from gelf.links import LinkSet
from gelf.logs import setup_logging
from gelf.pump import Pump
from gelf.stats import Drops
from gelf.switch import MacTable
from gelf.options import UserError
from gelf.tap import MAX_MTU, MIN_MTU, Tap, TapError, check_bridge, interface_is_up

log = logging.getLogger("gelf")


class TapLost(Exception):
    """The tap vanished while gelf ran (exit status 3: systemd's Restart=on-failure makes a new one)."""


EXIT_TAP_LOST = 3
_mtu = options.in_range("MTU", int, MIN_MTU, MAX_MTU)


def build_parser():
    parser = options.Parser(
        prog="gelf",
        description="Ethernet over WebSockets: create a tap device and serve the relay page. "
        "Open http://HOST:PORT/ in a browser that can reach several gelf servers and add "
        "them: their taps become one Ethernet segment. 'gelf relay URL URL ...' relays "
        "without a browser (see 'gelf relay --help').",
    )
    parser.add_argument("port", type=options.port, help="TCP port for the relay page and the /ws WebSocket")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s; 0.0.0.0 or :: for all)")
    parser.add_argument("--dev", metavar="NAME",
                        help="name of the tap device to create (default: the first free tapN)")
    parser.add_argument("--mtu", type=_mtu, default=1500,
                        help="MTU of the tap; frames up to MTU+18 bytes are carried (default: %(default)s)")
    parser.add_argument("--no-offload", dest="offload", action="store_false",
                        help="open the tap without GSO/TSO offloads: every frame at most MTU+18 bytes "
                        "(by default TCP super-frames of up to 64 KiB travel whole; peers without "
                        "offloads get them split)")
    parser.add_argument("--address", metavar="CIDR", action="append", default=[], type=options.cidr,
                        help="put this IPv4 or IPv6 address on the tap, e.g. 10.10.10.1/24 (repeatable)")
    parser.add_argument("--bridge", metavar="BR", help="add the tap to this existing Linux bridge")
    parser.add_argument("--learn", action="store_true",
                        help="switch instead of hub: learn MAC addresses per link and send unicast "
                        "frames only where their destination is")
    capture = parser.add_argument_group("capture")
    capture.add_argument("--pcap", metavar="FILE",
                         help="write every frame read from or written to the tap to FILE, a pcap file "
                         "for tcpdump -r or Wireshark")
    capture.add_argument("--pcap-size", metavar="MB", type=options.megabytes, default=100,
                         help="when the --pcap file reaches this size it becomes FILE.1 (replacing the "
                         "previous one) and a new FILE starts: at most twice this on disk "
                         "(default: %(default)s)")
    links = parser.add_argument_group("direct links")
    links.add_argument("--connect", metavar="URL", action="append", default=[],
                       help="also dial this server, no browser needed: host:port (ws://host:port/ws), "
                       "ws://host:port/ws or wss://...; add #TOKEN (or ?token=TOKEN) if it has one; "
                       "repeatable; reconnects by itself")
    links.add_argument("--cacert", metavar="FILE", help="also trust this CA for wss:// links")
    links.add_argument("--insecure", action="store_true",
                       help="do not verify wss:// certificates (anyone on the path can then read tokens)")
    security = parser.add_argument_group("security")
    security.add_argument("--enc", action="store_true",
                          help="encrypt frames end to end (AES-GCM) with a new random 128-bit key, printed "
                          "at start; give it to the other servers with --key")
    security.add_argument("--key", metavar="HEX",
                          help="encrypt with this key (32 or 64 hex digits); implies --enc. Visible in ps: "
                          "prefer --key-file")
    security.add_argument("--key-file", metavar="PATH",
                          help="read the key (hex) from PATH, which must not be readable by group or others")
    security.add_argument("--token", metavar="SECRET",
                          help="require ?token=SECRET on /ws, /stats and /metrics (403 otherwise); the "
                          "page and its files stay public: they hold no secret")
    security.add_argument("--token-file", metavar="PATH",
                          help="read the token from PATH (mode 0600), so it stays out of ps")
    security.add_argument("--ssl-cert", metavar="FILE", help="serve https and wss with this certificate (PEM)")
    security.add_argument("--ssl-key", metavar="FILE", help="private key (PEM) for --ssl-cert")
    security.add_argument("--allow-origin", metavar="ORIGIN", action="append", default=[],
                          help="only pages from this origin (scheme://host[:port]; repeatable), besides "
                          "this server's own page, may use it from a browser: the relay page at "
                          "another gelf server, for instance. Others get 403. Without it any web page "
                          "may (see the start-up warning)")
    security.add_argument("--user", metavar="NAME",
                          help="drop root to this user once the tap exists and the port is bound")
    security.add_argument("--group", metavar="NAME", help="group for --user (default: the user's own group)")
    limits = parser.add_argument_group(
        "limits", "what clients may hold, and for how long, so that no address can lock the others out "
        "(see README: Limits)")
    limits.add_argument("--max-connections", metavar="N", type=options.connections,
                        help="connections held at once by all clients together: requests, keep-alive "
                        "connections and WebSockets; over it a new connection gets 503 Service Unavailable "
                        "at once (default: %d, fewer if the open-files limit is lower)"
                        % gate.DEFAULT_MAX_CONNECTIONS)
    limits.add_argument("--max-per-address", metavar="N", type=options.connections, default=gate.DEFAULT_MAX_PER_ADDRESS,
                        help="connections held at once by one client address (an IPv6 /64 counts as one "
                        "address); over it, 503 at once. A page with its links needs a few (default: %(default)s)")
    limits.add_argument("--header-timeout", metavar="SECONDS", type=options.seconds, default=gate.DEFAULT_HEADER_TIMEOUT,
                        help="a request's headers must arrive within this time of their first byte, else "
                        "408 Request Timeout and the connection is closed (default: %(default)g)")
    limits.add_argument("--keepalive", metavar="SECONDS", type=options.seconds, default=loop.KEEPALIVE,
                        help="send a WebSocket ping on a link that was silent this long, and close it "
                        "when nothing comes back for as long again: a peer that vanished without "
                        "closing (a half-open connection) is gone within twice this (default: %(default)g)")
    limits.add_argument("--stall-timeout", metavar="SECONDS", type=options.seconds, default=loop.STALL,
                        help="close a link whose peer takes none of the frames waiting for it for this "
                        "long; until then only that link drops frames (default: %(default)g)")
    parser.add_argument("-d", "--debug", action="store_true",
                        help="log every link event and dropped message, and CherryPy's own log")
    parser.add_argument("--version", action="version", version="gelf " + __version__)
    return parser


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


def load_key(args):
    """The AES key, or None; announces it as the seed did."""
    if args.key and args.key_file:
        raise UserError("give either --key or --key-file, not both")
    if args.key_file:
        key = keys.parse_key(keys.read_secret_file(args.key_file, "key"), args.key_file)
    elif args.key:
        key = keys.parse_key(args.key)
    elif args.enc:
        key = keys.generate_key()
        log.info("Encryption key: %s", key.hex())
        return key
    else:
        return None
    log.info("Encryption enabled")
    return key


def load_token(args):
    if args.token and args.token_file:
        raise UserError("give either --token or --token-file, not both")
    if args.token_file:
        return keys.read_secret_file(args.token_file, "token")
    if args.token is not None and not args.token:
        raise UserError("--token must not be empty")
    return args.token


def load_tls(args):
    """(cert, key) after checking that they load together, or None."""
    return options.load_tls(args.ssl_cert, args.ssl_key)


def lookup_ids(args):
    """(uid, gid) for --user/--group, or None."""
    if not args.user:
        if args.group:
            raise UserError("--group needs --user")
        return None
    if os.geteuid() != 0:
        raise UserError("--user needs gelf to be started as root")
    try:
        entry = pwd.getpwnam(args.user)
    except KeyError:
        raise UserError("no such user: %s" % args.user) from None
    gid = entry.pw_gid
    if args.group:
        try:
            gid = grp.getgrnam(args.group).gr_gid
        except KeyError:
            raise UserError("no such group: %s" % args.group) from None
    return entry.pw_uid, gid


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def load_policy(args):
    try:
        return guard.OriginPolicy(args.allow_origin)
    except ValueError as err:
        raise UserError("--allow-origin: %s" % err) from None


def load_dial_context(args):
    """The TLS context for --connect links, after checking (and normalizing) their URLs."""
    try:
        args.connect = [normalize_url(url) for url in args.connect]
    except ValueError as err:
        raise UserError("--connect: %s" % err) from None
    try:
        return dial_context(args.connect, args.cacert, args.insecure)
    except ValueError as err:
        raise UserError(str(err)) from None


def open_capture(args):
    """The --pcap file, open and with its header written, or None."""
    if not args.pcap:
        return None
    try:
        capture = pcap.Capture(args.pcap, int(args.pcap_size * 1024 * 1024))
    except OSError as err:
        raise UserError("cannot write --pcap file %s: %s" % (args.pcap, err.strerror or err)) from None
    log.info("Capturing frames to %s (up to %g MB, then %s.1)", args.pcap, args.pcap_size, args.pcap)
    return capture


def load_limits(args):
    """The connection limits, after making room for them in the open-files limit."""
    files = gate.raise_open_files_limit()
    room = files - gate.RESERVED_FILES
    if room < 1:
        raise UserError("this process may only open %d files, too few to serve anyone: raise the limit "
                        "(ulimit -n, LimitNOFILE= in the unit)" % files)
    wanted = args.max_connections or min(gate.DEFAULT_MAX_CONNECTIONS, room)
    if wanted > room:
        raise UserError("--max-connections %d needs more open files than this process may have (%d): "
                        "give at most %d, or raise the limit (ulimit -n, LimitNOFILE= in the unit)"
                        % (wanted, files, max(room, 0)))
    return gate.Limits(wanted, args.max_per_address, args.header_timeout)


def run(args):
    limits = load_limits(args)
    sealer = wire.Sealer(key) if (key := load_key(args)) else None
    token = load_token(args)
    tls = load_tls(args)
    ids = lookup_ids(args)
    context = load_dial_context(args)
    policy = load_policy(args)
    if args.bridge:
        check_bridge(args.bridge)
    check_port(args.host, args.port)
    capture = open_capture(args)
    tap = Tap(args.dev, args.mtu, offload=args.offload)
    log.info("Created interface: %s", tap.name)
    engine = cherrypy.engine
    links = LinkSet()
    drops = Drops()
    lost = []  # why the tap was lost at run time, if it was

    def tap_lost(why):
        lost.append(why)
        threading.Thread(target=engine.exit, name="gelf-exit", daemon=True).start()

    pump = Pump(tap, links, drops, sealer=sealer, switch=MacTable() if args.learn else None, capture=capture,
                on_fatal=tap_lost)
    manager = server.WebSocketLinks(links, drops, pump.deliver, pump.max_message,
                                    keepalive=args.keepalive, stall=args.stall_timeout)
    dials = [DialLink(url, links, pump.deliver, drops, manager, context, max_message=pump.max_message)
             for url in args.connect]
    try:
        for cidr in args.address:
            tap.add_address(cidr)
        if args.bridge:
            tap.join_bridge(args.bridge)
            if not interface_is_up(args.bridge):
                log.warning("warning: bridge %s is down: nothing passes through it until "
                            "'ip link set %s up'", args.bridge, args.bridge)
        server.mount(engine, args.host, args.port, tap, pump, links, drops, manager,
                     debug=args.debug, token=token, tls=tls, policy=policy, limits=limits)
        if ids:
            DropPrivileges(engine, uid=ids[0], gid=ids[1]).subscribe()
        engine.signal_handler.handlers = {"SIGTERM": engine.exit, "SIGINT": engine.exit}
        engine.signal_handler.subscribe()
        engine.subscribe("stop", pump.stop)
        engine.start()
        pump.start()
        log.info("Relay listening: %s %d", args.host, args.port)
        if args.insecure:
            log.warning("warning: --insecure: wss:// certificates of --connect links are not verified")
        for dial in dials:
            engine.subscribe("stop", dial.stop, priority=10)  # before the link loop stops
            dial.start()
        if not (sealer or token):
            if not is_loopback(args.host):
                log.warning("warning: listening on %s with neither a key nor a token: anyone who can "
                            "reach port %d can put frames on this network", args.host, args.port)
            if not policy.allowed:
                log.warning("warning: any web page open in a browser that can reach this server (on "
                            "this machine too) can join this network through it: set --key, --token "
                            "or --allow-origin")
        engine.block()
        if lost:
            raise TapLost(lost[0])
    finally:
        pump.stop()
        manager.stop()
        manager.join()
        tap.close()
        if capture:
            capture.close()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["relay"]:
        from gelf import relay

        return relay.main(argv[1:])
    if argv[:1] == ["mirror"]:
        from gelf.mirror import cli as mirror

        return mirror.main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    try:
        run(args)
    except (UserError, TapError, keys.SecretError) as err:
        print("gelf: error: %s" % err, file=sys.stderr)
        return 1
    except TapLost as err:
        print("gelf: error: %s" % err, file=sys.stderr)
        return EXIT_TAP_LOST
    except KeyboardInterrupt:
        pass
    return 0
