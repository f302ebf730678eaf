"""gelf-mirror end to end (issue 9, acceptance 1-5, 7 and 8), through the command line only.

Namespaces prod, stg1, stg2, relay and cli (tests/mirror_harness.py): production is nginx in
prod on port 80, the clients' requests come from cli, and gelf-mirror runs as a user runs it,
`gelf-mirror ...` inside the namespaces. The oracle is what the load generator sent (method,
path, body SHA-256, per connection, in order) against what each staging server recorded.

Tests assert behaviour, never speed: production's latency with and without the mirror is
measured in `make bench` (bench/mirror.py). Every wait is bounded and generous.

Until gelf/mirror/cli.py exists (the parts on m-capture, m-out, m-http merged), the acceptance
tests fail under CI with a message saying so, and are skipped elsewhere. The test_harness_*
tests prove the harness itself against a stand-in mirror (STANDIN, a tee proxy in prod), so
they run now and keep running after the merge.
"""

import os
import time

import pytest

import helpers
import mirror_harness as mh
from mirror_harness import RELAY_PORT, STAGING_PORT, STANDIN_PORT, hostport, v4, v6

KEY1 = "00112233445566778899aabbccddeeff"
KEY2 = "ffeeddccbbaa99887766554433221100"
ARRIVE = 180  # seconds every mirrored request may take to reach the staging servers
IMPAIR = {"delay": 0.004, "reorder": 0.25, "duplicate": 0.05, "loss": 0.01}


def _ci():
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, veth, AF_PACKET capture)")
    for tool in ("ip", "ss", "ping"):
        if not mh.shutil.which(tool):
            pytest.skip("needs '%s' (make sysdeps)" % tool)


@pytest.fixture(scope="module")
def need_cli(need_root):
    """The acceptance tests need gelf-mirror: a clear failure under CI, never a green skip."""
    if not mh.CLI.exists():
        msg = ("gelf/mirror/cli.py does not exist: gelf-mirror (issue 9: branches m-capture, m-out, "
               "m-http) is not merged yet, so its acceptance tests cannot run")
        if _ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


@pytest.fixture
def topo(request, need_root, tmp_path):
    """Factory: topo(impair=None) -> a Topology, closed at teardown; its logs shown on failure."""
    made = []

    def make(impair=None):
        t = mh.Topology(tmp_path, impair=impair)
        made.append(t)
        return t

    request.node._gelf_bg = ProcLogs(made)  # conftest adds these to a failed test's report
    yield make
    for t in made:
        t.close()


class ProcLogs:
    """(name, log) of every process the test's topologies started, for conftest's report hook."""

    def __init__(self, topologies):
        self.topologies = topologies

    def __iter__(self):
        for t in self.topologies:
            for p in t.procs:
                yield "%s (pid %d, rc %s)" % (p.name, p.pid, p.p.returncode), p.log


def wait_arrived(staging, sent, tag, timeout=ARRIVE):
    """Wait until staging has as many of tag's requests as were sent (bounded); return them."""
    try:
        mh.wait_for(lambda: len(staging.tagged(tag)) >= len(sent), timeout, 0.5,
                    "%d requests at %s" % (len(sent), staging.name))
    except TimeoutError:
        pass  # compare() says which are missing
    time.sleep(1.0)  # a duplicate would come now
    return staging.tagged(tag)


def assert_mirrored(sent, stagings, tag, timeout=ARRIVE):
    problems = {}
    for s in stagings:
        p = mh.compare(sent, wait_arrived(s, sent, tag, timeout))
        if p:
            problems[s.name] = p
    assert not problems, problems


def assert_production_ok(sent, summary):
    assert not summary["errors"], summary["errors"][:5]
    bad = [r for r in sent if r["status"] != 200]
    assert not bad, bad[:3]


# ---------------------------------------------------------------- the stand-in (harness self-tests)

# A tee proxy standing in for gelf-mirror: it listens on its own port in prod, passes each client
# connection on to production and copies the client's bytes to every upstream (answers drained).
STANDIN = r"""
import socket, sys, threading
listen_port, prod_port, ups = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]


def dial(text):
    host, _, port = text.rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), 30)


def drain(sock):
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def pump(src, dsts, done):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            for d in dsts:
                d.sendall(data)
    except OSError:
        pass
    for d in dsts:
        try:
            d.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    done()


def serve(client):
    prod = socket.create_connection(("127.0.0.1", prod_port), 30)
    copies = [dial(u) for u in ups]
    for c in copies:
        threading.Thread(target=drain, args=(c,), daemon=True).start()
    threading.Thread(target=pump, args=(prod, [client], lambda: None), daemon=True).start()
    pump(client, [prod] + copies, lambda: None)


s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", listen_port))
s.listen(256)
print("capturing connections to port %d (stand-in)" % listen_port, flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def standin(t, *upstreams):
    return t.mirror("prod", STANDIN_PORT, 80, *upstreams, name="stand-in", prog=[mh.PYTHON, "-c", STANDIN],
                    ready=mh.READY_CAPTURE)


def test_harness_topology_servers_load_and_cleanup(topo):
    """Namespaces joined, production and two recording servers, load through the stand-in
    arriving identical at both; then close() leaves no namespace and no process behind."""
    t = topo()
    prod = t.production(prefer_nginx=False)
    s1, s2 = t.staging("stg1"), t.staging("stg2")
    proc = standin(t, hostport(v4("stg1"), STAGING_PORT), hostport(v6("stg2"), STAGING_PORT))
    target = hostport(v4("prod"), STANDIN_PORT)
    t.warm_up(target, [s1, s2])
    sent, summary = t.load(target, 200, "self", seed=7, max_body=300_000)
    assert summary["requests"] == len(sent) == 200
    assert_production_ok(sent, summary)
    assert {r["mode"] for r in sent} == {"keepalive", "pipelined"}
    assert any(r["chunked"] for r in sent) and any(r["method"] == "POST" for r in sent)
    assert_mirrored(sent, [s1, s2], "self", timeout=60)
    # the oracle notices what a mirror could get wrong
    got = s1.tagged("self")
    assert mh.compare(sent, got[:-1]) and mh.compare(sent, got + got[:1])
    assert mh.compare(sent, [dict(got[0], sha="0" * 64)] + got[1:])
    assert proc.rss_mb() > 0 and len(prod.requests()) >= 200
    names, pids = list(t.ns.values()), [p.pid for p in t.procs]
    t.close()
    listed = mh.sh(["ip", "netns", "list"]).stdout
    assert not [n for n in names if n in listed.split()]
    assert not [pid for pid in pids if os.path.exists("/proc/%d" % pid)]


def test_harness_ipv6_extra_addresses_and_listeners(topo):
    """IPv6 and the second addresses (--bind tests) are reachable; listeners are seen by ss."""
    t = topo()
    s2 = t.staging("stg2")
    standin(t, hostport(v6("stg2"), STAGING_PORT))
    t.production(prefer_nginx=False)
    for addr in (v6("prod"), v4("prod", True), v6("prod", True)):
        sent, summary = t.load(hostport(addr, STANDIN_PORT), 20, "x%s" % addr.replace(":", "").replace(".", ""),
                               posts=0.5, max_body=20_000)
        assert_production_ok(sent, summary)
    assert ("::", STAGING_PORT) in t.listening("stg2") or ("*", STAGING_PORT) in t.listening("stg2")
    assert len(s2.tagged("xfd831")) == 20


def test_harness_impaired_path(topo):
    """The emulated clients-to-prod path really reorders, duplicates and loses, and the load still
    completes through it, every request once at the staging server."""
    t = topo(impair=IMPAIR)
    t.production(prefer_nginx=False)
    s1 = t.staging("stg1")
    standin(t, hostport(v4("stg1"), STAGING_PORT))
    sent, summary = t.load(hostport(v4("prod"), STANDIN_PORT), 150, "imp", max_body=200_000)
    assert_production_ok(sent, summary)
    assert_mirrored(sent, [s1], "imp", timeout=60)
    stats = t.wanem_control({"stats": True})
    assert stats["duplicated"] > 0
    assert sum(p["drops"]["loss"] for p in stats["ports"].values()) > 0
    assert all(p["reorder"] == 0.25 for p in stats["ports"].values())


def test_harness_staging_fail_path_and_stall(topo):
    """A staging server answers 500 on its fail path only; a stalled one accepts and never reads."""
    t = topo()
    fail = "/e2e/f/0/0"
    t.staging("stg1", fail_path=fail)
    stall = t.staging("stg2", mode="stall")
    sent, summary = t.load(hostport(v4("stg1"), STAGING_PORT), 6, "f", per_conn=3, pipelined=0.5, posts=0.5)
    assert [r["status"] for r in sent] == [500 if r["path"].split("?")[0] == fail else 200 for r in sent]
    assert sorted(r["status"] for r in sent) == [200] * 5 + [500]
    code = ("import socket,sys; s=socket.create_connection((sys.argv[1],%d),10); s.settimeout(5)\n"
            "try:\n s.sendall(b'x'*(8<<20)); print('sent')\nexcept socket.timeout: print('stalled')" % STAGING_PORT)
    assert t.run_in("cli", [mh.PYTHON, "-c", code, v4("stg2")]).stdout.strip() == "stalled"
    assert stall.requests() == []


def test_harness_parse_report():
    text = ("[Gelf] something\n[Gelf] done: 12 connections, 3456 bytes; tcp://10.83.0.2:18320 conns=12 "
            "upstream_down=3; relay://[fd83::4]:18310 -")
    rep = mh.parse_report(text)
    assert rep == {"conns": 12, "bytes": 3456, "outputs": {"tcp://10.83.0.2:18320": {"conns": 12, "upstream_down": 3},
                                                           "relay://[fd83::4]:18310": {}}}
    assert mh.parse_report("no such line") is None


# ---------------------------------------------------------------- acceptance (gelf-mirror itself)

def start_relay(t, *args, addr=None, upstream=None, port=RELAY_PORT):
    args = ["-r", "-p", port] + (["--bind", addr] if addr else []) + list(args)
    args += ["-u", upstream or "tcp://" + hostport(v4("stg1"), STAGING_PORT), "-v"]
    return t.mirror("relay", *args, name="relay-%d" % port, ready=mh.READY_RELAY)


def start_capture(t, *args, name="capture", role="prod"):
    return t.mirror(role, "-c", "-p", "80", "-v", *args, name=name, ready=mh.READY_CAPTURE)


@pytest.mark.parametrize("impair", [None, IMPAIR], ids=["clean", "reorder-dup-loss"])
def test_1000_requests_reach_both_stagings_through_relay_and_direct(need_cli, topo, impair):
    """Acceptance 1 and 2: 1 000 requests (GET; POST up to 1 MiB; keep-alive, pipelined, chunked)
    arrive at stg1 through a relay and at stg2 directly, identical, each once, in order per
    connection; also over a path reordering 25 %, duplicating 5 % and losing 1 %."""
    t = topo(impair=impair)
    t.production()
    s1, s2 = t.staging("stg1"), t.staging("stg2")
    start_relay(t)
    capture = start_capture(t, "-u", "relay://" + hostport(v4("relay"), RELAY_PORT),
                            "-u", "tcp://" + hostport(v4("stg2"), STAGING_PORT))
    target = hostport(v4("prod"), 80)
    t.warm_up(target, [s1, s2])
    sent, summary = t.load(target, 1000, "a1", timeout=600)
    assert_production_ok(sent, summary)
    assert max(r["len"] for r in sent) == 1 << 20
    assert_mirrored(sent, [s1, s2], "a1")
    assert capture.alive(), capture.text()


@pytest.mark.parametrize("family", [4, 6])
def test_bind_mirrors_only_that_address(need_cli, topo, family):
    """Acceptance 3: with --bind, requests to that address (v4 or v6) are mirrored, and requests
    to prod's other addresses are not."""
    t = topo()
    t.production()
    s2 = t.staging("stg2")
    addr = v4("prod") if family == 4 else v6("prod")
    others = [v4("prod", True), v6("prod", True), v6("prod") if family == 4 else v4("prod")]
    start_capture(t, "--bind", addr, "-u", "tcp://" + hostport(v6("stg2") if family == 6 else v4("stg2"),
                                                                 STAGING_PORT))
    t.warm_up(hostport(addr, 80), [s2])
    sent, summary = t.load(hostport(addr, 80), 100, "in", max_body=100_000)
    assert_production_ok(sent, summary)
    for k, other in enumerate(others):
        out, summary = t.load(hostport(other, 80), 20, "out%d" % k, max_body=10_000)
        assert_production_ok(out, summary)
    assert_mirrored(sent, [s2], "in")
    time.sleep(3)
    leaked = [r["path"] for r in s2.requests() if r["path"].startswith("/e2e/out")]
    assert not leaked, "requests to other addresses were mirrored: %s" % leaked[:5]


def test_relay_bind_listens_only_there_and_ipv6_throughout(need_cli, topo):
    """Acceptance 3: a relay with --bind (IPv6) listens only on that address; capture reaches it
    over IPv6 and it replays to an IPv6 upstream."""
    t = topo()
    t.production()
    s1 = t.staging("stg1")
    start_relay(t, addr=v6("relay", True), upstream="tcp://" + hostport(v6("stg1"), STAGING_PORT))
    listeners = [a for a, p in t.listening("relay") if p == RELAY_PORT]
    assert listeners == [v6("relay", True)], listeners
    for other in (v4("relay"), v4("relay", True), v6("relay")):
        assert not t.reachable("cli", other, RELAY_PORT), "relay answers on %s" % other
    start_capture(t, "-u", "relay://" + hostport(v6("relay", True), RELAY_PORT))
    t.warm_up(hostport(v6("prod"), 80), [s1])
    sent, summary = t.load(hostport(v6("prod"), 80), 200, "v6", max_body=200_000)
    assert_production_ok(sent, summary)
    assert_mirrored(sent, [s1], "v6")


@pytest.mark.parametrize("failure", ["dead", "stalled"])
def test_failing_upstream_hurts_no_one_and_recovers(need_cli, topo, failure):
    """Acceptance 4 (behaviour; latency is in the bench): with stg1 dead or stalled, production
    answers every request, stg2 gets every request, the capture's memory stays bounded (an
    unbounded queue would hold the 96 MiB of bodies), the failures are counted, and once stg1 is
    back it gets every request again."""
    t = topo()
    t.production()
    s2 = t.staging("stg2")
    s1 = t.staging("stg1")
    up1 = "tcp://" + hostport(v4("stg1"), STAGING_PORT)
    capture = start_capture(t, "-u", up1, "-u", "tcp://" + hostport(v4("stg2"), STAGING_PORT))
    target = hostport(v4("prod"), 80)
    t.warm_up(target, [s1, s2])
    s1.stop()
    if failure == "stalled":
        s1.start(mode="stall")
    sent, summary = t.load(target, 400, "down", posts=0.3, large=0.8, max_body=1 << 20, timeout=600)
    assert_production_ok(sent, summary)
    assert sum(r["len"] for r in sent) > 30 << 20
    bulk, summary = t.load(target, 96, "bulk", posts=1.0, large=1.0, max_body=1 << 20, per_conn=4,
                           timeout=600)
    assert_production_ok(bulk, summary)
    assert_mirrored(sent, [s2], "down")
    assert_mirrored(bulk, [s2], "bulk")
    peak = capture.rss_mb("VmHWM")
    assert peak < 150, "capture's peak RSS %.0f MB: its queue for the failing upstream is not bounded" % peak
    assert not s1.tagged("down") or failure == "stalled"
    s1.stop()
    s1.start()
    t.warm_up(target, [s1], timeout=120, tag="back")  # the redial backoff is at most 30 s
    again, summary = t.load(target, 200, "again", max_body=200_000)
    assert_production_ok(again, summary)
    assert_mirrored(again, [s1, s2], "again")
    assert capture.stop() == 0
    report = mh.parse_report(capture.text())
    assert report, capture.text()[-2000:]
    failures = ("upstream_down", "upstream_reset", "stalled", "queue_full", "lost_events")
    counts = report["outputs"][up1]
    assert sum(counts.get(k, 0) for k in failures) > 0, report
    other = report["outputs"]["tcp://" + hostport(v4("stg2"), STAGING_PORT)]
    assert sum(other.get(k, 0) for k in failures) == 0, report


def test_record_then_replay_at_200_percent(need_cli, topo):
    """Acceptance 5: --record, then --replay --speed 200%: the same requests in the same order,
    and faster than the recording took (timing asserted generously)."""
    t = topo()
    t.production()
    s1 = t.staging("stg1")
    rec = t.tmpdir("record") / "requests.gelfmir"
    capture = start_capture(t, "--record", rec)
    time.sleep(2)  # capture has no upstream to warm up with: give its socket a moment
    sent, summary = t.load(hostport(v4("prod"), 80), 240, "rec", interval=0.025, per_conn=12, posts=0.3,
                           max_body=20_000)
    assert_production_ok(sent, summary)
    time.sleep(3)
    assert capture.stop() == 0
    span_sent = max(r["t_sent"] for r in sent) - min(r["t_sent"] for r in sent)
    replay = t.mirror("relay", "--replay", rec, "--speed", "200%", "-u", "tcp://" + hostport(v4("stg1"), STAGING_PORT),
                      name="replay")
    assert replay.p.wait(300) == 0, replay.text()
    got = wait_arrived(s1, sent, "rec")
    assert not mh.compare(sent, got), mh.compare(sent, got)
    assert [r["path"] for r in got] == [r["path"] for r in sorted(sent, key=lambda r: r["k"])]
    span_got = got[-1]["t"] - got[0]["t"]
    assert span_got < 0.85 * span_sent, "replay at 200%% took %.1f s, the recording %.1f s" % (span_got, span_sent)


GOPHER = [  # Gopher's README examples as written, machine names replaced
    ("prod", "--mode=capture --port=80 --upstream=machineB:1080"),
    ("prod", "-c -p 80 -u machineB:3280 -u machineC:3280 -u machineD"),
    ("stg1", "-r -p 3280 -u localhost:80"),
    ("relay", "-r -p 3280 -u machineA:1080"),
]
MACHINES = {"machineA": v4("prod"), "machineB": v4("stg1"), "machineC": v4("relay"), "machineD": v4("stg2")}


def test_gophers_four_command_lines(need_cli, topo):
    """Acceptance 7: Gopher's command lines, only the host names replaced (ports as written,
    inside these namespaces): every request reaches B:1080, B:80 (relay B), A:1080 (relay C)
    and D:80."""
    t = topo()
    t.production()
    b1080 = t.staging("stg1", 1080)
    b80 = t.staging("stg1", 80)
    a1080 = t.staging("prod", 1080)
    d80 = t.staging("stg2", 80)
    for role, line in reversed(GOPHER):  # relays first, as a user would
        for name, addr in MACHINES.items():
            line = line.replace(name, addr)
        ready = mh.READY_RELAY if " -r " in " %s " % line else mh.READY_CAPTURE
        t.mirror(role, *line.split(), name="gopher-%s" % role, ready=ready)
    stagings = [b1080, b80, a1080, d80]
    t.warm_up(hostport(v4("prod"), 80), stagings)
    sent, summary = t.load(hostport(v4("prod"), 80), 200, "gopher", max_body=200_000)
    assert_production_ok(sent, summary)
    assert_mirrored(sent, stagings, "gopher")


WS_CLIENT = r"""
import base64, os, socket, sys
host, port, path, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3], bytes.fromhex(sys.argv[4])
s = socket.create_connection((host, port), 10)
s.sendall(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nUser-Agent: gelf/0.1.0 direct\r\n\r\n"
           % (path, host, port, base64.b64encode(os.urandom(16)).decode())).encode())
s.settimeout(30)
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(4096)
print(head.split(b"\r\n")[0].decode(), flush=True)
mask, n = os.urandom(4), len(payload)
frame = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")) + mask
s.sendall(frame + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
rest = head.split(b"\r\n\r\n", 1)[1]
try:
    while True:
        if rest[:1] == b"\x88":
            print("close frame", flush=True)
            break
        data = s.recv(4096)
        if not data:
            print("closed", flush=True)
            break
        rest += data
except socket.timeout:
    print("still open", flush=True)
"""

RAW_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 10)
s.settimeout(30)
s.sendall(bytes(range(1, 200)) + b"\r\n\r\n")
try:
    while s.recv(4096):
        pass
    print("closed")
except socket.timeout:
    print("still open")
"""


def test_bad_input_on_a_relay_port(need_cli, topo):
    """Acceptance 8: garbage, a gelf (Ethernet) client, a wrong token and a wrong key on a relay's
    port each end with a closed connection (and, but for raw garbage, which gelf's gate answers
    with a 400, a log line saying why); the relays do not crash and still serve a good capture;
    capture without CAP_NET_RAW says what is missing, in one line."""
    t = topo()
    t.production()
    s1 = t.staging("stg1")
    raddr = v4("relay")
    open_relay = start_relay(t, "--token", "right")
    sealed = start_relay(t, "--key", KEY1, port=RELAY_PORT + 1)
    # garbage
    out = t.run_in("cli", [mh.PYTHON, "-c", RAW_CLIENT, raddr, RELAY_PORT]).stdout
    assert out.strip() == "closed", out
    # a gelf Ethernet client: a gelf DATA message of one frame (docs/design.md's wire format)
    data = helpers.encode([helpers.eth_frame(b"hello")], origin=0x0A0B0C0D, seq=1)
    out = t.run_in("cli", [mh.PYTHON, "-c", WS_CLIENT, raddr, RELAY_PORT, "/ws?token=right", data.hex()]).stdout
    assert " 101 " in out and ("closed" in out or "close frame" in out), out
    assert open_relay.wait_line(r"[Ee]thernet", 30), open_relay.text()
    # a wrong token, then a wrong key, from real captures
    bad_token = start_capture(t, "--token", "wrong", "-u", "relay://" + hostport(raddr, RELAY_PORT),
                              name="capture-bad-token")
    bad_key = start_capture(t, "--key", KEY2, "-u", "relay://" + hostport(raddr, RELAY_PORT + 1),
                            name="capture-bad-key")
    t.load(hostport(v4("prod"), 80), 20, "bad", max_body=1000)
    assert open_relay.wait_line(r"(wrong|missing).*token|token.*(wrong|refused)", 60), open_relay.text()
    assert sealed.wait_line(r"--key|key does not match|authentication", 60), sealed.text()
    bad_key.stop()
    bad_token.stop()
    time.sleep(2)
    assert not s1.tagged("bad")
    for relay in (open_relay, sealed):
        assert relay.alive() and "Traceback" not in relay.text(), relay.text()
    good = start_capture(t, "--token", "right", "-u", "relay://" + hostport(raddr, RELAY_PORT), name="capture-good")
    good_sealed = start_capture(t, "--key", KEY1, "-u", "relay://" + hostport(raddr, RELAY_PORT + 1),
                                name="capture-good-sealed")
    t.warm_up(hostport(v4("prod"), 80), [s1], copies=2)
    sent, summary = t.load(hostport(v4("prod"), 80), 50, "good", max_body=10_000)
    assert_production_ok(sent, summary)
    got = wait_arrived(s1, sent + sent, "good")  # from both relays
    assert sorted(map(mh.key, got)) == sorted(map(mh.key, sent + sent))
    for proc in (good, good_sealed, open_relay, sealed):
        assert proc.alive() and "Traceback" not in proc.text(), proc.text()
    # capture without the privilege it needs
    res = t.run_in("prod", ["setpriv", "--inh-caps=-net_raw,-net_admin", "--bounding-set=-net_raw,-net_admin"]
                   + mh.mirror_cmd() + ["-c", "-p", "80", "-u", "tcp://" + hostport(v4("stg2"), STAGING_PORT)],
                   check=False, timeout=60)
    text = (res.stdout + res.stderr).strip()
    assert res.returncode == 1, text
    assert len(text.splitlines()) == 1 and text.startswith("gelf-mirror: error:"), text
    assert "CAP_NET_RAW" in text, text


def test_harness_bench_parsers():
    """bench/mirror.py reads wrk's and tcpdump's output and paces wrk as documented."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_mirror", mh.REPO / "bench" / "mirror.py")
    bm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bm)
    wrk = ("  Latency Distribution\n     50%   68.00us\n     75%   71.00us\n     90%   92.00us\n"
           "     99%    1.36ms\n  412783 requests in 2.00s, 59.05MB read\n"
           "  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 5\n"
           "Requests/sec: 206341.77\n")
    assert bm.parse_wrk(wrk) == {"rps": 206341.77, "p50": 0.068, "p99": 1.36, "errors": 3, "non2xx": 5}
    assert bm.parse_wrk("unable to connect")["rps"] is None
    assert bm.tcpdump_dropped("12 packets captured\n12 packets received by filter\n3 packets dropped by kernel") == 3
    for rate in (50, 1000, 15000, 50000):
        conns, delay = bm.pacing(rate)
        assert abs(conns * 1000 / delay - rate) / rate < 0.05
    steps = [{"rate": 900.0, "missing": 0, "errors": 0, "non2xx": 0},
             {"rate": 5000.0, "missing": 0, "errors": 0, "non2xx": 0},
             {"rate": 9000.0, "missing": 12, "errors": 0, "non2xx": 0}]
    assert bm.best(steps, False) == "5000 req/s (next: 9000 req/s, 12 missing)"
    assert bm.best(steps[:2], True) == "327.7 MB/s"
