"""Secrets from the command line: the encryption key and the access token.

Secrets can come from files so they need not appear in `ps` or a shell history; such files
must not be readable by group or others.
"""

import os
import stat


class SecretError(Exception):
    """A key or token that cannot be used, explained for the user."""


def generate_key():
    return os.urandom(16)


def parse_key(text, source="--key"):
    """A 128- or 256-bit key from 32 or 64 hex digits."""
    text = text.strip()
    if len(text) not in (32, 64):
        raise SecretError("%s must be 32 or 64 hex digits (a 128- or 256-bit key), got %d characters"
                          % (source, len(text)))
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise SecretError("%s is not hexadecimal" % source) from None


def read_secret_file(path, what):
    """The stripped text of a private file (mode 0600 or stricter)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise SecretError("cannot read %s file %s: %s" % (what, path, err.strerror)) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise SecretError("%s file %s is not a file (a directory?): give the file that holds the %s"
                          % (what, path, what))
    with os.fdopen(fd) as handle:
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError("%s file %s is accessible by group or others (mode %04o): chmod 600 it"
                              % (what, path, stat.S_IMODE(mode)))
        try:
            text = handle.read().strip()
        except UnicodeDecodeError:
            raise SecretError("%s file %s is not text" % (what, path)) from None
    if not text:
        raise SecretError("%s file %s is empty" % (what, path))
    return text
