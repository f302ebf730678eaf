"""gelf.mirror.capture with reassembly, on real traffic (root): a server namespace and a client
namespace joined by a veth pair, packets reordered (25 %), duplicated (5 %) and lost (1 %) on both
ends (tc netem, or nftables and HTB where the kernel lacks netem), and the capture running in
the server's namespace as production's host would.

The oracle is what the clients sent and received (each prints its bytes' SHA-256 and length):
every client-to-server stream, and every response, is reassembled byte-identical, exactly once.
"""

import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess

import pytest

import helpers
from gelf.mirror import pcapfile
from gelf.mirror.events import TO_SERVER, Kind
from gelf.mirror.reassembly import Reassembler
from helpers import PYTHON, REPO

PORT = 18010
_ids = itertools.count(1)

CAPTURE = r"""
import hashlib, json, signal, socket, struct, sys, time
from gelf.mirror.capture import CaptureError, LiveCapture
from gelf.mirror.events import TO_SERVER, Kind
from gelf.mirror.reassembly import Reassembler

port, bind, ring, dev = int(sys.argv[1]), sys.argv[2] or None, sys.argv[3] == "ring", sys.argv[4] or None
try:
    cap = LiveCapture([port], bind=bind, responses=True, dev=dev, ring=ring)
except CaptureError as e:
    sys.stderr.write("gelf-mirror: error: %s\n" % e)
    sys.exit(1)
r = Reassembler([port], responses=True)
conns = {}


def endpoints(data):  # ADDRESS (docs/mirror.md), decoded by hand
    af, n = (socket.AF_INET, 4) if data[0] == 4 else (socket.AF_INET6, 16)
    cport, sport = struct.unpack("!HH", data[2:6])
    return [socket.inet_ntop(af, data[6:6 + n]), cport], [socket.inet_ntop(af, data[6 + n:6 + 2 * n]), sport]


def handle(events):
    for e in events:
        if e.kind == Kind.OPEN:
            client, server = endpoints(e.data)
            conns[e.conn] = {"client": client, "server": server, "up": hashlib.sha256(), "up_len": 0,
                             "down": hashlib.sha256(), "down_len": 0}
        elif e.kind == Kind.DATA:
            side = "up" if e.direction == TO_SERVER else "down"
            conns[e.conn][side].update(e.data)
            conns[e.conn][side + "_len"] += len(e.data)
        else:
            c = conns.pop(e.conn)
            c.update(up=c["up"].hexdigest(), down=c["down"].hexdigest(), reason=e.data.decode())
            print("conn " + json.dumps(c), flush=True)


stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("ready", flush=True)
while not stop:
    for seg in cap.read(0.2):
        handle(r.feed(seg, time.time()))
    handle(r.expire(time.time()))
handle(r.shutdown(time.time()))
print("stats " + json.dumps({"capture": cap.stats(), "reassembly": r.stats()}), flush=True)
"""

SERVER = r"""
import hashlib, socket, sys, threading
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(128)
print("ready", flush=True)


def serve(c):
    h, n = hashlib.sha256(), 0
    while True:
        b = c.recv(65536)
        if not b:
            break
        h.update(b)
        n += len(b)
    c.sendall(("got %d %s\n" % (n, h.hexdigest())).encode())
    c.close()


while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENTS = r"""
import concurrent.futures, hashlib, json, random, socket, sys
addrs = sys.argv[1].split(",")
port, count, seed, biggest = (int(a) for a in sys.argv[2:6])
rng = random.Random(seed)
jobs = [(addrs[i % len(addrs)], rng.randbytes(rng.randint(0, biggest)), rng.randint(1, 1 << 16)) for i in range(count)]


def one(job):
    addr, data, chunk = job
    c = socket.create_connection((addr, port), timeout=120)
    local = c.getsockname()
    for i in range(0, len(data), chunk):
        c.sendall(data[i:i + chunk])
    c.shutdown(socket.SHUT_WR)
    resp = b""
    while True:
        b = c.recv(65536)
        if not b:
            break
        resp += b
    c.close()
    return {"client": [local[0], local[1]], "server": addr, "up_len": len(data),
            "up": hashlib.sha256(data).hexdigest(), "down_len": len(resp), "down": hashlib.sha256(resp).hexdigest()}


with concurrent.futures.ThreadPoolExecutor(4) as ex:
    for res in ex.map(one, jobs):
        print("conn " + json.dumps(res), flush=True)
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def need_capture_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, veth, AF_PACKET capture)")
    for tool in ("ip", "tc", "nft", "setpriv", "tcpdump"):
        if not shutil.which(tool):
            pytest.skip(f"needs '{tool}' (make sysdeps)")


@pytest.fixture
def pair(need_capture_root):
    """A server namespace and a client namespace joined by a veth pair, with IPv4 and IPv6
    addresses: server .1 and .3 (fd91:N::1 and ::3), client .2 (::2). Deleted at teardown,
    with whatever still runs inside."""
    n = f"{os.getpid() % 10000}x{next(_ids)}"
    ns = {"srv": f"mcap{n}_srv", "cli": f"mcap{n}_cli", "vs": f"mcap{n}s", "vc": f"mcap{n}c",
          "net": next(_ids) % 250}
    made = []
    try:
        for side in ("srv", "cli"):
            helpers.netns_add(ns[side])
            made.append(ns[side])
        helpers.run(["ip", "link", "add", ns["vs"], "netns", ns["srv"], "type", "veth",
                     "peer", "name", ns["vc"], "netns", ns["cli"]])
        v4, v6 = f"10.91.{ns['net']}.", f"fd91:{ns['net']:x}::"
        for side, dev, hosts in (("srv", ns["vs"], (1, 3)), ("cli", ns["vc"], (2,))):
            for h in hosts:
                helpers.run(["ip", "-n", ns[side], "addr", "add", f"{v4}{h}/24", "dev", dev])
                helpers.run(["ip", "-n", ns[side], "addr", "add", f"{v6}{h}/64", "dev", dev, "nodad"])
            helpers.run(["ip", "-n", ns[side], "link", "set", dev, "up"])
            helpers.run(["ip", "-n", ns[side], "link", "set", "lo", "up"])
        ns.update(v4=v4, v6=v6)
        yield ns
    finally:
        for name in reversed(made):
            helpers.netns_del(name)


NETEM = ["delay", "2ms", "reorder", "25%", "50%", "duplicate", "5%", "loss", "1%"]

# The same impairment where the kernel has no sch_netem (this machine's has not): nftables loses
# 1 % (numgen) and duplicates 5 % (dup, the copy leaving first); 25 % of the packets are given
# the fast class of an HTB whose default class is slow, so they overtake the queue behind it.
IMPAIR = """
table %(family)s mcapimp {
  chain out {
    type filter hook output priority 0; policy accept;
    tcp %(port_dir)s %(port)d numgen random mod 100 < 1 drop
    tcp %(port_dir)s %(port)d numgen random mod 100 < 5 dup to %(peer)s
    tcp %(port_dir)s %(port)d meta priority set numgen random mod 4 map { 0 : 1:20, 1 : 1:10, 2 : 1:10, 3 : 1:10 }
  }
}
"""


def impair(pair, family):
    """Reorder 25 %, duplicate 5 %, lose 1 %, both ways: `tc netem`, or IMPAIR without it."""
    sides = (("srv", pair["vs"], "sport", "2"), ("cli", pair["vc"], "dport", "1"))
    for side, dev, port_dir, peer in sides:
        tc = ["tc", "-n", pair[side], "qdisc", "add", "dev", dev, "root"]
        res = helpers.run(tc + ["netem", *NETEM], check=False)
        if res.returncode == 0:
            continue
        assert "unknown" in res.stderr, res.stderr
        helpers.run(tc + ["handle", "1:", "htb", "default", "10"])
        for cls, rate in (("1:10", "20mbit"), ("1:20", "10gbit")):
            helpers.run(["tc", "-n", pair[side], "class", "add", "dev", dev, "parent", "1:", "classid", cls,
                         "htb", "rate", rate])
        rules = IMPAIR % {"family": "ip" if family == 4 else "ip6", "port_dir": port_dir, "port": PORT,
                          "peer": (pair["v4"] if family == 4 else pair["v6"]) + peer}
        helpers.run(["ip", "netns", "exec", pair[side], "nft", "-f", "-"], input=rules)


def start_capture(bg, pair, bind="", ring=True, dev=""):
    cap = bg(["ip", "netns", "exec", pair["srv"], PYTHON, "-c", CAPTURE, str(PORT), bind,
              "ring" if ring else "recv", dev], name="capture", cwd=REPO)
    assert cap.pump.wait_line(r"^ready$", 60), f"capture did not start:\n{cap.pump.text()}"
    return cap


def start_server(bg, pair):
    srv = bg(["ip", "netns", "exec", pair["srv"], PYTHON, "-c", SERVER, str(PORT)], name="server")
    assert srv.pump.wait_line(r"^ready$", 60), f"server did not start:\n{srv.pump.text()}"


def run_clients(pair, addrs, ns_side="cli", count=40, biggest=200_000, seed=1):
    res = helpers.run(["ip", "netns", "exec", pair[ns_side], PYTHON, "-c", CLIENTS, ",".join(addrs),
                       str(PORT), str(count), str(seed), str(biggest)], timeout=600)
    assert res.stdout.rstrip().endswith("done"), res.stdout + res.stderr
    return [json.loads(line[5:]) for line in res.stdout.splitlines() if line.startswith("conn ")]


def captured(cap, want):
    """Stop the capture once every connection in `want` was reported (bounded), then return
    (its connection records, its stats)."""
    keys = {tuple(c["client"]) for c in want}

    def reported():
        return keys <= {tuple(json.loads(line[5:])["client"]) for line in cap.pump.lines if line.startswith("conn ")}

    try:
        helpers.wait_for(reported, 120, interval=0.2, what="the capture to report every connection")
    except TimeoutError:
        pass  # the assertions below say which ones are missing
    cap.send_signal(signal.SIGTERM)  # `ip netns exec` execs: this is the capture itself
    m = cap.pump.wait_line(r"^stats (.*)$", 60)
    assert m, f"capture did not stop:\n{cap.pump.text()}"
    conns = [json.loads(line[5:]) for line in cap.pump.lines if line.startswith("conn ")]
    return conns, json.loads(m.group(1))


def reassemble_file(path):
    """The connection records of CAPTURE, made from a pcap file instead of a live capture."""
    r = Reassembler([PORT], responses=True)
    conns, done = {}, []
    events = [e for seg in pcapfile.segments(path) for e in r.feed(seg, seg.ts)] + r.shutdown(0)
    for e in events:
        if e.kind == Kind.OPEN:
            af, n = (socket.AF_INET, 4) if e.data[0] == 4 else (socket.AF_INET6, 16)
            cport, sport = struct.unpack("!HH", e.data[2:6])
            conns[e.conn] = {"client": [socket.inet_ntop(af, e.data[6:6 + n]), cport],
                             "server": [socket.inet_ntop(af, e.data[6 + n:]), sport],
                             "up": hashlib.sha256(), "up_len": 0, "down": hashlib.sha256(), "down_len": 0}
        elif e.kind == Kind.DATA:
            side = "up" if e.direction == TO_SERVER else "down"
            conns[e.conn][side].update(e.data)
            conns[e.conn][side + "_len"] += len(e.data)
        else:
            c = conns.pop(e.conn)
            c.update(up=c["up"].hexdigest(), down=c["down"].hexdigest(), reason=e.data.decode())
            done.append(c)
    return done


def assert_identical(conns, want, stats):
    got = {}
    for c in conns:
        key = tuple(c["client"])
        assert key not in got, f"connection {key} reassembled twice"
        got[key] = c
    missing = [tuple(w["client"]) for w in want if tuple(w["client"]) not in got]
    assert not missing, f"never reassembled: {missing}; stats {stats}"
    for w in want:
        c = got[tuple(w["client"])]
        assert c["server"][0] == w["server"]
        assert (c["up_len"], c["up"]) == (w["up_len"], w["up"]), f"request stream differs: {c} vs {w}"
        assert (c["down_len"], c["down"]) == (w["down_len"], w["down"]), f"response differs: {c} vs {w}"
        assert c["reason"] == "fin", c
    assert stats["reassembly"]["holes"] == 0 and stats["capture"]["drops"] == 0, stats


@pytest.mark.parametrize("family,ring", [(4, True), (6, True), (4, False)], ids=["v4-ring", "v6-ring", "v4-recv"])
def test_streams_survive_reorder_duplicates_and_loss(bg, pair, tmp_path, family, ring):
    impair(pair, family)
    start_server(bg, pair)
    cap = start_capture(bg, pair, ring=ring)
    # A second capture, by libpcap, read back by pcapfile.py. Immediate mode: on SIGINT, tcpdump
    # does not write what still sits in a ring block the kernel has not handed over yet.
    pcap = tmp_path / "tcpdump.pcap"
    dump = bg(["ip", "netns", "exec", pair["srv"], "tcpdump", "-i", pair["vs"], "--immediate-mode", "-B", "65536",
               "-w", str(pcap), f"tcp port {PORT}"], name="tcpdump")
    assert dump.pump.wait_line(r"listening on", 60), dump.pump.text()
    server = (pair["v4"] if family == 4 else pair["v6"]) + "1"
    want = run_clients(pair, [server])
    conns, stats = captured(cap, want)
    assert_identical(conns, want, stats)
    assert len(conns) == len(want)
    r = stats["reassembly"]
    assert r["retransmitted"] > 0 and r["out_of_order"] > 0, f"the impairment did not act: {r}"
    dump.send_signal(signal.SIGINT)
    assert dump.wait(60) == 0, dump.pump.text()
    assert dump.pump.wait_line(r"^0 packets dropped by kernel", 10), f"tcpdump lost packets:\n{dump.pump.text()}"
    assert_identical(reassemble_file(pcap), want, {"reassembly": {"holes": 0}, "capture": {"drops": 0}})


@pytest.mark.parametrize("family", [4, 6])
def test_bind_captures_only_that_address(bg, pair, family):
    start_server(bg, pair)
    prefix = pair["v4"] if family == 4 else pair["v6"]
    other = pair["v6"] if family == 4 else pair["v4"]
    cap = start_capture(bg, pair, bind=prefix + "1")
    want = run_clients(pair, [prefix + "1", prefix + "3", other + "1"], count=12, biggest=20_000)
    conns, stats = captured(cap, [w for w in want if w["server"] == prefix + "1"])
    assert_identical(conns, [w for w in want if w["server"] == prefix + "1"], stats)
    assert {c["server"][0] for c in conns} == {prefix + "1"}
    assert stats["capture"]["kernel_packets"] == stats["capture"]["packets"] == stats["capture"]["segments"]


def test_loopback_packets_are_seen_once(bg, pair):
    """lo shows each packet twice to a packet socket; the filter keeps one. The count is checked
    against tcpdump's on the same traffic (libpcap drops the outgoing copy on lo itself)."""
    start_server(bg, pair)
    dump = bg(["ip", "netns", "exec", pair["srv"], "tcpdump", "-i", "lo", "--immediate-mode", "-B", "65536",
               "-w", "/dev/null", f"tcp port {PORT}"], name="tcpdump")
    assert dump.pump.wait_line(r"listening on", 60), dump.pump.text()
    cap = start_capture(bg, pair, dev="lo")
    want = run_clients(pair, ["127.0.0.1", "::1"], ns_side="srv", count=10, biggest=100_000)
    conns, stats = captured(cap, want)
    assert_identical(conns, want, stats)
    dump.send_signal(signal.SIGINT)
    assert dump.wait(60) == 0, dump.pump.text()
    m = dump.pump.wait_line(r"^(\d+) packets captured", 10)
    assert m and dump.pump.wait_line(r"^0 packets dropped by kernel", 10), dump.pump.text()
    assert stats["capture"]["kernel_packets"] == int(m.group(1)), (stats, dump.pump.text())


@pytest.mark.parametrize("how", ["nobody", "root-without-cap_net_raw"])
def test_without_cap_net_raw_one_actionable_line(pair, how):
    if how == "nobody":  # the venv's interpreter may live under /root: use the system's
        prefix, python = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"], "/usr/bin/python3"
    else:
        prefix, python = ["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw"], PYTHON
    res = subprocess.run(["ip", "netns", "exec", pair["srv"], *prefix, python, "-c", CAPTURE, str(PORT), "",
                          "ring", ""], capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 1, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("gelf-mirror: error: capture needs root or CAP_NET_RAW: run it with sudo, "
                               "or setcap cap_net_raw+ep /"), lines[0]


def test_bad_arguments_one_line_each(need_capture_root):
    from gelf.mirror.capture import CaptureError, LiveCapture

    for kw, words in (({"dev": "mcapnosuchdev"}, "no network interface 'mcapnosuchdev' here"),
                      ({"bind": "10.0.0.300"}, "'10.0.0.300' is not an IPv4 or IPv6 address"),
                      ({"ports": [0]}, "ports between 1 and 65535")):
        args = {"ports": [PORT], **kw}
        with pytest.raises(CaptureError) as info:
            LiveCapture(args.pop("ports"), **args)
        assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "recv"])
def test_a_stalled_capture_loses_nothing(bg, pair, ring):
    """The kernel holds what arrives while the capture is not reading (SIGSTOP): a burst."""
    start_server(bg, pair)
    cap = start_capture(bg, pair, ring=ring)
    cap.send_signal(signal.SIGSTOP)
    try:
        want = run_clients(pair, [pair["v4"] + "1"], count=20, biggest=100_000)
    finally:
        cap.send_signal(signal.SIGCONT)
    conns, stats = captured(cap, want)
    assert_identical(conns, want, stats)


LATE_CLIENT = r"""
import fcntl, hashlib, json, os, socket, struct, sys, termios, time
addr, port, flag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
before, after = os.urandom(50_000), os.urandom(120_000)
c = socket.create_connection((addr, port), timeout=120)
c.sendall(before)
acked_by = time.monotonic() + 60
while struct.unpack("i", fcntl.ioctl(c.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0] and time.monotonic() < acked_by:
    time.sleep(0.01)  # until the server has acknowledged all of it: nothing in flight
print("connected", flush=True)
deadline = time.monotonic() + 120
while not os.path.exists(flag) and time.monotonic() < deadline:
    time.sleep(0.05)
c.sendall(after)
c.shutdown(socket.SHUT_WR)
resp = b""
while True:
    b = c.recv(65536)
    if not b:
        break
    resp += b
local = c.getsockname()
print("conn " + json.dumps({"client": [local[0], local[1]], "server": addr, "up_len": len(after),
      "up": hashlib.sha256(after).hexdigest(), "down_len": len(resp), "down": hashlib.sha256(resp).hexdigest()}),
      flush=True)
"""


def test_a_connection_open_before_the_capture_is_picked_up(bg, pair, tmp_path):
    """Only what is sent after the capture started can be mirrored: that part, exactly."""
    start_server(bg, pair)
    flag = tmp_path / "go"
    client = bg(["ip", "netns", "exec", pair["cli"], PYTHON, "-c", LATE_CLIENT, pair["v4"] + "1", str(PORT),
                 str(flag)], name="late client")
    assert client.pump.wait_line(r"^connected$", 60), client.pump.text()
    cap = start_capture(bg, pair)
    flag.touch()
    m = client.pump.wait_line(r"^conn (.*)$", 120)
    assert m, client.pump.text()
    want = [json.loads(m.group(1))]
    conns, stats = captured(cap, want)
    assert_identical(conns, want, stats)
