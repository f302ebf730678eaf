"""Issue 10, "Faults, each a test": a server, the relay or the browser is killed with SIGKILL
(no Close, no goodbye: the kernel closes its sockets). The parts that do not depend on it keep
going, the links to it leave /stats, and traffic resumes once it is back. Also: a transfer runs
across a peer's crash, 1 000 idle WebSockets cost no thread, and a page only reconnects the link
whose server restarted.

Taps sit in network namespaces the tests create; every WebSocket runs on 127.0.0.1. The tests
assert behaviour, not speed (CI machines are small and busy), so every wait is a generous bound
(WAIT). The figure the issue promises, traffic back within 5 s of the peer's return, is measured
by `make bench`, not here.
"""

import os
import re
import resource
import select
import signal
import threading
import time

import pytest

import helpers
import wsclient
from helpers import ADDR, PYTHON, REPO, transfer, wait_for

pytestmark = pytest.mark.usefixtures("need_root")

WAIT = 60  # seconds: a bound on anything that should take a second, on a busy machine
IDLE_SOCKETS = 1000
PER_SOURCE = 10  # idle sockets per source address, well inside the per-address limit (64)


# ---------------------------------------------------------------- helpers

def open_links(server, kind=None, stats=None):
    """The server's open links (of one kind), from /stats."""
    st = stats if stats is not None else server.stats(timeout=WAIT)
    return [l for l in st["links"] if l["state"] == "open" and (kind is None or l["kind"] == kind)]


def link_ids(server, kind=None):
    return sorted(l["id"] for l in open_links(server, kind))


def wait_links(server, kind, count, timeout=WAIT):
    """Wait until `server` has exactly `count` open links of `kind`; return their ids."""
    def ready():
        ids = link_ids(server, kind)
        return (ids,) if len(ids) == count else None
    return wait_for(ready, timeout, what=f"{count} open {kind} link(s) on {server.dev}")[0]


def wait_gone(server, kind, timeout=WAIT):
    """Wait until `server` lists no link of `kind` at all (open or otherwise)."""
    wait_for(lambda: not [l for l in server.stats(timeout=WAIT)["links"] if l["kind"] == kind],
             timeout, what=f"the {kind} links to leave /stats of {server.dev}")


def wait_ping(ns, addr, what):
    assert helpers.wait_ping(ns, addr, timeout=WAIT), f"{what}: no ping from {ns} to {addr} in {WAIT} s"


def kill9(server):
    """SIGKILL the server's process, by its PID, and reap it."""
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(WAIT)
    server.kill()  # already dead: this only collects the rest of its log


def restart(server, ns_addr, ns, addr, mac):
    """The same server again: same port, same tap name, its tap back in `ns` with the same
    address and MAC (the same host coming back)."""
    wait_for(lambda: not helpers.iface_exists(server.dev, ns), WAIT, what=f"{server.dev} to leave {ns}")
    server.start(timeout=WAIT)
    ns_addr(server, addr, ns=ns, mac=mac)


def three_servers(gelf_server, ns_addr, c_dials):
    """Servers A, B and C, their taps in namespaces with ADDR[0..2]. B dials A (--connect);
    C dials A too if `c_dials`. Returns the servers, their namespaces, and the ids of B's and
    C's links in A's /stats."""
    a = gelf_server()
    ns_a = ns_addr(a, ADDR[0])
    b = gelf_server(extra=["--connect", a.ws_url])
    ns_b = ns_addr(b, ADDR[1])
    (b_link,) = wait_links(a, "direct", 1)
    c = gelf_server(extra=["--connect", a.ws_url] if c_dials else [])
    ns_c = ns_addr(c, ADDR[2])
    c_link = None
    if c_dials:
        (c_link,) = set(wait_links(a, "direct", 2)) - {b_link}
    return (a, b, c), (ns_a, ns_b, ns_c), (b_link, c_link)


class PingLoop:
    """ping from `ns` to `addr` in the background, five a second, until assert_nothing_lost().

    Each request has its icmp_seq; a reply, however late, is counted while ping runs, so a
    request that is never answered is a frame that was lost."""

    def __init__(self, bg, ns, addr):
        self.what = f"ping {ns} -> {addr}"
        self.proc = bg(["ip", "netns", "exec", ns, "ping", "-n", "-i", "0.2", "-W", str(WAIT), addr],
                       name=self.what)

    def assert_nothing_lost(self, tail=5):
        """Stop; every request was answered once, but for the last `tail` (their replies may
        still be on their way when ping stops)."""
        time.sleep(2)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(WAIT)
        self.proc.pump.thread.join(5)
        out = self.proc.pump.text()
        m = re.search(r"(\d+) packets transmitted", out)
        assert m, f"{self.what}: no summary:\n{out}"
        sent = int(m.group(1))
        answered = [int(s) for s in re.findall(r"icmp_seq=(\d+) ttl=", out)]
        missing = sorted(set(range(1, sent - tail + 1)) - set(answered))
        assert sent > 2 * tail, f"{self.what}: only {sent} requests:\n{out}"
        assert not missing, f"{self.what}: requests {missing} of {sent} never answered:\n{out}"
        assert len(answered) == len(set(answered)) and "DUP!" not in out, f"{self.what}: duplicates:\n{out}"
        return sent


def links_logged(server, url, state):
    return len(re.findall(rf"\[Gelf\] link to {re.escape(url)}: {state}", server.log_text()))


@pytest.fixture
def chromium(bg, tmp_path, need_chromium):
    """Factory: chromium(url) -> Popen of Chromium run directly on url, headless, in its own
    process group (as `make bench` runs it). Every group is SIGKILLed at teardown."""
    groups = []

    def launch(url):
        profile = tmp_path / helpers.unique("chromium-profile-")
        profile.mkdir()
        cmd = [helpers.CHROMIUM, "--headless=new", *helpers.CHROMIUM_ARGS, f"--user-data-dir={profile}", url]
        proc = bg(cmd, name="chromium", start_new_session=True)
        groups.append(proc)
        return proc

    yield launch
    for proc in groups:
        kill_group(proc)


def kill_group(proc):
    """SIGKILL Chromium's whole process group (its leader's PID is the group id) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(WAIT)


@pytest.fixture
def many_files():
    """Room for more than a thousand descriptors in this process and in the servers it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * IDLE_SOCKETS
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"needs {want} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class IdleClients:
    """WebSockets that never send a message but read everything (one thread, one epoll) and
    answer the server's pings, as an idle browser tab does."""

    def __init__(self):
        self.clients = {}  # fd -> wsclient.Client
        self.closed_by_server = 0
        self.answered = set()  # fds of the sockets that answered a ping
        self.errors = []
        self._epoll = select.epoll()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="idle-readers", daemon=True)
        self._thread.start()

    def add(self, sock):
        client = wsclient.Client(sock)
        with self._lock:
            self.clients[sock.fileno()] = client
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    def _run(self):
        while not self._stop.is_set():
            for fd, _ in self._epoll.poll(0.2):
                with self._lock:
                    client = self.clients.get(fd)
                if client is None:
                    continue
                try:
                    data = client.sock.recv(1 << 16)
                    if data:
                        client.ws.receive_data(data)
                        out = client.ws.data_to_send()
                        if out:
                            client.sock.sendall(out)  # pongs: a few bytes
                            self.answered.add(fd)
                        continue
                    self.closed_by_server += 1
                except OSError as err:
                    self.errors.append(repr(err))
                self._drop(fd)

    def _drop(self, fd):
        with self._lock:
            client = self.clients.pop(fd, None)
        if client is not None:
            self._epoll.unregister(fd)
            client.sock.close()

    def close(self):
        self._stop.set()
        self._thread.join(5)
        for fd in list(self.clients):
            self._drop(fd)
        self._epoll.close()


def threads_of(proc):
    return len(os.listdir(f"/proc/{proc.pid}/task"))


def fds_of(proc):
    return len(os.listdir(f"/proc/{proc.pid}/fd"))


# A TCP sender that keeps sending until a flag file appears, then finishes: the transfer is
# sure to span whatever the test does meanwhile. About 4 MiB/s, so a busy machine keeps up.
SENDER_UNTIL = r"""
import hashlib, os, socket, sys, time
addr, port, flag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = socket.create_connection((addr, port), timeout=60)
h, n, done = hashlib.sha256(), 0, None
while done is None or n < done:
    if done is None and os.path.exists(flag):
        done = n + (1 << 20)  # one more MiB after the flag
    chunk = os.urandom(1 << 16)
    c.sendall(chunk)
    h.update(chunk)
    n += len(chunk)
    if n % (1 << 20) == 0:
        print("sent", n, flush=True)
    time.sleep(1 / 64)
c.shutdown(socket.SHUT_WR)
while c.recv(1 << 16):
    pass
print("done", n, h.hexdigest(), flush=True)
"""



# ---------------------------------------------------------------- 1. kill -9 of a server

def test_kill9_of_a_server_leaves_the_others_linked(gelf_server, ns_addr, bg):
    (a, b, c), (ns_a, ns_b, ns_c), (b_link, c_link) = three_servers(gelf_server, ns_addr, c_dials=True)
    wait_ping(ns_a, ADDR[1], "A to B before the kill")
    wait_ping(ns_a, ADDR[2], "A to C before the kill")
    a_to_c = PingLoop(bg, ns_a, ADDR[2])
    c_to_a = PingLoop(bg, ns_c, ADDR[0])
    time.sleep(2)

    mac = helpers.link_mac(b.dev, ns_b)
    kill9(b)
    assert wait_links(a, "direct", 1) == [c_link], "A kept B's link, or lost C's"
    loss, out = helpers.ping(ns_a, ADDR[1], count=3)
    assert loss == 100, f"B is dead, yet answers:\n{out}"
    loss, out = helpers.ping(ns_a, ADDR[2], count=10, wait=WAIT)
    assert loss == 0, f"A to C while B is down:\n{out}"

    restart(b, ns_addr, ns_b, ADDR[1], mac)
    wait_links(a, "direct", 2)
    wait_ping(ns_a, ADDR[1], "A to B after B's restart")
    loss, out = helpers.ping(ns_b, ADDR[0], count=10, wait=WAIT)
    assert loss == 0, f"B to A after B's restart:\n{out}"

    a_to_c.assert_nothing_lost()
    c_to_a.assert_nothing_lost()
    assert c_link in link_ids(a, "direct"), "C's link to A was replaced"
    assert links_logged(c, a.ws_url, "open") == 1 and links_logged(c, a.ws_url, "closed") == 0, c.log_text()
    assert "Traceback" not in a.log_text() + c.log_text()


# ---------------------------------------------------------------- 2. kill -9 of the relay

def test_kill9_of_the_relay(gelf_server, ns_addr, bg):
    (a, b, c), (ns_a, ns_b, ns_c), (b_link, _) = three_servers(gelf_server, ns_addr, c_dials=False)
    relay_cmd = [PYTHON, "gelf.py", "relay", "-d", a.ws_url, c.ws_url]
    relay = bg(relay_cmd, name="relay", cwd=REPO)
    wait_links(a, "relay", 1)
    wait_links(c, "relay", 1)
    wait_ping(ns_a, ADDR[2], "A to C through the relay")
    wait_ping(ns_a, ADDR[1], "A to B")
    a_to_b = PingLoop(bg, ns_a, ADDR[1])
    time.sleep(2)

    os.kill(relay.pid, signal.SIGKILL)
    relay.wait(WAIT)
    # The kernel closed the relay's sockets (FIN); keepalive would be the backstop.
    wait_gone(a, "relay")
    wait_gone(c, "relay")
    loss, out = helpers.ping(ns_a, ADDR[2], count=3)
    assert loss == 100, f"the relay is dead, yet C answers:\n{out}"
    loss, out = helpers.ping(ns_a, ADDR[1], count=10, wait=WAIT)
    assert loss == 0, f"A to B while the relay is down:\n{out}"

    bg(relay_cmd, name="relay (again)", cwd=REPO)
    wait_links(a, "relay", 1)
    wait_links(c, "relay", 1)
    wait_ping(ns_a, ADDR[2], "A to C after the relay's restart")
    loss, out = helpers.ping(ns_c, ADDR[0], count=10, wait=WAIT)
    assert loss == 0, f"C to A after the relay's restart:\n{out}"

    a_to_b.assert_nothing_lost()
    assert link_ids(a, "direct") == [b_link], "B's direct link to A was replaced"
    for s in (a, c):
        assert re.search(r"\[Gelf\] link \d+ closed: 127\.0\.0\.1:\d+", s.log_text()), s.log_text()
    assert "Traceback" not in a.log_text() + b.log_text() + c.log_text()


# ---------------------------------------------------------------- 3. kill -9 of the browser

def test_kill9_of_the_browser(gelf_server, ns_addr, bg, chromium):
    (a, b, c), (ns_a, ns_b, ns_c), (b_link, _) = three_servers(gelf_server, ns_addr, c_dials=False)
    page = f"{a.url}/?peer=127.0.0.1:{c.port}"
    browser = chromium(page)
    wait_links(a, "browser", 1)
    wait_links(c, "browser", 1)
    wait_ping(ns_a, ADDR[2], "A to C through the page")
    wait_ping(ns_a, ADDR[1], "A to B")
    a_to_b = PingLoop(bg, ns_a, ADDR[1])
    time.sleep(2)

    kill_group(browser)  # the browser and every helper process of it, at once
    wait_gone(a, "browser")
    wait_gone(c, "browser")
    loss, out = helpers.ping(ns_a, ADDR[2], count=3)
    assert loss == 100, f"the browser is dead, yet C answers:\n{out}"
    loss, out = helpers.ping(ns_a, ADDR[1], count=10, wait=WAIT)
    assert loss == 0, f"A to B while the browser is down:\n{out}"

    chromium(page)
    wait_links(a, "browser", 1)
    wait_links(c, "browser", 1)
    wait_ping(ns_a, ADDR[2], "A to C after the browser's relaunch")
    loss, out = helpers.ping(ns_c, ADDR[0], count=10, wait=WAIT)
    assert loss == 0, f"C to A after the browser's relaunch:\n{out}"

    a_to_b.assert_nothing_lost()
    assert link_ids(a, "direct") == [b_link], "B's direct link to A was replaced"
    assert "Traceback" not in a.log_text() + b.log_text() + c.log_text()


# ---------------------------------------------------------------- 4. a peer killed mid-transfer

def test_a_transfer_runs_across_another_peers_crash(gelf_server, ns_addr, bg, tmp_path):
    (a, b, c), (ns_a, ns_b, ns_c), (_, c_link) = three_servers(gelf_server, ns_addr, c_dials=True)
    wait_ping(ns_a, ADDR[2], "A to C")
    wait_ping(ns_a, ADDR[1], "A to B")
    receiver = bg(["ip", "netns", "exec", ns_c, PYTHON, "-c", helpers.RECEIVER, ADDR[2], str(helpers.TCP_PORT)],
                  name="tcp receiver (C)")
    assert receiver.pump.wait_line(r"^ready$", WAIT), receiver.pump.text()
    flag = tmp_path / "finish"
    sender = bg(["ip", "netns", "exec", ns_a, PYTHON, "-c", SENDER_UNTIL, ADDR[2], str(helpers.TCP_PORT),
                 str(flag)], name="tcp sender (A)")

    def progress(after=0):
        """Wait for the sender to report a MiB count above `after`; return it."""
        pattern = r"^sent (\d+)$"
        m = wait_for(lambda: [int(n) for n in re.findall(pattern, sender.pump.text(), re.M)
                              if int(n) > after], WAIT, what=f"the transfer to pass {after} bytes")
        return max(m)

    progress()  # under way: A's frames to C are offered to B's link too (a hub)
    mac = helpers.link_mac(b.dev, ns_b)
    kill9(b)
    assert wait_links(a, "direct", 1) == [c_link]
    during = progress(progress())  # goes on while B is down
    restart(b, ns_addr, ns_b, ADDR[1], mac)
    wait_links(a, "direct", 2)
    wait_ping(ns_a, ADDR[1], "A to B after B's restart")
    progress(during)
    assert sender.poll() is None, f"the transfer ended before B was back:\n{sender.pump.text()}"

    flag.touch()
    assert sender.wait(WAIT * 2) == 0, sender.pump.text()
    sent = re.search(r"^done (\d+) ([0-9a-f]{64})$", sender.pump.text(), re.M)
    got = receiver.pump.wait_line(r"^received (\d+) ([0-9a-f]{64})$", WAIT)
    assert sent and got, f"sender:\n{sender.pump.text()}\nreceiver:\n{receiver.pump.text()}"
    assert int(got.group(1)) == int(sent.group(1)) >= 4 << 20
    assert got.group(2) == sent.group(2), "the bytes C received are not the bytes A sent"


# ---------------------------------------------------------------- 5. 1 000 idle WebSockets

def test_a_thousand_idle_websockets(gelf_server, ns_addr, bg, tmp_path, many_files):
    # --learn: as a hub, A would copy each frame of the transfer to all 1 000 sockets (10 GB
    # for 10 MiB: 27 s on a 2-core machine, and past the transfer's 60 s bound once the machine
    # was busy). That measures fan-out, not what an idle socket costs; the idle sockets still
    # get every broadcast.
    # --keepalive 3: the idle sockets are pinged every few seconds, and answer, as browsers do.
    a = gelf_server(extra=["--learn", "--keepalive", "3"])
    ns_a = ns_addr(a, ADDR[0])
    b = gelf_server(extra=["--connect", a.ws_url])
    ns_b = ns_addr(b, ADDR[1])
    (b_link,) = wait_links(a, "direct", 1)
    wait_ping(ns_b, ADDR[0], "B to A")
    time.sleep(1)
    threads, fds = threads_of(a.proc), fds_of(a.proc)

    idle = IdleClients()
    try:
        for i in range(IDLE_SOCKETS):
            idle.add(wsclient.upgrade(a.port, source=f"127.0.0.{2 + i // PER_SOURCE}", timeout=WAIT))
        wait_links(a, "browser", IDLE_SOCKETS)
        assert threads_of(a.proc) - threads <= 5, f"{IDLE_SOCKETS} idle WebSockets added threads"

        loss, out = helpers.ping(ns_b, ADDR[0], count=20, wait=WAIT)
        assert loss == 0, f"B to A beside {IDLE_SOCKETS} idle WebSockets:\n{out}"
        transfer(bg, ns_a, ns_b, ADDR[1], tmp_path)
        st = a.stats(timeout=WAIT)
        assert len(open_links(a, "browser", stats=st)) == IDLE_SOCKETS, "idle WebSockets were closed"
        assert [l["id"] for l in open_links(a, "direct", stats=st)] == [b_link]
        wait_for(lambda: len(idle.answered) == IDLE_SOCKETS, WAIT, what="A to ping every idle WebSocket")
        assert len(open_links(a, "browser")) == IDLE_SOCKETS, "idle WebSockets that answer pings were closed"
        assert idle.closed_by_server == 0 and not idle.errors, (idle.closed_by_server, idle.errors[:5])
        assert threads_of(a.proc) - threads <= 5
    finally:
        idle.close()

    wait_gone(a, "browser")
    wait_for(lambda: fds_of(a.proc) <= fds + 2, WAIT,
             what=f"A's descriptors to return to {fds} (now {fds_of(a.proc)})")
    assert link_ids(a, "direct") == [b_link]
    assert "Traceback" not in a.log_text()


# ---------------------------------------------------------------- 6. a page and a restarted server

def test_a_page_reconnects_only_the_link_of_a_restarted_server(gelf_server, ns_addr, bg, open_page):
    (a, b, c), (ns_a, ns_b, ns_c) = helpers.servers_in_namespaces(gelf_server, ns_addr, 3)
    page = open_page(f"{a.url}/?peer=127.0.0.1:{b.port}&peer=127.0.0.1:{c.port}")
    for s in (a, b, c):
        helpers.wait_link_state(page, s.port, "open", timeout=WAIT)
    (a_link,), (b_link,), _ = (wait_links(s, "browser", 1) for s in (a, b, c))
    wait_ping(ns_a, ADDR[1], "A to B through the page")
    wait_ping(ns_a, ADDR[2], "A to C through the page")
    a_to_b = PingLoop(bg, ns_a, ADDR[1])
    time.sleep(2)

    def page_links():
        return dict(page.evaluate("window.gelfRelay.links.map(l => [l.url, l.state])"))

    mac = helpers.link_mac(c.dev, ns_c)
    kill9(c)
    helpers.wait_link_state(page, c.port, None, timeout=WAIT)
    loss, out = helpers.ping(ns_a, ADDR[1], count=10, wait=WAIT)
    assert loss == 0, f"A to B while C is down:\n{out}"
    states = page_links()
    assert states[a.ws_url] == "open" and states[b.ws_url] == "open", states

    restart(c, ns_addr, ns_c, ADDR[2], mac)
    helpers.wait_link_state(page, c.port, "open", timeout=WAIT)
    wait_links(c, "browser", 1)
    wait_ping(ns_a, ADDR[2], "A to C after C's restart")
    loss, out = helpers.ping(ns_c, ADDR[1], count=10, wait=WAIT)
    assert loss == 0, f"C to B after C's restart:\n{out}"

    a_to_b.assert_nothing_lost()
    assert link_ids(a, "browser") == [a_link] and link_ids(b, "browser") == [b_link], \
        "the page reconnected links whose servers never went away"
    assert set(page_links().values()) == {"open"}, page_links()
