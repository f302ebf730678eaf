"""End to end: gelf servers whose taps sit in separate network namespaces, joined by a page in
headless Chromium. Traffic between the namespaces can only pass through the page."""

import hashlib
import os
import signal
import time

import pytest

import helpers
from helpers import PYTHON, ping, wait_link_state, wait_ping

pytestmark = pytest.mark.usefixtures("need_root", "need_chromium")

ADDR = ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
TRANSFER_BYTES = 10 * 1024 * 1024
TCP_PORT = 5001

RECEIVER = r"""
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(60)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(60)
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b)
    n += len(b)
print("received", n, h.hexdigest(), flush=True)
"""

SENDER = r"""
import socket, sys
data = open(sys.argv[3], "rb").read()
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
c.settimeout(60)
while c.recv(1 << 16):
    pass
print("sent", len(data), flush=True)
"""


def servers_in_namespaces(gelf_server, ns_addr, n):
    """n servers, server i's tap in its own namespace with address ADDR[i]."""
    servers = [gelf_server() for _ in range(n)]
    spaces = [ns_addr(s, ADDR[i]) for i, s in enumerate(servers)]
    return servers, spaces


def assert_pings(ns, addr, count=20):
    assert wait_ping(ns, addr, timeout=15), f"{ns} never reached {addr} through the page"
    loss, out = ping(ns, addr, count=count)
    assert loss == 0, f"ping {ns} -> {addr} lost {loss}%:\n{out}"


def assert_pings_fail(ns, addr):
    """Traffic has stopped: within 10 s the pings go unanswered, and then stay so."""
    deadline = time.monotonic() + 10
    while True:
        loss, out = ping(ns, addr, count=3, interval=0.2)
        if loss == 100 or time.monotonic() > deadline:
            break
    assert loss == 100, f"ping {ns} -> {addr} still answered after the page closed:\n{out}"
    loss, out = ping(ns, addr, count=5)
    assert loss == 100, f"ping {ns} -> {addr} answered after the page closed:\n{out}"


def test_two_servers_via_form(gelf_server, ns_addr, open_page, bg, tmp_path):
    (s1, s2), (ns1, ns2) = servers_in_namespaces(gelf_server, ns_addr, 2)

    page = open_page(s1.url + "/")
    wait_link_state(page, s1.port, "open")  # the page's own server
    helpers.add_peer(page, s2.port)
    wait_link_state(page, s2.port, "open")
    wait_link_state(page, s1.port, "open")

    assert_pings(ns1, ADDR[1], count=20)

    # 10 MiB of random data over TCP, ns1 -> ns2, checked end to end by SHA-256.
    data = os.urandom(TRANSFER_BYTES)
    src = tmp_path / "payload.bin"
    src.write_bytes(data)
    receiver = bg(["ip", "netns", "exec", ns2, PYTHON, "-c", RECEIVER, ADDR[1], str(TCP_PORT)],
                  name="tcp receiver (ns2)")
    assert receiver.pump.wait_line(r"^ready$", 10), "receiver did not start"
    sender = bg(["ip", "netns", "exec", ns1, PYTHON, "-c", SENDER, ADDR[1], str(TCP_PORT),
                 str(src)], name="tcp sender (ns1)")
    assert sender.wait(120) == 0, f"sender failed:\n{sender.pump.text()}"
    m = receiver.pump.wait_line(r"^received (\d+) ([0-9a-f]{64})$", 30)
    assert m, f"receiver did not finish:\n{receiver.pump.text()}"
    assert int(m.group(1)) == TRANSFER_BYTES
    assert m.group(2) == hashlib.sha256(data).hexdigest()

    # The page's counters and the servers' /stats saw the traffic.
    for port in (s1.port, s2.port):
        for counter in ("rx-frames", "rx-bytes", "tx-frames", "tx-bytes"):
            assert helpers.link_counter(page, port, counter) > 0, (port, counter)
    relay = page.evaluate("window.gelfRelay.links.map(l => [l.url, l.state])")
    assert sorted(relay) == sorted([[s1.ws_url, "open"], [s2.ws_url, "open"]])
    for s in (s1, s2):
        st = s.stats()
        assert st["tap"]["name"] == s.dev
        assert st["tap"]["read_frames"] > 0 and st["tap"]["written_frames"] > 0
        browsers = [l for l in st["links"] if l["kind"] == "browser"]
        assert len(browsers) == 1, st["links"]
        assert browsers[0]["rx_messages"] > 0 and browsers[0]["tx_messages"] > 0


def test_three_servers_one_page(gelf_server, ns_addr, open_page):
    servers, spaces = servers_in_namespaces(gelf_server, ns_addr, 3)
    page = open_page(servers[0].url + "/")
    for s in servers[1:]:
        helpers.add_peer(page, s.port)
    for s in servers:
        wait_link_state(page, s.port, "open")

    for i, ns in enumerate(spaces):
        for j in range(3):
            if i != j:
                assert_pings(ns, ADDR[j], count=5)


def test_peer_url_parameter(gelf_server, ns_addr, open_page):
    (s1, s2), (ns1, ns2) = servers_in_namespaces(gelf_server, ns_addr, 2)
    page = open_page(f"{s1.url}/?peer=127.0.0.1:{s2.port}")
    wait_link_state(page, s1.port, "open")
    wait_link_state(page, s2.port, "open")
    assert_pings(ns1, ADDR[1], count=10)
    assert_pings(ns2, ADDR[0], count=10)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_page_close_and_server_restart(gelf_server, ns_addr, open_page, sig):
    (s1, s2), (ns1, ns2) = servers_in_namespaces(gelf_server, ns_addr, 2)
    url = f"{s1.url}/?peer=127.0.0.1:{s2.port}"

    page = open_page(url)
    wait_link_state(page, s2.port, "open")
    assert_pings(ns1, ADDR[1], count=10)

    # Closing the page is closing the only path between the taps.
    page.close()
    assert_pings_fail(ns1, ADDR[1])

    # Reopening it restores the link.
    page = open_page(url)
    wait_link_state(page, s1.port, "open")
    wait_link_state(page, s2.port, "open")
    assert_pings(ns1, ADDR[1], count=10)

    # Server 2 dies; the page notices.
    mac = helpers.link_mac(s2.dev, ns2)
    s2.proc.send_signal(sig)
    s2.proc.wait(10)
    wait_link_state(page, s2.port, None, timeout=10)
    helpers.wait_for(lambda: not helpers.iface_exists(s2.dev, ns2), 5,
                     what=f"{s2.dev} to disappear from {ns2}")

    # Same port, same tap name, same address (and MAC, like the same host coming back).
    s2.start()
    up = time.monotonic()
    ns_addr(s2, ADDR[1], ns=ns2, mac=mac)
    # Links retry with a 1 s..30 s backoff: the page is back within 5 s of the server.
    wait_link_state(page, s2.port, "open", timeout=max(0.5, 5 - (time.monotonic() - up)))
    wait_link_state(page, s1.port, "open")
    assert_pings(ns1, ADDR[1], count=10)
