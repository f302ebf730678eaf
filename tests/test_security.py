"""Security end to end: encryption the page cannot read, wrong keys, replay, key files, TLS,
tokens and privilege drop. Servers' taps sit in namespaces the tests create; everything else
runs on 127.0.0.1."""

import http.client
import os
import signal
import time

import pytest

import helpers
from helpers import ADDR, assert_pings, servers_in_namespaces, wait_for

pytestmark = pytest.mark.usefixtures("need_root")

KEY = "b04c96f0e62fd14424e7e58e3d8ba957"
OTHER_KEY = "00112233445566778899aabbccddeeff"
# ping -p fills the ICMP payload with this pattern: a plaintext we can look for on the wire.
PATTERN = "6a656c6c796669736873656372657421"  # "jellyfishsecret!"


def wait_all_open(page, count, timeout=60):
    page.wait_for_function(
        "n => window.gelfRelay.links.length === n && window.gelfRelay.links.every(l => l.state === 'open')",
        arg=count, timeout=timeout * 1000, polling=100)


def relay_page(open_page, first, *others, query=""):
    """A page on `first` relaying to `others`, all links open."""
    peers = "".join(f"&peer=127.0.0.1:{s.port}" for s in others)
    page = open_page(f"{first.url}/?{query}{peers}")
    wait_all_open(page, 1 + len(others))
    return page


def capture(bg, iface, filter_, path, ns=None):
    """tcpdump writing to path; returns the process (stop it with stop_capture)."""
    cmd = ["tcpdump", "-i", iface, "-U", "-s", "0", "-w", str(path), filter_]
    if ns:
        cmd = ["ip", "netns", "exec", ns] + cmd
    proc = bg(cmd, name=f"tcpdump {iface}")
    assert proc.pump.wait_line(r"listening on", 10), proc.pump.text()
    return proc


def stop_capture(proc):
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.wait(30)


@pytest.mark.usefixtures("need_chromium")
def test_page_relays_ciphertext_it_cannot_read(gelf_server, ns_addr, open_page, bg, tmp_path):
    s1 = gelf_server(extra=["--enc", "--key", KEY])
    s2 = gelf_server(extra=["--key", KEY])
    assert "[Gelf] Encryption enabled" in s2.log_text()
    ns1, ns2 = ns_addr(s1, ADDR[0]), ns_addr(s2, ADDR[1])
    wire_pcap, tap_pcap = tmp_path / "lo.pcap", tmp_path / "tap.pcap"
    on_lo = capture(bg, "lo", f"tcp port {s1.port} or tcp port {s2.port}", wire_pcap)
    on_tap = capture(bg, s2.dev, "icmp", tap_pcap, ns=ns2)

    relay_page(open_page, s1, s2)
    assert_pings(ns1, ADDR[1], count=10)
    helpers.run(helpers.ping_cmd(ns1, ADDR[1], 10) + ["-p", PATTERN])
    stop_capture(on_lo)
    stop_capture(on_tap)

    plaintext = bytes.fromhex(PATTERN)
    assert plaintext in tap_pcap.read_bytes(), "the payload never crossed the tunnel"
    on_the_wire = wire_pcap.read_bytes()
    assert len(on_the_wire) > 20_000, "the capture of the WebSocket traffic is empty"
    assert plaintext not in on_the_wire, "plaintext payload visible in the WebSocket traffic"
    assert s1.stats()["encryption"] and s2.stats()["drops"]["auth"] == 0


@pytest.mark.usefixtures("need_chromium")
def test_different_keys_pass_nothing_and_warn_once(gelf_server, ns_addr, open_page):
    s1 = gelf_server(extra=["--key", KEY])
    s2 = gelf_server(extra=["--key", OTHER_KEY])
    s3 = gelf_server()  # no encryption at all
    spaces = [ns_addr(s, ADDR[i]) for i, s in enumerate((s1, s2, s3))]
    relay_page(open_page, s1, s2, s3)

    for target in (ADDR[1], ADDR[2]):
        loss, out = helpers.ping(spaces[0], target, count=10)
        assert loss == 100, out
    for s in (s1, s2, s3):
        assert s.stats()["tap"]["written_frames"] == 0, s.stats()
    d1, d2, d3 = (s.stats()["drops"] for s in (s1, s2, s3))
    assert d2["auth"] > 0 and d1["not_sealed"] > 0 and d3["no_key"] > 0
    # Many messages were refused, but each server warned once per mismatched peer (two each).
    for s in (s1, s2, s3):
        assert s.log_text().count("key does not match") == 2, s.log_text()


class Recorder:
    """A plain WebSocket client that keeps every binary message it receives."""

    def __init__(self, url):
        from ws4py.client.threadedclient import WebSocketClient

        recorder = self

        class Client(WebSocketClient):
            def received_message(self, message):
                if message.is_binary:
                    recorder.messages.append(bytes(message.data))

        self.messages = []
        self.ws = Client(url)
        self.ws.connect()

    def send(self, data):
        self.ws.send(data, binary=True)

    def close(self):
        self.ws.close()


def test_replayed_and_altered_messages_are_dropped(gelf_server, ns_addr):
    s1 = gelf_server(extra=["--key", KEY])
    s2 = gelf_server(extra=["--key", KEY])
    ns1 = ns_addr(s1, ADDR[0])
    ns_addr(s2, ADDR[1])
    tap1, link2 = Recorder(s1.ws_url), Recorder(s2.ws_url)
    try:
        helpers.ping(ns1, ADDR[1], count=2, interval=0.2, wait=1)  # ARP from ns1: s1 sends messages
        wait_for(lambda: tap1.messages, 30, what="a message from server1")
        captured = tap1.messages[0]
        assert captured[2] & 0x01, "server1 did not seal its message"

        link2.send(captured)
        wait_for(lambda: s2.stats()["tap"]["written_frames"] >= 1, 30, what="the genuine message")
        written = s2.stats()["tap"]["written_frames"]

        link2.send(captured)  # the same message again
        altered = bytearray(captured)
        altered[-20] ^= 0x40  # one flipped byte in the ciphertext
        link2.send(bytes(altered))
        wait_for(lambda: s2.stats()["drops"]["auth"] == 1 and s2.stats()["drops"]["replay"] == 1, 30,
                 what="the replay and the altered message to be counted")
        assert s2.stats()["tap"]["written_frames"] == written
    finally:
        tap1.close()
        link2.close()


def gelf_once(*args, timeout=60, **kw):
    return helpers.gelf_once("--dev", helpers.tap_name(), *args, timeout=timeout, **kw)


def test_key_file_permissions_and_bad_keys(gelf_server, tmp_path):
    key_file = tmp_path / "gelf.key"
    key_file.write_text(KEY + "\n")
    os.chmod(key_file, 0o644)
    code, out = gelf_once("--key-file", str(key_file), str(helpers.free_port()))
    assert code == 1 and "gelf: error:" in out and "chmod 600" in out and "Traceback" not in out, out

    for bad in ("zz" * 16, "abcd"):
        code, out = gelf_once("--key", bad, str(helpers.free_port()))
        assert code == 1 and "gelf: error: --key" in out and "Traceback" not in out, out

    os.chmod(key_file, 0o600)
    server = gelf_server(extra=["--key-file", str(key_file)])
    assert "[Gelf] Encryption enabled" in server.log_text()
    assert KEY not in server.log_text() and server.stats()["encryption"]


@pytest.mark.usefixtures("need_chromium")
def test_tls_page_and_wss_links(gelf_server, ns_addr, browser, tmp_path):
    cert, key = helpers.make_certificate(tmp_path)
    tls = ["--ssl-cert", str(cert), "--ssl-key", str(key)]
    (s1, s2), (ns1, _) = servers_in_namespaces(lambda: gelf_server(extra=tls), ns_addr, 2)

    context = browser.new_context(ignore_https_errors=True)
    try:
        page = context.new_page()
        page.goto(f"https://127.0.0.1:{s1.port}/?peer=127.0.0.1:{s2.port}")
        wait_all_open(page, 2)
        urls = sorted(page.evaluate("window.gelfRelay.links.map(l => l.url)"))
        assert urls == sorted(f"wss://127.0.0.1:{s.port}/ws" for s in (s1, s2))
        assert_pings(ns1, ADDR[1], count=10)
    finally:
        context.close()
    try:  # plain http on the TLS port: refused with an error status, or reset
        status = http_status(s1.port, "/stats")
    except OSError:
        status = None
    assert status != 200


def http_status(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    status = conn.getresponse().status
    conn.close()
    return status


def ws_status(port, query=""):
    """The HTTP status of a WebSocket handshake on /ws."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/ws" + query, headers={
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.mark.usefixtures("need_chromium")
def test_token_guards_the_page_and_the_socket(gelf_server, ns_addr, open_page):
    token = "open sesame&=/"
    quoted = "open%20sesame%26%3D%2F"
    (s1, s2), (ns1, _) = servers_in_namespaces(lambda: gelf_server(extra=["--token", token]), ns_addr, 2)
    assert ws_status(s2.port) == 403
    assert ws_status(s2.port, "?token=wrong") == 403
    assert ws_status(s2.port, "?token=" + quoted) == 101
    # The page is public (it holds no secret, and a reload of it must work without ?token=);
    # everything it reaches needs the token.
    assert http_status(s2.port, "/stats") == 403 and http_status(s2.port, "/metrics") == 403
    assert http_status(s2.port, "/") == 200
    assert http_status(s2.port, "/stats?token=" + quoted) == 200

    page = open_page(f"{s1.url}/?token={quoted}&peer=127.0.0.1:{s2.port}%23{quoted}")
    wait_all_open(page, 2)
    assert_pings(ns1, ADDR[1], count=10)
    # The page keeps the tokens in memory: not in its address (test_page.py checks everywhere).
    assert quoted not in page.url and "sesame" not in page.url, page.url


@pytest.mark.usefixtures("need_chromium")
def test_user_drops_root_and_pings_still_pass(gelf_server, ns_addr, open_page):
    (s1, s2), (ns1, _) = servers_in_namespaces(lambda: gelf_server(extra=["--user", "nobody"]), ns_addr, 2)
    for s in (s1, s2):
        status = open(f"/proc/{s.proc.pid}/status").read()
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert "0" not in uids, uids
    relay_page(open_page, s1, s2)
    assert_pings(ns1, ADDR[1], count=10)


def test_exposed_without_key_or_token_warns(tmp_path):
    """Listening on all addresses with no protection says so (the port is only bound, no traffic).
    Each server is stopped once it has started (a busy machine may take seconds to start it); the
    one that must not warn gets 3 s more, as the warning comes right after 'Relay listening'."""
    code, out = gelf_once("--host", "0.0.0.0", str(helpers.free_port()), ready=r"anyone who can reach")
    assert code == 0 and "anyone who can reach" in out, out
    code, out = gelf_once("--host", "0.0.0.0", "--enc", str(helpers.free_port()),
                          ready=r"\[Gelf\] Relay listening", linger=3)
    assert code == 0 and "[Gelf] Encryption key: " in out and "anyone who can reach" not in out, out
