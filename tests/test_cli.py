"""The command line parser and the tap wrapper's own checks (no root needed)."""

import os

import pytest

from gelf.cli import UserError, build_parser, is_loopback, load_key, load_tls, load_token, lookup_ids
from gelf.keys import SecretError
from gelf.tap import Tap, TapError, _explain


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_defaults_follow_the_seed():
    args = parse("7001")
    assert (args.port, args.host, args.dev, args.mtu, args.debug) == (7001, "127.0.0.1", None, 1500, False)


def test_all_flags():
    args = parse("--host", "0.0.0.0", "--dev", "ethws0", "--mtu", "9000", "-d", "7002")
    assert (args.host, args.dev, args.mtu, args.debug, args.port) == ("0.0.0.0", "ethws0", 9000, True, 7002)


@pytest.mark.parametrize("argv", [["0"], ["70000"], ["http"], ["--mtu", "0", "7001"],
                                  ["--mtu", "70000", "7001"], ["--mtu", "abc", "7001"], []])
def test_bad_arguments_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    assert exit_.value.code == 1  # README: "Exit status"
    err = capsys.readouterr().err
    assert err.startswith("gelf: error: ") and err.count("\n") == 1 and "usage:" not in err, err


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", "tap 0", "tap%d"])
def test_bad_tap_names_are_refused_before_touching_the_kernel(name):
    with pytest.raises(TapError, match="invalid interface name"):
        Tap(name)


def test_existing_interface_name_is_refused():
    with pytest.raises(TapError, match="lo already exists"):
        Tap("lo")


def test_mtu_out_of_range_is_refused():
    with pytest.raises(TapError, match="out of range"):
        Tap("gtx0", mtu=10)


@pytest.mark.parametrize("errno_, words", [(1, "run gelf as root"), (2, "modprobe tun"),
                                           (16, "already in use"), (22, "refused the name")])
def test_kernel_errors_are_explained(errno_, words):
    assert words in _explain(OSError(errno_, "x"), "tap9")


# Security flags: every inconsistent combination is one clear error.


@pytest.mark.parametrize("argv, loader, words", [
    (["--key", "ab" * 16, "--key-file", "/x", "1"], load_key, "either --key or --key-file"),
    (["--token", "a", "--token-file", "/x", "1"], load_token, "either --token or --token-file"),
    (["--token", "", "1"], load_token, "must not be empty"),
    (["--ssl-cert", "/c", "1"], load_tls, "go together"),
    (["--ssl-key", "/k", "1"], load_tls, "go together"),
    (["--ssl-cert", "/nonexistent", "--ssl-key", "/nonexistent", "1"], load_tls, "cannot use certificate"),
    (["--group", "nogroup", "1"], lookup_ids, "--group needs --user"),
])
def test_inconsistent_security_flags(argv, loader, words):
    with pytest.raises(UserError, match=words):
        loader(parse(*argv))


def test_enc_generates_a_key_and_key_implies_enc():
    assert len(load_key(parse("--enc", "1"))) == 16
    assert load_key(parse("--key", "ab" * 32, "1")) == bytes.fromhex("ab" * 32)
    assert load_key(parse("1")) is None
    with pytest.raises(SecretError):
        load_key(parse("--key", "xyz", "1"))


@pytest.mark.skipif(os.geteuid() != 0, reason="checks user lookup as root")
def test_unknown_user_and_group():
    with pytest.raises(UserError, match="no such user"):
        lookup_ids(parse("--user", "no-such-user-gelf", "1"))
    with pytest.raises(UserError, match="no such group"):
        lookup_ids(parse("--user", "nobody", "--group", "no-such-group-gelf", "1"))
    assert lookup_ids(parse("--user", "nobody", "1"))[0] != 0


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")
