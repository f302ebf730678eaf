"""Issues 10 and 15 end to end: each reported failure reproduced against real servers, taps and
namespaces (test names carry the finding), then the faults of real life.

Every wait is generous and bounded: these tests assert what happens, not how fast; the figures
(link RTT under pressure, throughput beside stuck clients) are measured by `make bench`.
"""

import json
import os
import re
import signal
import ssl
import subprocess
import threading
import time
import urllib.request

import pytest

import helpers
import wsclient
from helpers import ADDR, PYTHON, REPO, run, transfer, wait_for

pytestmark = pytest.mark.usefixtures("need_root")

WAIT = 60


def links_of(server, kind=None, context=None):
    """The server's links from /stats (over https with a TLS `context`)."""
    if context is None:
        stats = server.stats(timeout=30)
    else:
        with urllib.request.urlopen(f"https://127.0.0.1:{server.port}/stats", timeout=30, context=context) as r:
            stats = json.loads(r.read())
    return [l for l in stats["links"] if kind is None or l["kind"] == kind]


def wait_links(server, kind, count, timeout=WAIT, context=None):
    wait_for(lambda: len([l for l in links_of(server, kind, context) if l["state"] == "open"]) == count,
             timeout, what=f"{count} open {kind} link(s) on {server.dev}")


def threads_of(proc):
    return len(os.listdir(f"/proc/{proc.pid}/task"))


def fds_of(proc):
    return len(os.listdir(f"/proc/{proc.pid}/fd"))


def direct_pair(gelf_server, ns_addr, a_extra=(), b_extra=(), scheme="ws", context=None):
    """Server A (tap in its namespace, ADDR[0]) and server B dialing it (ADDR[1])."""
    a = gelf_server(extra=list(a_extra))
    ns_a = ns_addr(a, ADDR[0])
    b = gelf_server(extra=["--connect", f"{scheme}://127.0.0.1:{a.port}/ws", *b_extra])
    ns_b = ns_addr(b, ADDR[1])
    wait_links(a, "direct", 1, context=context)
    assert helpers.wait_ping(ns_b, ADDR[0], timeout=WAIT), "the direct link never carried a ping"
    return a, b, ns_a, ns_b


# ---------------------------------------------------------------- issue 10, finding 1

def test_10_1_a_standard_clients_close_is_answered_and_its_link_leaves(gelf_server):
    from websockets.sync.client import connect

    s = gelf_server()
    for _ in range(60):
        with connect(s.ws_url, open_timeout=WAIT, close_timeout=WAIT) as ws:
            ws.send(b"one binary message")
        closing = ws.protocol.close_rcvd
        assert closing is not None, "the server never sent its Close frame"
        assert closing.code == 1000 and ws.protocol.close_sent.code == 1000
    wait_for(lambda: not links_of(s), WAIT, what="every closed link to leave /stats")
    log = s.log_text()
    # (60 closes in a few seconds: the log shows the first ones, then holds the rest back)
    assert re.search(r"\[Gelf\] link \d+ closed: 127\.0\.0\.1:\d+ \(1000\)", log), log
    assert "Cannot send on a terminated websocket" not in log and "Traceback" not in log, log
    assert s.stats()["drops"]["malformed"] == 60  # each message was received (and was no gelf message)


def test_10_1_a_dialing_server_closes_with_the_handshake_both_ways(gelf_server):
    a = gelf_server()
    b = gelf_server(extra=["--connect", a.ws_url])
    wait_links(a, "direct", 1)
    assert b.stop(timeout=WAIT) == 0
    assert a.logs[-1].wait_line(r"link \d+ closed: 127\.0\.0\.1:\d+ \(1001: going away\)", WAIT), a.log_text()

    b.start()
    wait_links(a, "direct", 1)
    assert a.stop(timeout=WAIT) == 0
    line = rf"link to {re.escape(a.ws_url)}: closed: server shutting down"
    assert b.logs[-1].wait_line(line, WAIT), b.log_text()
    assert "Traceback" not in a.log_text() + b.log_text()


# ---------------------------------------------------------------- issue 15, findings 1, 2 and 4

def test_15_1_clients_that_never_read_lose_alone_and_are_closed(gelf_server, ns_addr, bg, tmp_path):
    a, b, ns_a, ns_b = direct_pair(gelf_server, ns_addr, a_extra=["--stall-timeout", "2"])
    stuck = [wsclient.upgrade(a.port, rcvbuf=4096) for _ in range(2)]  # they never read
    wait_links(a, "browser", 2)
    transfer(bg, ns_a, ns_b, ADDR[1], tmp_path)  # A's frames are offered to the stuck clients too
    wait_for(lambda: not links_of(a, "browser"), WAIT,
             what="the links of clients that take nothing to be closed while they are still connected")
    assert a.stats()["drops"]["queue_full"] > 0  # they lost frames, alone
    assert [l["kind"] for l in links_of(a)] == ["direct"]
    loss, out = helpers.ping(ns_b, ADDR[0], count=10, wait=10)
    assert loss == 0, out
    assert re.search(r"link \d+ closed: .*the peer took nothing for 2 s", a.log_text())
    for sock in stuck:
        sock.close()


def test_15_2_half_a_tls_record_stalls_no_other_link(gelf_server, ns_addr, tmp_path):
    cert, key = helpers.make_certificate(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    a, b, ns_a, ns_b = direct_pair(gelf_server, ns_addr, scheme="wss", context=context,
                                   a_extra=["--ssl-cert", str(cert), "--ssl-key", str(key)],
                                   b_extra=["--cacert", str(cert)])
    holder = wsclient.upgrade(a.port, context=context)
    wait_links(a, "browser", 1, context=context)
    # The header of a 16 KiB TLS record, then its body one byte a second: never a whole record.
    os.write(holder.fileno(), b"\x17\x03\x03\x40\x00")
    done = threading.Event()

    def trickle():
        while not done.wait(1.0):
            try:
                os.write(holder.fileno(), b"\x00")
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    try:
        # A stalled server answers these only when it gives up on the record (after cheroot's
        # 10 s timeout); a working one within milliseconds. No busy machine makes that 5 s.
        loss, out = helpers.ping(ns_b, ADDR[0], count=16, interval=0.5, wait=10)
        slowest = max(float(t) for t in re.findall(r"time=([\d.]+) ms", out))
        assert loss == 0 and slowest < 5000, f"the wss link stalled while a client held half a TLS record:\n{out}"
    finally:
        done.set()
        holder.close()


def test_15_4_idle_websockets_cost_no_thread_and_their_descriptors_go(gelf_server):
    s = gelf_server()
    time.sleep(1)
    threads, fds = threads_of(s.proc), fds_of(s.proc)
    idle = [wsclient.upgrade(s.port, source=f"127.0.0.{2 + i // 10}") for i in range(300)]
    wait_links(s, "browser", 300)
    assert threads_of(s.proc) - threads <= 3, "idle WebSockets added threads"
    for sock in idle:
        sock.close()
    wait_for(lambda: not links_of(s), WAIT, what="300 closed links to leave /stats")
    wait_for(lambda: fds_of(s.proc) <= fds + 2, WAIT, what="their descriptors to be closed")


# ---------------------------------------------------------------- issue 10, finding 2: the tap vanishes

@pytest.mark.parametrize("how", ["ip link del", "namespace deleted"])
def test_10_2_a_deleted_tap_ends_gelf_with_one_message(gelf_server, ns_addr, netns, how):
    s = gelf_server()
    if how == "ip link del":
        run(["ip", "link", "del", s.dev])
    else:
        ns = ns_addr(s, ADDR[0])
        run(["ip", "netns", "del", ns])
    assert s.proc.wait(WAIT) == 3, s.log_text()
    log = s.log_text()
    assert re.search(rf"gelf: error: the tap {s.dev} is gone", log), log
    assert "Traceback" not in log and len(log.splitlines()) < 30, log


# ---------------------------------------------------------------- issue 10: a half-open peer

def test_10_a_half_open_peer_is_found_by_keepalive(netns, tmp_path):
    """A peer that vanishes without a FIN (its link is cut) is closed by keepalive pings."""
    srv_ns, cli_ns = netns(), netns()
    run(["ip", "-n", srv_ns, "link", "add", "vS", "type", "veth", "peer", "name", "vC", "netns", cli_ns])
    for ns, dev, addr in ((srv_ns, "vS", "10.81.0.1/24"), (cli_ns, "vC", "10.81.0.2/24")):
        run(["ip", "-n", ns, "addr", "add", addr, "dev", dev])
        run(["ip", "-n", ns, "link", "set", dev, "up"])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
    port = helpers.free_port()
    server = subprocess.Popen(["ip", "netns", "exec", srv_ns, PYTHON, "gelf.py", "-d", "--host", "10.81.0.1",
                               "--keepalive", "1", "--dev", helpers.tap_name(), str(port)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = helpers.LogPump(server.stdout)
    client = None
    try:
        assert log.wait_line(r"Relay listening: 10\.81\.0\.1", WAIT), log.text()
        client = subprocess.Popen(
            ["ip", "netns", "exec", cli_ns, PYTHON, "-c",
             "import sys, time; sys.path.insert(0, 'tests'); import wsclient; "
             f"c = wsclient.Client(wsclient.upgrade({port}, host='10.81.0.1')); print('up', flush=True); "
             "c.read_until(lambda events: False, timeout=300)"],  # reads, and answers pings
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        client_log = helpers.LogPump(client.stdout)
        assert client_log.wait_line(r"^up$", WAIT), client_log.text()
        opened = log.wait_line(r"link (\d+) open: browser 10\.81\.0\.2", WAIT)
        assert opened, log.text()
        time.sleep(3)  # a live peer answers the pings: the link stays
        assert not re.search(rf"link {opened.group(1)} closed", log.text()), log.text()
        run(["ip", "-n", cli_ns, "link", "set", "vC", "down"])  # no FIN, no RST: the peer is just gone
        assert log.wait_line(rf"link {opened.group(1)} closed: .*no answer to a keepalive ping", WAIT), log.text()
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


# ---------------------------------------------------------------- issue 15, finding 6

def test_15_6_a_link_that_cannot_connect_is_listed_with_its_error(gelf_server):
    dead = helpers.free_port()  # nothing listens there
    s = gelf_server(extra=["--connect", f"ws://127.0.0.1:{dead}/ws?token=hidden-token"])
    link = wait_for(lambda: next((l for l in links_of(s) if l["state"] == "retrying"), None), WAIT,
                    what="the dialing link in /stats")
    assert link["kind"] == "direct" and link["peer"] == f"ws://127.0.0.1:{dead}/ws"
    assert link["error"] == "connection refused" and link["next_try"] > time.time() - 1
    assert "hidden-token" not in json.dumps(s.stats()) and "hidden-token" not in s.log_text()


def test_15_6_the_wrong_scheme_is_named(gelf_server, tmp_path):
    cert, key = helpers.make_certificate(tmp_path)
    tls = gelf_server(extra=["--ssl-cert", str(cert), "--ssl-key", str(key)])
    plain = gelf_server()
    dialer = gelf_server(extra=["--connect", f"ws://127.0.0.1:{tls.port}/ws",
                                "--connect", f"wss://127.0.0.1:{plain.port}/ws", "--cacert", str(cert)])
    assert dialer.logs[-1].wait_line(rf"link to ws://127\.0\.0\.1:{tls.port}/ws: cannot connect: .*use wss://",
                                     WAIT), dialer.log_text()
    assert dialer.logs[-1].wait_line(rf"link to wss://127\.0\.0\.1:{plain.port}/ws: cannot connect: "
                                     r"the server does not speak TLS: use ws://", WAIT), dialer.log_text()
