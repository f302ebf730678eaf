"""gelf-mirror's flags for what is mirrored and how it is watched: filters (--sample, --rate,
--allow-path, --deny-path, --method), response comparison (--ignore-header, --no-compare) and
--stats. `add_arguments` declares them, `check` turns them into a Settings (checks.py calls it
before anything is created; every mistake one UserError line).
"""

import argparse
import errno
import ipaddress
import re
import socket
from typing import NamedTuple

from gelf.mirror import pipeline
from gelf.options import UserError

DEFAULT_STATS_PORT = 3290  # what `gelf-mirror report` asks when given nothing (127.0.0.1)
TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token: methods and header names


class Settings(NamedTuple):
    filters: object  # filters.Chain, or None when no filter flag was given
    compare: bool
    ignore_headers: object  # list of names, or None for compare.DEFAULT_IGNORE
    stats: object  # (host, port) for --stats, or None


def percent(text):
    """--sample: 0 < PCT <= 100 (a trailing % is allowed)."""
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        value = None
    if value is None or not 0 < value <= 100:
        raise argparse.ArgumentTypeError("%r is not a percentage of connections: give a number above 0 "
                                         "and at most 100, such as 10 or 12.5%%" % text)
    return value


def rate(text):
    """--rate: new connections per second, > 0."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("%r is not a rate: give new connections per second, a number "
                                         "above 0 such as 100 or 0.5" % text)
    return value


def add_arguments(parser):
    what = parser.add_argument_group(
        "what is mirrored (filters, applied in capture or relay; docs/mirror.md)")
    what.add_argument("--sample", type=percent, metavar="PCT",
                      help="mirror only PCT %% of connections (0 < PCT <= 100), whole, chosen by a hash of "
                      "their addresses so that every instance keeps the same ones")
    what.add_argument("--rate", type=rate, metavar="N",
                      help="mirror at most N new connections per second (N > 0); the others are left out whole")
    what.add_argument("--allow-path", action="append", default=[], metavar="REGEX",
                      help="HTTP: mirror only requests whose target (path and query) matches one REGEX "
                      "(Python re.search; ^/api/ for a prefix; repeatable). Streams that are not HTTP "
                      "are then left out")
    what.add_argument("--deny-path", action="append", default=[], metavar="REGEX",
                      help="HTTP: leave out requests whose target matches REGEX (repeatable)")
    what.add_argument("--method", metavar="M[,M...]",
                      help="HTTP: mirror only requests with these methods, e.g. GET,HEAD")
    cmp = parser.add_argument_group(
        "response comparison (on by default: capture also follows the server-to-client direction "
        "and pairs production's answers with each plain-server upstream's)")
    cmp.add_argument("--ignore-header", action="append", metavar="NAME",
                     help="leave header NAME out of the headers comparison (repeatable). Names given "
                     "replace the default list: Date, Server, Set-Cookie, ETag, Last-Modified, Age, Expires")
    cmp.add_argument("--no-compare", action="store_true",
                     help="do not compare responses (capture then follows only the client-to-server "
                     "direction)")
    cmp.add_argument("--stats", metavar="[ADDR:]PORT",
                     help="serve /stats (JSON) and /metrics (Prometheus) on ADDR:PORT (127.0.0.1 if no "
                     "ADDR; default: none, and a relay serves both on its own port). `gelf-mirror report "
                     "[URL|FILE]` prints the comparison report from it (default "
                     "http://127.0.0.1:%d/stats)" % DEFAULT_STATS_PORT)


def parse_hostport(text, flag):
    """(host, port) from ADDR:PORT, [V6]:PORT or PORT (127.0.0.1)."""
    text = text.strip()
    host, port_text = "127.0.0.1", text
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        port_text = tail[1:] if bracket and tail.startswith(":") else ""
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UserError("%s %s: give [ADDR:]PORT with a port 1-65535, e.g. 127.0.0.1:%d"
                        % (flag, text, DEFAULT_STATS_PORT))
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise UserError("%s %s: %s is not an IPv4 or IPv6 address" % (flag, text, host)) from None
    return host, int(port_text)


def check_stats(args, mode):
    if not args.stats:
        return None
    host, port = parse_hostport(args.stats, "--stats")
    if mode == "relay" and port == args.port:
        raise UserError("--stats %s: a relay already serves /stats and /metrics on its port %d; give "
                        "another port, or leave --stats out" % (args.stats, port))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError("--stats: port %d is already in use on %s" % (port, host)) from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise UserError("--stats %s: that address is not on this machine" % host) from None
            if err.errno == errno.EACCES:
                raise UserError("--stats: port %d is privileged: run as root or pick a port above 1023"
                                % port) from None
            raise UserError("--stats %s: %s" % (args.stats, err.strerror)) from None
    return host, port


def _regexes(flag, texts):
    compiled = []
    for text in texts:
        try:
            compiled.append(re.compile(text))
        except re.error as err:
            raise UserError("%s %r is not a valid regular expression: %s" % (flag, text, err)) from None
    return [r.pattern for r in compiled]


def check(args, mode):
    """The Settings for these flags; UserError for the first mistake."""
    methods = []
    if args.method is not None:
        methods = [m.strip().upper() for m in args.method.split(",")]
        if not all(TOKEN.match(m) for m in methods):
            raise UserError("--method %r: give HTTP methods separated by commas, e.g. GET,POST" % args.method)
    allow = _regexes("--allow-path", args.allow_path)
    deny = _regexes("--deny-path", args.deny_path)
    ignore = None
    if args.ignore_header:
        bad = [n for n in args.ignore_header if not TOKEN.match(n.strip())]
        if bad:
            raise UserError("--ignore-header %r is not a header name" % bad[0])
        if args.no_compare:
            raise UserError("--ignore-header is for response comparison, and --no-compare turns it off")
        ignore = [n.strip() for n in args.ignore_header]
    filters = pipeline.build_filters(args.sample, args.rate, allow, deny, methods)
    return Settings(filters, not args.no_compare, ignore, check_stats(args, mode))
