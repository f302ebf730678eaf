"""User errors: one clear `gelf: error:` line, exit status 1, no traceback, and nothing left
behind (README: "Exit status")."""

import re
import shutil
import socket
import subprocess

import pytest

import helpers
from helpers import PYTHON, REPO

ERROR_LINE = re.compile(r"^[\w.\-]+( relay)?: error: ")


def gelf(*args, prefix=(), timeout=60):
    cmd = [*prefix, PYTHON, "gelf.py", *map(str, args)]
    try:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{cmd} did not exit within {timeout}s; output:\n{e.stdout}{e.stderr}")


def assert_user_error(res, mention, prog="gelf"):
    out = res.stdout + res.stderr
    shown = f"exit {res.returncode}; output:\n{out}"
    assert res.returncode == 1, shown
    assert "Traceback" not in out, shown
    errors = [line for line in out.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1, f"expected exactly one 'error:' line; {shown}"
    line = errors[0]
    assert line.startswith(f"{prog}: error: "), shown
    others = [l for l in out.splitlines() if l.strip() and l != line and not l.startswith("[Gelf]")]
    assert not others, f"unexpected extra output {others}; {shown}"
    assert re.search(mention, line, re.I), f"error line should mention {mention!r}; {shown}"
    return line


def test_help_lists_every_option():
    res = gelf("--help")
    assert res.returncode == 0, res.stderr
    for flag in ("--host", "--dev", "--mtu", "--debug", "port"):
        assert flag in res.stdout, f"--help does not mention {flag}:\n{res.stdout}"


@pytest.mark.parametrize("args, mention", [
    (["--mtu", "0"], "mtu"),
    (["--mtu", "70000"], "mtu"),
    (["--mtu", "abc"], "mtu"),
    (["70000"], "port"),
    (["abc"], "port"),
], ids=["mtu-0", "mtu-70000", "mtu-abc", "port-70000", "port-abc"])
def test_invalid_arguments(args, mention):
    dev = helpers.tap_name()
    port = [] if args[0] in ("70000", "abc") else [helpers.free_port()]
    res = gelf("--host", "127.0.0.1", "--dev", dev, *args, *port)
    assert_user_error(res, mention)
    assert not helpers.iface_exists(dev)


def _as_nobody():
    if shutil.which("setpriv"):
        return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if shutil.which("runuser"):
        return ["runuser", "-u", "nobody", "--"]
    pytest.skip("needs setpriv or runuser to run as nobody")


NO_PERMISSION = r"root|permission|privilege|CAP_NET_ADMIN|not permitted"


@pytest.mark.usefixtures("need_root")
def test_not_root():
    dev = helpers.tap_name()
    res = gelf("--host", "127.0.0.1", "--dev", dev, helpers.free_port(), prefix=_as_nobody())
    assert_user_error(res, NO_PERMISSION)
    assert not helpers.iface_exists(dev)


@pytest.mark.usefixtures("need_root")
def test_root_without_cap_net_admin():
    dev = helpers.tap_name()
    res = gelf("--host", "127.0.0.1", "--dev", dev, helpers.free_port(),
               prefix=["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"])
    assert_user_error(res, NO_PERMISSION)
    assert not helpers.iface_exists(dev)


@pytest.mark.usefixtures("need_root")
def test_no_dev_net_tun():
    # A private mount namespace in which /dev/net is an empty tmpfs.
    dev = helpers.tap_name()
    wrap = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount -t tmpfs tmpfs /dev/net && exec "$@"', "sh"]
    res = gelf("--host", "127.0.0.1", "--dev", dev, helpers.free_port(), prefix=wrap)
    assert_user_error(res, r"/dev/net/tun|\btun\b")
    assert not helpers.iface_exists(dev)


@pytest.mark.usefixtures("need_root")
@pytest.mark.parametrize("holder", ["tuntap", "bridge", "gelf"])
def test_tap_name_taken(holder, gelf_server):
    dev = helpers.tap_name()
    if holder == "gelf":
        owner = gelf_server(dev=dev)
    elif holder == "tuntap":
        helpers.run(["ip", "tuntap", "add", "dev", dev, "mode", "tap"])
    else:
        helpers.run(["ip", "link", "add", dev, "type", "bridge"])
    try:
        res = gelf("--host", "127.0.0.1", "--dev", dev, helpers.free_port())
        assert_user_error(res, re.escape(dev))
        assert helpers.iface_exists(dev), "gelf removed an interface it did not create"
        if holder == "gelf":
            assert owner.alive() and owner.stats()["tap"]["name"] == dev
    finally:
        if holder != "gelf":
            helpers.run(["ip", "link", "del", dev], check=False)


@pytest.mark.usefixtures("need_root")
def test_port_in_use():
    dev = helpers.tap_name()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        res = gelf("--host", "127.0.0.1", "--dev", dev, port)
    assert_user_error(res, rf"\b{port}\b|in use")
    assert not helpers.iface_exists(dev), "tap left behind after the error"


@pytest.mark.usefixtures("need_root")
def test_privileged_port():
    # Root that may create taps but not bind ports below 1024.
    dev = helpers.tap_name()
    res = gelf("--host", "127.0.0.1", "--dev", dev, 80,
               prefix=["setpriv", "--bounding-set=-net_bind_service",
                       "--inh-caps=-net_bind_service"])
    assert_user_error(res, r"\b80\b")
    assert not helpers.iface_exists(dev), "tap left behind after the error"


# ---------------------------------------------------------------- issue 13, finding 6

@pytest.mark.parametrize("args, mention", [
    (["--hots", "0.0.0.0"], r"unknown option --hots \(did you mean --host\?\)"),  # not "bad port"
    (["--address", "10.1.2.3"], r"10\.1\.2\.3 has no prefix length.*10\.1\.2\.3/24"),
    (["--connect", "ws://127.0.0.1:99999/ws"], r"--connect: .*no valid port"),
    (["--connect", "127.0.0.1"], r"--connect: .*not host:port"),
    (["--insecure", "--connect", "127.0.0.1:7001"], r"--insecure only applies to wss://"),
    (["--cacert", "/etc/hostname"], r"--cacert only applies to wss://"),
    (["--key-file", "/tmp"], r"key file /tmp is not a file"),
    (["--token-file", "/tmp"], r"token file /tmp is not a file"),
    (["--allow-origin", "example.org"], r"--allow-origin: .*not an origin"),
], ids=["misspelled-option", "address-without-prefix", "connect-bad-port", "connect-no-port",
        "insecure-without-wss", "cacert-without-wss", "key-file-directory", "token-file-directory",
        "origin-without-scheme"])
def test_newcomer_mistakes_are_one_line_each(args, mention):
    dev = helpers.tap_name()
    res = gelf("--dev", dev, *args, helpers.free_port())
    assert_user_error(res, mention)
    assert not helpers.iface_exists(dev)


def test_the_relay_takes_host_port_like_the_page_and_refuses_one_url():
    res = subprocess.run([PYTHON, "gelf.py", "relay", "127.0.0.1:1"], cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    assert_user_error(res, r"at least two server URLs", prog="gelf relay")
    res = subprocess.run([PYTHON, "gelf.py", "relay", "127.0.0.1", "127.0.0.1:2"], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert_user_error(res, r"not host:port", prog="gelf relay")


@pytest.mark.usefixtures("need_root")
def test_a_bridge_that_is_down_is_named(netns):
    ns = netns()
    helpers.run(["ip", "-n", ns, "link", "set", "lo", "up"])
    helpers.run(["ip", "-n", ns, "link", "add", "br0", "type", "bridge"])  # created down
    code, out = helpers.gelf_once("--dev", helpers.tap_name(), "--bridge", "br0", str(helpers.free_port()),
                                  prefix=("ip", "netns", "exec", ns), ready=r"Relay listening")
    assert code == 0 and "warning: bridge br0 is down" in out and "ip link set br0 up" in out, out
