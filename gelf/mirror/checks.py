"""gelf-mirror's start-up checks: every mistake a user can make, found before anything is
created (no socket bound, no file written, no thread started), each one line for the user
(options.UserError). The result is a Plan that the run in cli.py follows.
"""

import errno
import ipaddress
import socket
from typing import NamedTuple

from gelf import keys, options, wire
from gelf.client import tls_context
from gelf.mirror import events, flags, replay, source, upstreams
from gelf.mirror.outputs import file as file_output
from gelf.options import UserError


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
    settings: object = None  # flags.Settings: filters, comparison, --stats


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
    return options.load_tls(args.ssl_cert, args.ssl_key)


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
    settings = flags.check(args, mode)
    if mode == "capture":
        source.check_privileges()
    record = None
    if args.record:
        try:
            record = file_output.open_record(args.record)
        except OSError as err:
            raise UserError("cannot write --record file %s: %s" % (args.record, err.strerror or err)) from None
    return Plan(mode, port, bind, found, sealer, token, tls, context, record, settings)
