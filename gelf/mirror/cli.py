"""gelf-mirror's command line (also `gelf mirror ...`): Gopher's flags, checked before anything
is created, then one of three runs: capture, relay, or --replay of a recording.

    gelf-mirror --mode=capture --port=80 --upstream=machineB:1080
    gelf-mirror -c -p 80 -u machineB:3280 -u machineC:3280 -u machineD
    gelf-mirror -r -p 3280 -u localhost:80

    gelf-mirror report http://127.0.0.1:3290/stats

Every mistake is one line, `gelf-mirror: error: ...`, exit status 1 (options.Parser), as gelf's.
What happens to each event between its source and the outputs (filters, response comparison)
is pipeline.py's; flags.py declares and checks those flags, stats_http.py serves --stats.
"""

import argparse
import logging
import signal
import sys
import threading
import time

from gelf import __version__, keys, options
from gelf.logs import setup_logging
from gelf.mirror import compare_view, events, flags, pipeline, replay, source, stats_http, upstreams
from gelf.mirror.checks import check
from gelf.mirror.compare import Comparer
from gelf.mirror.dispatch import Dispatcher
from gelf.mirror.outputs import file as file_output
from gelf.options import UserError

log = logging.getLogger("gelf.mirror")

READY_WAIT = 5.0  # seconds capture waits for its upstreams at start, so the first connections count
REPORT_EVERY = pipeline.REPORT_EVERY  # seconds between -v's progress lines


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
        "to their own upstreams). Example: gelf-mirror -c -p 80 -u staging:8080",
        epilog="`gelf-mirror report [URL|FILE]` prints the response-comparison report of a running "
        "instance (its /stats) or of a saved /stats file; `gelf-mirror report --help` says more.")
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
    flags.add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every link event, and a progress line every %g s" % REPORT_EVERY)
    parser.add_argument("--version", action="version", version="gelf-mirror " + __version__)
    return parser


def build_outputs(plan, args, responses_for=None):
    """The outputs of the plan. `responses_for(upstream name)` gives each plain-server upstream its
    on_response(conn, data, ts) callback, carrying its on_sent (pipeline.Replies), or None."""
    outputs = [upstreams.build(u, plan.sealer, plan.token, plan.context,
                               responses_for(str(u)) if responses_for else None) for u in plan.upstreams]
    if plan.record is not None:
        outputs.append(file_output.Output(args.record, plan.record))
    return outputs


def wait_ready(dispatcher, timeout=READY_WAIT):
    """Give relay links and probes a moment to connect, so the first connections are not lost."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(out.get("up") is not False for out in dispatcher.stats()["outputs"]):  # tcp: None until tried
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


def build_pipeline(plan, args):
    """Filters and comparer of the plan, then the outputs (tcp ones get the comparer's callbacks)."""
    settings = plan.settings
    comparer = Comparer(ignore_headers=settings.ignore_headers) if settings.compare else None
    pipe = pipeline.Pipeline(settings.filters, comparer)
    return pipe.use(Dispatcher(build_outputs(plan, args, pipe.replies_for)))


def start_watching(plan, args, pipe):
    """--stats's server, and the once-a-second ticker (expire, progress line on a TTY, -v lines)."""
    server = None
    if plan.settings.stats:
        server = stats_http.StatsServer(*plan.settings.stats, pipe)
        server.start()
    screen = sys.stderr if sys.stderr.isatty() else None
    ticker = pipeline.Ticker(pipe, screen, args.verbose, lambda: report(pipe.dispatcher))
    ticker.start()
    return server, ticker


def stop_watching(server, ticker):
    ticker.stop()
    if server is not None:
        server.stop()


def run_events(plan, args, pipe, stop):
    """Capture or replay: feed the pipeline until the source ends or a signal comes."""
    server, ticker = start_watching(plan, args, pipe)
    pipe.start()
    wait_ready(pipe.dispatcher)
    try:
        if plan.mode == "replay":
            replayer = replay.Replayer(args.replay, pipe, args.speed or 1.0, args.loop, stop)
            log.info("replaying %s at %g%% to %d output(s)", args.replay, (args.speed or 1.0) * 100,
                     len(pipe.outputs))
            replayer.run()
            return
        log.info("capturing connections to port %d%s for %d output(s)", plan.port,
                 " on " + plan.bind if plan.bind else "", len(pipe.outputs))
        for batch in source.live_events(plan.port, plan.bind, stop, responses=plan.settings.compare):
            pipe.dispatch_all(batch)
    finally:
        pipe.close(timeout=5.0)
        stop_watching(server, ticker)
        report(pipe.dispatcher, final=True)
        if pipe.comparer is not None and args.verbose:
            log.info("comparison:\n%s", compare_view.report(pipe.compare_snapshot()).rstrip("\n"))


def run_relay(plan, args, pipe):
    import cherrypy

    from gelf.mirror import relay

    engine = cherrypy.engine
    mirror = relay.MirrorRelay(pipe, plan.sealer)
    manager = relay.RelayLinks(mirror)
    relay.mount(engine, plan.bind, plan.port, mirror, manager, plan.token, plan.tls, debug=args.verbose)
    engine.signal_handler.handlers = {"SIGTERM": engine.exit, "SIGINT": engine.exit}
    engine.signal_handler.subscribe()
    pipe.start()
    wait_ready(pipe.dispatcher)  # its upstreams probed and dialed before the first stream arrives
    server, ticker = start_watching(plan, args, pipe)
    try:
        engine.start()
        log.info("gelf-mirror relay listening on %s port %d%s; replaying to %s", plan.bind, plan.port,
                 " (wss)" if plan.tls else "", ", ".join(o.name for o in pipe.outputs))
        engine.block()
    finally:
        manager.stop()
        manager.join()
        pipe.close(timeout=2.0)
        stop_watching(server, ticker)
        report(pipe.dispatcher, final=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        return stats_http.report_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        plan = check(args)
    except (UserError, keys.SecretError) as err:
        print("gelf-mirror: error: %s" % err, file=sys.stderr)
        return options.EXIT_MISTAKE
    pipe = build_pipeline(plan, args)
    if plan.mode == "relay":
        run_relay(plan, args, pipe)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        run_events(plan, args, pipe, stop)
    except UserError as err:  # live capture could not start (capture.py says why)
        print("gelf-mirror: error: %s" % err, file=sys.stderr)
        return options.EXIT_MISTAKE
    except events.EventError as err:  # a recording damaged past its start
        print("gelf-mirror: error: --replay file %s: %s" % (args.replay, err), file=sys.stderr)
        return options.EXIT_MISTAKE
    return 0


if __name__ == "__main__":
    sys.exit(main())
