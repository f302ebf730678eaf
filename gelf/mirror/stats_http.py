"""--stats: /stats (JSON) and /metrics (Prometheus) of a capture or --replay run, and
`gelf-mirror report [URL|FILE]`, which prints the response-comparison report from either a
running instance's /stats or a saved copy of it.

The server is the standard library's ThreadingHTTPServer in a daemon thread: two read-only
pages, asked for by people and by a Prometheus scraper now and then, need nothing more. Its
address was checked at start (flags.check_stats); binding is the first thing the run creates.
A relay serves the same two pages on its own port (relay.py), from the same Pipeline.
"""

import json
import logging
import socket
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from gelf import options
from gelf.mirror import compare_view
from gelf.mirror.flags import DEFAULT_STATS_PORT

log = logging.getLogger("gelf.mirror.stats")

FETCH_TIMEOUT = 10.0


class _Handler(BaseHTTPRequestHandler):
    server_version = "gelf-mirror"
    pipeline = None  # set on the subclass made per server

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/stats":
            body, kind = json.dumps(self.pipeline.document(), indent=1).encode() + b"\n", "application/json"
        elif path == "/metrics":
            body, kind = self.pipeline.metrics(), CONTENT_TYPE_LATEST
        else:
            self.send_error(404, "gelf-mirror serves /stats and /metrics")
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        log.debug("stats: %s - %s", self.address_string(), fmt % args)


class StatsServer:
    def __init__(self, host, port, pipeline):
        handler = type("Handler", (_Handler,), {"pipeline": pipeline})
        server_class = type("Server", (ThreadingHTTPServer,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET, "daemon_threads": True})
        self.httpd = server_class((host, port), handler)
        self.url = "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.25,),
                                        name="gelf-mirror-stats", daemon=True)

    def start(self):
        self._thread.start()
        log.info("serving %s/stats and %s/metrics", self.url, self.url)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


# ---------------------------------------------------------------- gelf-mirror report

class ReportError(Exception):
    """Why the report cannot be printed, in one line for the user."""


def load(source):
    """The /stats document from a URL (http://...), a port on 127.0.0.1, or a saved JSON file."""
    if source is None or source.isdigit():
        source = "http://127.0.0.1:%d/stats" % (int(source) if source else DEFAULT_STATS_PORT)
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=FETCH_TIMEOUT) as answer:
                text = answer.read()
        except urllib.error.HTTPError as err:
            raise ReportError("%s answered %d %s: is it a gelf-mirror --stats address?"
                              % (source, err.code, err.reason)) from None
        except (urllib.error.URLError, OSError) as err:
            why = getattr(err, "reason", None) or err
            raise ReportError("cannot reach %s (%s): is gelf-mirror running with --stats there?"
                              % (source, getattr(why, "strerror", None) or why)) from None
    else:
        try:
            with open(source, "rb") as handle:
                text = handle.read()
        except OSError as err:
            raise ReportError("cannot read %s: %s" % (source, err.strerror or err)) from None
    try:
        doc = json.loads(text)
    except ValueError:
        raise ReportError("%s is not JSON: give a gelf-mirror /stats URL or a saved copy of it" % source) from None
    if not isinstance(doc, dict) or "compare" not in doc:
        raise ReportError("%s is not a gelf-mirror /stats document (no \"compare\")" % source)
    if doc["compare"] is None:
        raise ReportError("%s: that instance runs with --no-compare: there is no comparison to report" % source)
    return doc


def report_main(argv):
    parser = options.Parser(
        prog="gelf-mirror report",
        description="Print the response-comparison report of a gelf-mirror run: match rates per upstream, "
        "latency, the top mismatching requests.")
    parser.add_argument("source", nargs="?", metavar="URL|FILE",
                        help="a running instance's /stats URL (a relay's http://HOST:PORT/stats, or what "
                        "--stats serves), a port on 127.0.0.1, or a saved /stats JSON file (default: "
                        "http://127.0.0.1:%d/stats)" % DEFAULT_STATS_PORT)
    args = parser.parse_args(argv)
    try:
        doc = load(args.source)
        text = compare_view.report(doc["compare"])
    except ReportError as err:
        print("gelf-mirror: error: %s" % err, file=sys.stderr)
        return options.EXIT_MISTAKE
    except (KeyError, TypeError, AttributeError) as err:
        print("gelf-mirror: error: %s: the comparison in it is incomplete (%s)"
              % (args.source, err), file=sys.stderr)
        return options.EXIT_MISTAKE
    sys.stdout.write(text)
    return 0
