"""What every gelf command shares about its command line: how a mistake is reported, and the
checked value types.

A mistake in how gelf was started is one line, `gelf: error: ...`, and exit status 1 (README:
"Exit status"), whether argparse finds it (a bad port, a missing value) or gelf does (a port in
use, a key file readable by others). argparse's own habit, the whole usage and status 2, is
replaced here, and an option it does not know is named as such: argparse would otherwise blame
the value after it on the next positional argument ("--hots 0.0.0.0 7001": "'0.0.0.0' is not a
valid port").
"""

import argparse
import difflib
import ssl
import sys

from gelf.tap import TapError, check_cidr

EXIT_MISTAKE = 1


class UserError(Exception):
    """A mistake in how gelf was started: one line to the user, exit status 1."""


class Parser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message):
        unknown = self._unknown_option()
        if unknown:
            near = difflib.get_close_matches(unknown, self._known_options(), n=1)
            message = "unknown option %s%s" % (unknown, " (did you mean %s?)" % near[0] if near else "")
        self.exit(EXIT_MISTAKE, "%s: error: %s (%s --help lists the options)\n" % (self.prog, message, self.prog))

    def _known_options(self):
        return [name for action in self._actions for name in action.option_strings]

    def _unknown_option(self):
        known = set(self._known_options())
        for arg in getattr(self, "_given", ()):
            if arg == "--":
                break
            if arg.startswith("-") and len(arg) > 1 and not arg[1].isdigit():
                name = arg.split("=", 1)[0]
                if name not in known and not any(k.startswith(name) for k in known if name.startswith("--")):
                    return name
        return None


def in_range(name, convert, low, high):
    """An argparse type: `convert(text)`, which must lie in [low, high]."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a valid %s" % (text, name)) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError("%s %s is out of range (%s..%s)" % (name, text, low, high))
        return value

    return parse


def cidr(text):
    """An argparse type: ADDRESS/PREFIX, checked before anything is created."""
    try:
        return check_cidr(text)
    except TapError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


port = in_range("port", int, 1, 65535)
megabytes = in_range("size in MB", float, 0.01, 1 << 20)
seconds = in_range("number of seconds", float, 0.1, 86400)
connections = in_range("number of connections", int, 1, 1 << 20)


def load_tls(cert, key):
    """(cert, key) after checking that they load together, or None when neither is given:
    --ssl-cert and --ssl-key of gelf and of gelf-mirror's relay."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise UserError("--ssl-cert and --ssl-key go together")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise UserError("cannot use certificate %s with key %s: %s"
                        % (cert, key, getattr(err, "strerror", None) or err)) from None
    return cert, key
