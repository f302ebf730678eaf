"""gelf-mirror's command line (also `gelf mirror ...`): Gopher's flags, checked before anything
is created, then one of three runs: capture, relay, or --replay of a recording.

    gelf-mirror --mode=capture --port=80 --upstream=machineB:1080
    gelf-mirror -c -p 80 -u machineB:3280 -u machineC:3280 -u machineD
    gelf-mirror -r -p 3280 -u localhost:80

Every mistake is one line, `gelf-mirror: error: ...`, exit status 1 (options.Parser), as gelf's.
"""

import argparse
import errno
import ipaddress
import logging
import signal
import socket
import ssl
import sys
import threading
import time
from typing import NamedTuple

from gelf import __version__, keys, options, wire
from gelf.client import tls_context
from gelf.logs import setup_logging
from gelf.mirror import events, replay, source, upstreams
from gelf.mirror.dispatch import Dispatcher
from gelf.mirror.outputs import file as file_output
from gelf.options import UserError

log = logging.getLogger("gelf.mirror")

READY_WAIT = 5.0  # seconds capture waits for its upstreams at start, so the first connections count
REPORT_EVERY = 10.0  # seconds between -v's progress lines


def speed(text):
    """--speed: a percentage (200% is twice as fast) or a factor (2x)."""
    text = text.strip().lower()
    try:
        value = float(text[:-1]) / (100.0 if text.endswith("%") else 1.0) if text[-1:] in ("%", "x") else None
    except ValueError:
        value = None
    if value is None or not 0.01 <= value <= 1000:
        raise argparse.ArgumentTypeError("%r is not a speed: give a percentage such as 200%% (twice as "
                                         "fast) or 50%%, or a factor such as 2x" % text)
    return value


def build_parser():
    parser = options.Parser(
        prog="gelf-mirror",
        description="Mirror live TCP traffic (a production web server's requests) to other machines, "
        "like Gopher: capture it on a port and send it to upstreams, which are plain servers (each "
        "mirrored connection replayed to them byte for byte) or gelf-mirror relays (which replay it "
        "to their own upstreams). Example: gelf-mirror -c -p 80 -u staging:8080")
    mode = parser.add_argument_group("mode")
    mode.add_argument("--mode", choices=("capture", "relay"),
                      help="capture: mirror the traffic arriving on --port (needs CAP_NET_RAW); relay: "
                      "listen on --port for capture instances and replay what they send to the upstreams")
    mode.add_argument("-c", dest="modes", action="append_const", const="capture", help="--mode=capture")
    mode.add_argument("-r", dest="modes", action="append_const", const="relay", help="--mode=relay")
    mode.add_argument("-p", "--port", type=options.port,
                      help="capture: the production port whose incoming traffic is mirrored; relay: the "
                      "port to listen on")
    mode.add_argument("-u", "--upstream", action="append", default=[], metavar="UPSTREAM",
                      help="where mirrored connections go (repeatable): HOST, HOST:PORT or [IPv6]:PORT "
                      "(port 80 if none); capture asks it once whether it is a gelf-mirror relay, "
                      "else treats it as a plain server. tcp://HOST:PORT (a plain server) or "
                      "relay://HOST:PORT (ws:// and wss:// too) say which, and skip the question")
    mode.add_argument("--bind", metavar="ADDR",
                      help="capture: only traffic to this address (IPv4 or IPv6); relay: listen on this "
                      "address only (default: every address)")
    security = parser.add_argument_group("security (as gelf's own options)")
    security.add_argument("--key", metavar="HEX",
                          help="seal streams between capture and relay with this AES-GCM key (32 or 64 hex "
                          "digits; the same on both). Visible in ps: prefer --key-file")
    security.add_argument("--key-file", metavar="PATH", help="read the key from PATH (mode 0600)")
    security.add_argument("--token", metavar="SECRET",
                          help="relay: require ?token=SECRET on /ws; capture: send it to relay upstreams")
    security.add_argument("--token-file", metavar="PATH", help="read the token from PATH (mode 0600)")
    security.add_argument("--ssl-cert", metavar="FILE", help="relay: serve wss:// with this certificate (PEM)")
    security.add_argument("--ssl-key", metavar="FILE", help="relay: private key (PEM) for --ssl-cert")
    security.add_argument("--cacert", metavar="FILE", help="also trust this CA for wss:// relay upstreams")
    security.add_argument("--insecure", action="store_true",
                          help="do not verify wss:// certificates (anyone on the path can then read tokens)")
    files = parser.add_argument_group("recordings")
    files.add_argument("--record", metavar="FILE",
                       help="also write every mirrored connection to FILE, with its timing (docs/mirror.md)")
    files.add_argument("--replay", metavar="FILE",
                       help="instead of capturing, send the connections recorded in FILE to the upstreams")
    files.add_argument("--speed", type=speed, metavar="PCT",
                       help="--replay at this pace: 200%% is twice as fast as recorded, 50%% half "
                       "(default: 100%%)")
    files.add_argument("--loop", action="store_true", help="--replay the recording again and again")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every link event, and a progress line every %g s" % REPORT_EVERY)
    parser.add_argument("--version", action="version", version="gelf-mirror " + __version__)
    return parser


class Plan(NamedTuple):
    """What to run, every option checked."""

    mode: str  # capture, relay or replay
    port: int
    bind: str
    upstreams: list
    sealer: object
    token: str
    tls: tuple
    context: object
    record: object  # the --record file, open


def choose_mode(args):
    modes = set(args.modes or ()) | ({args.mode} if args.mode else set())
    if len(modes) > 1:
        raise UserError("give one mode: --mode=capture (-c) or --mode=relay (-r), not both")
    mode = modes.pop() if modes else None
    if args.replay:
        if mode == "relay":
            raise UserError("--replay sends a recording to upstreams: it does not go with relay mode (-r)")
        if args.port:
            raise UserError("--port is what capture (-c) watches or a relay (-r) listens on: --replay needs none")
        return "replay"
    if mode is None:
        raise UserError("say what to do: -c (capture) or -r (relay) with -p PORT, or --replay FILE")
    if args.speed is not None or args.loop:
        raise UserError("%s only applies to --replay" % ("--speed" if args.speed is not None else "--loop"))
    if not args.port:
        raise UserError("%s needs -p PORT: %s" % (mode, "the production port to mirror" if mode == "capture"
                                                  else "the port to listen on for capture instances"))
    return mode


def parse_upstreams(args):
    parsed = []
    for text in args.upstream:
        try:
            upstream = upstreams.parse(text)
        except ValueError as err:
            raise UserError("-u %s" % err) from None
        try:
            socket.getaddrinfo(upstream.host, upstream.port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise UserError("-u %s: cannot resolve %s: %s" % (text, upstream.host, err.strerror)) from None
        parsed.append(upstream)
    if not parsed and not args.record:
        raise UserError("give at least one upstream: -u HOST[:PORT] (a plain server or a relay), or --record FILE")
    return parsed


def load_secret(args, name, what):
    value, path = getattr(args, name), getattr(args, name + "_file")
    if value is not None and path:
        raise UserError("give either --%s or --%s-file, not both" % (name, name))
    if path:
        return keys.read_secret_file(path, what)
    if value is not None and not value.strip():
        raise UserError("--%s must not be empty" % name)
    return value


def load_tls(args, mode):
    if not args.ssl_cert and not args.ssl_key:
        return None
    if mode != "relay":
        raise UserError("--ssl-cert/--ssl-key serve wss:// in relay mode (-r); to reach a wss:// relay, "
                        "write -u wss://HOST:PORT (and --cacert FILE for its CA)")
    if not (args.ssl_cert and args.ssl_key):
        raise UserError("--ssl-cert and --ssl-key go together")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.ssl_cert, args.ssl_key)
    except (OSError, ssl.SSLError) as err:
        raise UserError("cannot use certificate %s with key %s: %s"
                        % (args.ssl_cert, args.ssl_key, getattr(err, "strerror", None) or err)) from None
    return args.ssl_cert, args.ssl_key


def check_bind(args, mode):
    """The --bind address (None: every address), checked to be one of this machine's."""
    if not args.bind:
        return None
    try:
        address = str(ipaddress.ip_address(args.bind.strip("[]")))
    except ValueError:
        raise UserError("--bind %s is not an IPv4 or IPv6 address" % args.bind) from None
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as probe:
        try:
            probe.bind((address, 0))
        except OSError as err:
            if err.errno == errno.EADDRNOTAVAIL:
                raise UserError("--bind %s: that address is not on this machine" % address) from None
            raise UserError("--bind %s: %s" % (address, err.strerror)) from None
    return address


def check_listen(host, port):
    """The address the relay listens on: --bind, else every address (IPv6 and IPv4 where possible)."""
    for candidate in ([host] if host else ["::", "0.0.0.0"]):
        family = socket.AF_INET6 if ":" in candidate else socket.AF_INET
        try:
            with socket.socket(family) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((candidate, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError("port %d is already in use%s" % (port, " on " + host if host else "")) from None
            if err.errno == errno.EACCES:
                raise UserError("port %d is privileged: run as root or pick a port above 1023" % port) from None
            if host or candidate == "0.0.0.0":
                raise UserError("cannot listen on port %d: %s" % (port, err.strerror)) from None
            continue
        return candidate


def check(args):
    """Everything the user can get wrong, in the order a person would fix it; then the Plan."""
    mode = choose_mode(args)
    found = parse_upstreams(args)
    bind = check_bind(args, mode)
    key = load_secret(args, "key", "key")
    sealer = wire.Sealer(keys.parse_key(key, "--key-file" if args.key_file else "--key")) if key else None
    token = load_secret(args, "token", "token")
    tls = load_tls(args, mode)
    dials_relays = any(u.scheme != "tcp" for u in found)
    if mode != "relay" and not dials_relays:
        for given, flag in ((key, "--key"), (token, "--token"), (args.cacert or args.insecure, "--cacert/--insecure")):
            if given:
                raise UserError("%s is for streams to gelf-mirror relays, and every upstream is tcp:// "
                                "(a plain server)" % flag)
    if (args.cacert or args.insecure) and not any(u.scheme in ("auto", "wss") for u in found):
        raise UserError("%s only applies to wss:// relay upstreams, and none is"
                        % ("--insecure" if args.insecure else "--cacert"))
    try:
        context = tls_context(args.cacert, args.insecure)
    except ValueError as err:
        raise UserError(str(err)) from None
    if mode == "replay":
        try:
            replay.check(args.replay)
        except OSError as err:
            raise UserError("cannot read --replay file %s: %s" % (args.replay, err.strerror or err)) from None
        except events.EventError as err:
            raise UserError("--replay file %s: %s" % (args.replay, err)) from None
    port = args.port
    if mode == "relay":
        bind = check_listen(bind, port)
    if mode == "capture":
        source.check_privileges()
    record = None
    if args.record:
        try:
            record = file_output.open_record(args.record)
        except OSError as err:
            raise UserError("cannot write --record file %s: %s" % (args.record, err.strerror or err)) from None
    return Plan(mode, port, bind, found, sealer, token, tls, context, record)


def build_outputs(plan, args, on_response=None):
    outputs = [upstreams.build(u, plan.sealer, plan.token, plan.context, on_response) for u in plan.upstreams]
    if plan.record is not None:
        outputs.append(file_output.Output(args.record, plan.record))
    return outputs


def wait_ready(dispatcher, timeout=READY_WAIT):
    """Give relay links and probes a moment to connect, so the first connections are not lost."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(out.get("up", True) for out in dispatcher.stats()["outputs"]):
            return
        time.sleep(0.05)


def report(dispatcher, final=False):
    stats = dispatcher.stats()
    parts = []
    for out in stats["outputs"]:
        counts = {k: v for k, v in out.items() if isinstance(v, int) and not isinstance(v, bool) and v}
        parts.append("%s %s" % (out["name"], " ".join("%s=%d" % kv for kv in sorted(counts.items())) or "-"))
    log.info("%s%d connections, %d bytes; %s", "done: " if final else "", stats["conns"], stats["bytes"],
             "; ".join(parts))


def run_events(plan, args, dispatcher, stop):
    """Capture or replay: feed the dispatcher until the source ends or a signal comes."""
    dispatcher.start()
    wait_ready(dispatcher)
    last = time.monotonic()
    try:
        if plan.mode == "replay":
            replayer = replay.Replayer(args.replay, dispatcher, args.speed or 1.0, args.loop, stop)
            log.info("replaying %s at %g%% to %d output(s)", args.replay, (args.speed or 1.0) * 100,
                     len(dispatcher.outputs))
            replayer.run()
            return
        log.info("capturing connections to port %d%s for %d output(s)", plan.port,
                 " on " + plan.bind if plan.bind else "", len(dispatcher.outputs))
        for batch in source.live_events(plan.port, plan.bind, stop):
            dispatcher.dispatch_all(batch)
            if args.verbose and time.monotonic() - last > REPORT_EVERY:
                last = time.monotonic()
                report(dispatcher)
    finally:
        dispatcher.close(timeout=5.0)
        report(dispatcher, final=True)


def run_relay(plan, args, dispatcher):
    import cherrypy

    from gelf.mirror import relay

    engine = cherrypy.engine
    mirror = relay.MirrorRelay(dispatcher, plan.sealer)
    manager = relay.RelayLinks(mirror)
    relay.mount(engine, plan.bind, plan.port, mirror, manager, plan.token, plan.tls, debug=args.verbose)
    engine.signal_handler.handlers = {"SIGTERM": engine.exit, "SIGINT": engine.exit}
    engine.signal_handler.subscribe()
    dispatcher.start()
    wait_ready(dispatcher)  # its upstreams probed and dialed before the first stream arrives
    try:
        engine.start()
        log.info("gelf-mirror relay listening on %s port %d%s; replaying to %s", plan.bind, plan.port,
                 " (wss)" if plan.tls else "", ", ".join(o.name for o in dispatcher.outputs))
        engine.block()
    finally:
        manager.stop()
        manager.join()
        dispatcher.close(timeout=2.0)
        report(dispatcher, final=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        plan = check(args)
    except (UserError, keys.SecretError) as err:
        print("gelf-mirror: error: %s" % err, file=sys.stderr)
        return options.EXIT_MISTAKE
    dispatcher = Dispatcher(build_outputs(plan, args))
    if plan.mode == "relay":
        run_relay(plan, args, dispatcher)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        run_events(plan, args, dispatcher, stop)
    except UserError as err:  # live capture could not start (capture.py says why)
        print("gelf-mirror: error: %s" % err, file=sys.stderr)
        return options.EXIT_MISTAKE
    except events.EventError as err:  # a recording damaged past its start
        print("gelf-mirror: error: --replay file %s: %s" % (args.replay, err), file=sys.stderr)
        return options.EXIT_MISTAKE
    return 0


if __name__ == "__main__":
    sys.exit(main())
