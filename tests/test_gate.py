"""The gate (gelf/gate.py, admission.py, httphead.py): idle and slow clients cost no worker.

The first part needs no root: request heads as bytes, the admission counts, the reader that
hands pre-read bytes to cheroot. The rest starts real gelf servers on
127.0.0.1 and attacks them from 127.0.0.2 (loopback only): 1 000 idle connections, 12 or 200
slowloris clients, silent TLS clients, while 127.0.0.1 asks for the page, /stats and a /ws
upgrade. Waits are generous (15 s): these tests check behaviour, not speed; bench/slowloris.py
measures the times.
"""

import gc
import http.client
import re
import resource
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

import helpers
from gelf import gate, httphead
from gelf.admission import Admission, Turns, address_key
from gelf.handoff import GateReader

ATTACKER = "127.0.0.2"
WAIT = 15  # seconds: generous, for a busy 2-core machine
UPGRADE = ("GET /ws{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


# ---------------------------------------------------------------- request heads, as bytes

@pytest.mark.parametrize("data, end", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 27),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /next", 27),
    (b"GET / HTTP/1.1\nHost: x\n\nrest", 24),  # sloppy LF LF: cheroot answers it
    (b"GET / HTTP/1.1\r\nHost: x\r\n", -1),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r", -1),
    (b"", -1),
])
def test_head_end(data, end):
    assert httphead.head_end(data) == end


def test_head_end_dribbled_a_byte_at_a_time():
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaa\r\n\r\n"
    buf, scanned = bytearray(), 0
    for i, byte in enumerate(head):
        buf.append(byte)
        end = httphead.head_end(buf, scanned)
        scanned = len(buf)
        assert end == (len(head) if i == len(head) - 1 else -1)


@pytest.mark.parametrize("head, status", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", None),
    (b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\ncontent-length : 12\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET /?Content-Length:5 HTTP/1.1\r\n\r\n", None),  # the request line is not a header
])
def test_refusal(head, status):
    refused = httphead.refusal(head)
    assert (refused and refused[0]) == status


@pytest.mark.parametrize("data, status", [
    (b"GET / HTTP/1.1\r\n", None),
    (b"\r\nGET / HTTP/1.1\r\n", None),
    (b"G", None),
    (b"\x16\x03\x01\x02\x00", 400),  # a TLS ClientHello on the plain port
    (b"get / HTTP/1.1\r\n", 400),
    (b"\x00\x01", 400),
])
def test_refusal_of_start(data, status):
    refused = httphead.refusal_of_start(data)
    assert (refused and refused[0]) == status


def test_response_is_complete_and_closes():
    data = httphead.response(503, "Too many connections from 127.0.0.2 (at most 64).")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close" in head and b"Content-Length: %d" % len(body) in head
    assert body == b"Too many connections from 127.0.0.2 (at most 64).\n"


# ---------------------------------------------------------------- admission

def test_admission_limits_per_address_and_in_total():
    adm = Admission(max_connections=5, max_per_address=3)
    socks = [socket.socket() for _ in range(6)]
    try:
        assert [adm.admit(s, "a") for s in socks[:3]] == [None] * 3
        limit, text = adm.admit(socks[3], "a")
        assert limit == "--max-per-address" and "at most 3" in text and "a" in text
        assert adm.admit(socks[3], "b") is None and adm.admit(socks[4], "b") is None
        limit, text = adm.admit(socks[5], "c")
        assert limit == "--max-connections" and "(5)" in text
        assert adm.count() == 5 and adm.count("a") == 3
        adm.release(socks[0])
        adm.release(socks[0])  # idempotent
        adm.release(socket.socket())  # never admitted: nothing happens
        assert adm.count() == 4 and adm.count("a") == 2
        assert adm.admit(socks[5], "c") is None
    finally:
        for s in socks:
            s.close()


def test_admission_rekey_and_garbage_collected_sockets():
    adm = Admission(max_connections=10, max_per_address=2)
    plain, wrapped = socket.socket(), socket.socket()
    assert adm.admit(plain, "a") is None
    adm.rekey(plain, wrapped)
    adm.release(plain)  # the old object no longer holds the slot
    assert adm.count("a") == 1
    adm.release(wrapped)
    assert adm.count("a") == 0

    lost = socket.socket()
    assert adm.admit(lost, "a") is None
    lost.close()
    del lost  # a path that forgot to release: the slot comes back with the socket object
    gc.collect()
    assert adm.count("a") == 0 and adm.count() == 0
    plain.close()
    wrapped.close()


@pytest.mark.parametrize("host, key", [
    ("127.0.0.2", "127.0.0.2"),
    ("::ffff:127.0.0.2", "127.0.0.2"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("", ""),
])
def test_address_key(host, key):
    assert address_key(host) == key


# ---------------------------------------------------------------- worker turns

def test_turns_share_workers_between_addresses():
    turns = Turns(workers=10, per_address=3)
    for i in range(50):
        turns.wait("attacker", ("attacker", i))
    for i in range(2):
        turns.wait("page", ("page", i))
    given = [turns.next() for _ in range(10)]
    assert given.count(None) == 5  # the attacker has its 3, the page its 2: five workers stay free
    assert [g for g in given if g] == [("attacker", 0), ("page", 0), ("attacker", 1), ("page", 1),
                                       ("attacker", 2)]
    turns.wait("late", ("late", 0))
    assert turns.next() == ("late", 0)  # a newcomer gets a free worker at once
    turns.done("attacker")
    assert turns.next() == ("attacker", 3)  # in order, within its share
    assert turns.next() is None and turns.waiting() == 46


def test_turns_against_a_model():
    """Random waits and dones: never over either limit, never a free worker left idle while a
    request that may have it waits, every address's requests in order."""
    import random

    rng = random.Random(15)
    turns = Turns(workers=4, per_address=2)
    waiting = {k: [] for k in "abcde"}
    busy = {k: 0 for k in "abcde"}
    serial = 0
    for _ in range(5000):
        if rng.random() < 0.5:
            key = rng.choice("abcde")
            serial += 1
            waiting[key].append(serial)
            turns.wait(key, (key, serial))
        elif any(busy.values()):
            key = rng.choice([k for k in busy if busy[k]])
            busy[key] -= 1
            turns.done(key)
        while (given := turns.next()) is not None:
            key, n = given
            assert waiting[key].pop(0) == n
            busy[key] += 1
            assert busy[key] <= 2 and sum(busy.values()) <= 4
        eligible = [k for k in waiting if waiting[k] and busy[k] < 2]
        assert not eligible or sum(busy.values()) == 4


# ---------------------------------------------------------------- the reader cheroot reads through

def test_reader_serves_preread_bytes_first_and_gives_back_the_rest():
    a, b = socket.socketpair()
    try:
        reader = GateReader(a, "rb", 8192)
        assert reader.raw._sock is a  # where ws4py takes the socket from
        reader.raw.give(b"GET / HTTP/1.1\r\n\r\nGET /two HTTP/1.1\r\n")
        b.sendall(b"Host: x\r\n\r\n")
        assert reader.readline() == b"GET / HTTP/1.1\r\n"
        assert reader.readline() == b"\r\n"
        assert reader.has_data()
        assert reader.take_unread() == b"GET /two HTTP/1.1\r\n"
        assert not reader.has_data()
        assert reader.read(11) == b"Host: x\r\n\r\n"  # then the socket itself
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------- attackers (127.0.0.2)

@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 3000:
        pytest.skip("needs 3000 open files (ulimit -n)")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Crowd:
    """Connections from 127.0.0.2: idle ones, and slowloris ones that send one byte of a never
    ending request head per second from a thread. Everything is closed by close()."""

    def __init__(self, port):
        self.port = port
        self.socks = []
        self.slow = []
        self.stop = threading.Event()
        self.thread = None

    def connect(self):
        s = socket.socket()
        self.socks.append(s)
        s.setblocking(False)
        s.bind((ATTACKER, 0))
        s.connect_ex(("127.0.0.1", self.port))
        return s

    def idle(self, n):
        return [self.connect() for _ in range(n)]

    def slowloris(self, n):
        head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
        self.slow += [[self.connect(), 0] for _ in range(n)]

        def dribble():
            while not self.stop.wait(1):
                for entry in self.slow:
                    try:
                        entry[1] += entry[0].send(head[entry[1]:entry[1] + 1])
                    except OSError:
                        pass
        self.thread = threading.Thread(target=dribble, daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        if self.thread:
            self.thread.join(5)
        for s in self.socks:
            s.close()


@pytest.fixture
def crowd():
    crowds = []

    def make(port):
        crowds.append(Crowd(port))
        return crowds[-1]

    yield make
    for c in crowds:
        c.close()


def exchange(port, request, source="127.0.0.1", timeout=WAIT, context=None):
    """Send request on a fresh connection; return the whole response (until close, or the head
    and Content-Length bytes, or the 101 line)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as raw:
        s = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
        s.sendall(request.encode() if isinstance(request, str) else request)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                if head.startswith(b"HTTP/1.1 101"):
                    return data
                m = re.search(rb"Content-Length: (\d+)", head, re.I)
                if m and len(body) >= int(m.group(1)):
                    return data
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
        return data


def get(port, path, **kw):
    return exchange(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", **kw)


def assert_served(server):
    """127.0.0.1 gets the page, /stats and a /ws upgrade."""
    assert get(server.port, "/").startswith(b"HTTP/1.1 200 OK"), "GET / was not answered"
    assert b'"tap"' in get(server.port, "/stats"), "GET /stats was not answered"
    assert exchange(server.port, UPGRADE.format(query="")).startswith(b"HTTP/1.1 101"), "no /ws upgrade"


def settle(crowd_, seconds=2):
    """Give the server time to accept the crowd (the connects are non-blocking)."""
    time.sleep(seconds)


@pytest.mark.usefixtures("need_root", "many_files")
@pytest.mark.parametrize("slow, limits", [(12, "raised"), (200, "raised"), (200, "default")])
def test_slowloris_and_idle_crowd_hold_no_worker(gelf_server, crowd, slow, limits):
    """1 000 idle and `slow` slowloris connections from 127.0.0.2: 127.0.0.1 is still served.
    With the limits raised the gate holds them all; with the defaults it holds 64 and refuses
    the rest at once."""
    srv = gelf_server(extra=["--max-per-address", "2000"] if limits == "raised" else [])
    attack = crowd(srv.port)
    attack.idle(1000)
    attack.slowloris(slow)
    settle(attack, 3)
    assert_served(srv)
    if limits == "default":
        assert get(srv.port, "/", source=ATTACKER).startswith(b"HTTP/1.1 503")
    assert srv.alive()


@pytest.mark.usefixtures("need_root", "many_files")
def test_over_the_limits_503_at_once_and_one_log_line(gelf_server, crowd):
    srv = gelf_server(extra=["--max-per-address", "20", "--max-connections", "100"])
    attack = crowd(srv.port)
    attack.idle(20)
    attack.slowloris(200)
    settle(attack)
    start = time.monotonic()
    answer = get(srv.port, "/", source=ATTACKER)
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable"), answer
    assert b"Too many connections from 127.0.0.2 (at most 20)" in answer
    assert time.monotonic() - start < WAIT
    assert_served(srv)
    refusals = [line for line in srv.log_text().splitlines() if "--max-per-address" in line]
    assert 1 <= len(refusals) <= 3, refusals  # 180+ refusals, one line per 10 s

    for i in range(2, 6):  # 80 more, from four other addresses, fill --max-connections
        attack.socks += [socket.create_connection(("127.0.0.1", srv.port), source_address=(f"127.0.1.{i}", 0))
                         for _ in range(20)]
    helpers.wait_for(lambda: get(srv.port, "/").startswith(b"HTTP/1.1 503"), WAIT,
                     what="503 at --max-connections")
    assert b"as many connections as it may (100)" in get(srv.port, "/")

    attack.close()  # every slot comes back: 20 connections from 127.0.0.2 are welcome again

    def twenty_admitted():
        socks = [socket.create_connection(("127.0.0.1", srv.port), source_address=(ATTACKER, 0))
                 for _ in range(20)]
        time.sleep(0.5)
        if select.select(socks, [], [], 0)[0]:  # some got a 503: old slots are still being freed
            for s in socks:
                s.close()
            return None
        return socks

    again = helpers.wait_for(twenty_admitted, WAIT, what="20 slots for 127.0.0.2 again")
    try:
        assert get(srv.port, "/", source=ATTACKER).startswith(b"HTTP/1.1 503")
        assert get(srv.port, "/").startswith(b"HTTP/1.1 200")
    finally:
        for s in again:
            s.close()


@pytest.mark.usefixtures("need_root")
def test_slow_head_gets_408_after_header_timeout(gelf_server):
    srv = gelf_server(extra=["--header-timeout", "1"])
    with socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127")
        start = time.monotonic()
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        waited = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer
    assert 0.9 <= waited < WAIT, waited
    assert get(srv.port, "/").startswith(b"HTTP/1.1 200")


@pytest.mark.usefixtures("need_root")
def test_keep_alive_pipelining_body_and_big_heads(gelf_server):
    srv = gelf_server()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=WAIT)
    for path in ("/stats", "/", "/stats"):  # three requests, one connection
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200 and response.read()
    sock_name = conn.sock.getsockname()
    conn.request("GET", "/stats")
    conn.getresponse().read()
    assert conn.sock.getsockname() == sock_name
    conn.close()

    two = "GET /stats HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as s:
        s.sendall(two.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 2 and b'"tap"' in data and b"<html" in data.lower()

    answer = exchange(srv.port, "POST /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert answer.startswith(b"HTTP/1.1 413") and b"no request body" in answer
    answer = exchange(srv.port, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413")
    answer = exchange(srv.port, "GET / HTTP/1.1\r\nX-Big: %s\r\n\r\n" % ("a" * 20000))
    assert answer.startswith(b"HTTP/1.1 431")
    answer = exchange(srv.port, half_a_client_hello())  # wss:// to the plain port: told at once
    assert answer.startswith(b"HTTP/1.1 400") and httphead.TLS_ON_PLAIN_HTTP.encode() in answer
    assert get(srv.port, "/").startswith(b"HTTP/1.1 200")


@pytest.mark.usefixtures("need_root")
@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_websocket_holds_its_slot_until_it_closes(gelf_server, tmp_path, tls):
    extra, context = ["--max-per-address", "3"], None
    if tls:

        cert, key = helpers.make_certificate(tmp_path)
        extra += ["--ssl-cert", str(cert), "--ssl-key", str(key)]
        context = ssl.create_default_context(cafile=str(cert))

    def attacker_get():
        try:
            return get(srv.port, "/", source=ATTACKER, context=context)
        except (ssl.SSLError, ConnectionError):  # on a TLS port a refusal is a plain close
            return b""

    srv = gelf_server(extra=extra)
    sockets = []
    try:
        for _ in range(3):
            raw = socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT, source_address=(ATTACKER, 0))
            s = context.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
            sockets.append(s)
            s.sendall(UPGRADE.format(query="").encode())
            assert s.recv(4096).startswith(b"HTTP/1.1 101")
        helpers.wait_for(lambda: srv.log_text().count("open: browser") == 3, WAIT, what="three links")
        answer = attacker_get()
        assert answer.startswith(b"HTTP/1.1 503") if not tls else answer == b"", answer
        sockets.pop().close()
        helpers.wait_for(lambda: attacker_get().startswith(b"HTTP/1.1 200"), WAIT,
                         what="the closed WebSocket's slot to come back")
    finally:
        for s in sockets:
            s.close()


@pytest.mark.usefixtures("need_root")
def test_tokens_stay_out_of_the_log(gelf_server):
    srv = gelf_server(extra=["--token", "sekrit-123"])
    assert get(srv.port, "/stats?token=sekrit-123").startswith(b"HTTP/1.1 200")
    assert exchange(srv.port, UPGRADE.format(query="?token=sekrit-123")).startswith(b"HTTP/1.1 101")
    assert get(srv.port, "/stats?token=wrong-456").startswith(b"HTTP/1.1 403")
    time.sleep(0.5)
    log = srv.log_text()
    assert "/stats?token=" in log, log  # -d logs requests, without the secret
    assert "sekrit" not in log and "wrong-456" not in log, log


# ---------------------------------------------------------------- TLS

def half_a_client_hello():
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    return hello[:len(hello) // 2]


@pytest.mark.usefixtures("need_root")
def test_silent_tls_clients_do_not_stop_https_or_wss(gelf_server, tmp_path):

    cert, key = helpers.make_certificate(tmp_path)
    tls = ["--ssl-cert", str(cert), "--ssl-key", str(key)]
    s1 = gelf_server(extra=tls)
    silent = [socket.create_connection(("127.0.0.1", s1.port), source_address=(ATTACKER, 0)) for _ in range(20)]
    try:
        for s in silent[:10]:
            s.sendall(half_a_client_hello())
        time.sleep(0.5)
        context = ssl.create_default_context(cafile=str(cert))
        answer = get(s1.port, "/stats", context=context)
        assert answer.startswith(b"HTTP/1.1 200") and b'"tap"' in answer, answer
        upgrade = exchange(s1.port, UPGRADE.format(query=""), context=context)
        assert upgrade.startswith(b"HTTP/1.1 101"), upgrade

        gelf_server(extra=["--connect", f"wss://127.0.0.1:{s1.port}/ws", "--cacert", str(cert)])
        assert s1.logs[-1].wait_line(r"link \d+ open: direct", WAIT), s1.log_text()

        plain = get(s1.port, "/stats")  # plain HTTP to the TLS port
        assert plain.startswith(b"HTTP/1.1 400 Bad Request"), plain
        assert httphead.PLAIN_HTTP_ON_TLS.encode() in plain
    finally:
        for s in silent:
            s.close()


# ---------------------------------------------------------------- command line

def test_limits_are_documented_and_checked():
    helps = helpers.run([sys.executable, "gelf.py", "--help"], cwd=helpers.REPO).stdout
    for flag in ("--max-connections", "--max-per-address", "--header-timeout", "503"):
        assert flag in helps
    for argv, words in ((["--max-per-address", "0"], "out of range"),
                        (["--header-timeout", "soon"], "not a valid number of seconds")):
        res = helpers.run([sys.executable, "gelf.py", *argv, "7001"], check=False, cwd=helpers.REPO)
        errors = [line for line in res.stderr.splitlines() if line.startswith("gelf: error:")]
        assert res.returncode == 1 and len(errors) == 1 and words in errors[0], res.stderr  # README: Exit status


def test_max_connections_over_the_open_files_limit_is_one_clear_error():
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1000, 1000))

    res = subprocess.run([sys.executable, "gelf.py", "--max-connections", "5000", "7001"], cwd=helpers.REPO,
                         capture_output=True, text=True, timeout=30, preexec_fn=low_limit)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert res.stderr.startswith("gelf: error: --max-connections 5000 needs more open files")
    assert "at most %d" % (1000 - gate.RESERVED_FILES) in res.stderr


@pytest.mark.usefixtures("need_root", "many_files")
def test_shutdown_is_prompt_with_many_connections(gelf_server, crowd):
    srv = gelf_server(extra=["--max-per-address", "2000"])
    attack = crowd(srv.port)
    attack.idle(500)
    attack.slowloris(50)
    settle(attack)
    assert get(srv.port, "/").startswith(b"HTTP/1.1 200")
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(2)
    assert srv.proc.returncode == 0
    assert "Traceback" not in srv.log_text()
