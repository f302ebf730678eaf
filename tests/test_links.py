"""Links and topology (issue 4) end to end: direct server-to-server links (ws and wss), the
headless relay, cycles without storms or duplicates, reconnection, --bridge, --address, --learn.

No browser: servers dial each other (--connect) or a relay process links them. Taps sit in
network namespaces the tests create; WebSockets run on 127.0.0.1 (of the root namespace, or of a
test namespace for the --bridge and --address tests, whose servers run inside it).
"""

import json
import re
import signal
import ssl
import time
import urllib.request

import pytest

import helpers
from helpers import ADDR, PYTHON, REPO, assert_pings, run, servers_in_namespaces, transfer, wait_for

pytestmark = pytest.mark.usefixtures("need_root")

KEY = "b04c96f0e62fd14424e7e58e3d8ba957"
TOKEN = "links-s3cret"


# ---------------------------------------------------------------- helpers

@pytest.fixture
def ns_server(request, gelf_server, tmp_path):
    """Factory: ns_server(ns, extra=[...]) -> a started server running inside namespace ns.

    It joins gelf_server's list, so it is stopped (and its log shown on failure) like the others,
    before the namespaces are deleted."""

    def start(ns, dev=None, port=None, extra=()):
        srv = helpers.NsGelfServer(ns, dev or helpers.tap_name(), port or helpers.free_port(),
                                   log_dir=tmp_path, extra=extra)
        request.node._gelf_servers.append(srv)
        return srv.start()

    return start


def links(server, kind=None, state=None, stats=None):
    st = stats if stats is not None else server.stats()
    return [l for l in st["links"]
            if (kind is None or l["kind"] == kind) and (state is None or l["state"] == state)]


def wait_open(server, kind, count=1, timeout=60):
    """Wait until `server` has exactly `count` open links of `kind`; return them."""
    return wait_for(lambda: (lambda ls: ls if len(ls) == count else None)(links(server, kind, "open")),
                    timeout, what=f"{count} open {kind} link(s) on {server.dev}")


def link_line(url, state):
    return rf"\[Gelf\] link to {re.escape(url)}: {state}"


def wait_log(server, pattern, timeout=60):
    m = server.logs[-1].wait_line(pattern, timeout, alive=server.alive)
    assert m, f"no line matching {pattern!r} within {timeout}s:\n{server.log_text()}"
    return m


def quiet_ns(ns):
    """No IPv6 (router solicitations, MLD, DAD) on interfaces that later enter ns: an idle
    segment then carries nothing at all."""
    for which in ("all", "default"):
        run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{which}.disable_ipv6=1"])


def quiet_servers(gelf_server, ns_addr, netns, extras):
    servers, spaces = [], []
    for i, extra in enumerate(extras):
        s = gelf_server(extra=extra)
        ns = netns()
        quiet_ns(ns)
        ns_addr(s, ADDR[i], ns=ns)
        servers.append(s)
        spaces.append(ns)
    return servers, spaces


def start_relay(bg, *urls, module=False, extra=(), name="relay"):
    cmd = [PYTHON, "-m", "gelf.relay"] if module else [PYTHON, "gelf.py", "relay"]
    proc = bg(cmd + ["-d", *extra, *urls], name=name, cwd=REPO)
    assert proc.pump.wait_line(rf"\[Gelf\] Relay linking {len(urls)} servers", 60), proc.pump.text()
    for url in urls:
        assert proc.pump.wait_line(link_line(url, "open"), 60), proc.pump.text()
    return proc


def capture(bg, ns, iface, path):
    proc = bg(["ip", "netns", "exec", ns, "tcpdump", "-i", iface, "-U", "-n", "-w", str(path), "icmp"],
              name=f"tcpdump {iface}")
    assert proc.pump.wait_line(r"listening on", 60), proc.pump.text()
    return proc


def echo_requests(proc, path, count):
    def written():  # tcpdump may lag on a busy machine: stopping it drops what it has not written
        return run(["tcpdump", "-r", str(path), "-n", "icmp"], check=False).stdout.count("echo request")

    try:
        wait_for(lambda: written() >= count, 30, what=f"{count} echo requests in {path.name}")
    except TimeoutError:
        pass  # the caller's assertion reports the count
    time.sleep(0.5)  # and time for a duplicate to show
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    out = run(["tcpdump", "-r", str(path), "-n", "icmp"]).stdout
    return out.count("echo request")


def assert_once_on_tap(bg, tmp_path, ns_src, ns_dst, dst_server, addr, count=10):
    """Each echo request crosses to the target tap exactly once, and no reply is duplicated."""
    pcap = tmp_path / f"{dst_server.dev}.pcap"
    cap = capture(bg, ns_dst, dst_server.dev, pcap)
    loss, out = helpers.ping(ns_src, addr, count=count)
    n = echo_requests(cap, pcap, count)
    assert loss == 0 and "DUP!" not in out, out
    assert n == count, f"{n} echo requests reached {dst_server.dev} for {count} sent"


def activity(servers):
    """Frames through the taps plus messages received on every link, over all servers."""
    total = 0
    for s in servers:
        st = s.stats()
        total += st["tap"]["read_frames"] + st["tap"]["written_frames"]
        total += sum(l["rx_messages"] for l in st["links"])
    return total


def assert_idle(servers, spaces, seconds=5, slack=4):
    """With no traffic, the counters stay put: a storm would add thousands in a second."""
    for ns in spaces:  # no ARP probe may come due during the window
        run(["ip", "-n", ns, "neigh", "flush", "all"])
    time.sleep(1)
    before = activity(servers)
    time.sleep(seconds)
    grown = activity(servers) - before
    assert grown <= slack, f"idle network: counters grew by {grown} in {seconds}s"


def make_ca(tmp_path, name):
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN=gelf test {name}", "-keyout", str(key), "-out", str(cert),
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    return cert, key


def make_server_cert(tmp_path, ca_cert, ca_key):
    key, csr, cert, ext = (tmp_path / n for n in ("srv.key", "srv.csr", "srv.pem", "srv.ext"))
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(csr)])
    run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
         "-set_serial", "2", "-days", "2", "-extfile", str(ext), "-out", str(cert)])
    return cert, key


def tls_stats(server, cafile, token=None):
    ctx = ssl.create_default_context(cafile=str(cafile))
    query = f"?token={token}" if token else ""
    with urllib.request.urlopen(f"https://127.0.0.1:{server.port}/stats{query}", timeout=30, context=ctx) as r:
        return json.loads(r.read().decode())


# ---------------------------------------------------------------- 1. direct links

def test_direct_link_pings_and_transfer(gelf_server, ns_addr, bg, tmp_path):
    s1 = gelf_server()
    ns1 = ns_addr(s1, ADDR[0])
    s2 = gelf_server(extra=["--connect", s1.ws_url])
    ns2 = ns_addr(s2, ADDR[1])

    wait_log(s2, link_line(s1.ws_url, "open"))
    (dialed,) = wait_open(s2, "direct")
    assert dialed["peer"] == s1.ws_url
    wait_open(s1, "direct")
    assert links(s1, "browser") == [] and links(s2, "browser") == []

    assert_pings(ns2, ADDR[0], count=20)
    transfer(bg, ns1, ns2, ADDR[1], tmp_path)
    for s in (s1, s2):
        (link,) = links(s, "direct")
        assert link["rx_messages"] > 0 and link["tx_messages"] > 0, link


def test_direct_link_over_wss_with_cacert_key_and_token(gelf_server, ns_addr, tmp_path):
    ca, ca_key = make_ca(tmp_path, "ca")
    cert, key = make_server_cert(tmp_path, ca, ca_key)
    s1 = gelf_server(extra=["--ssl-cert", str(cert), "--ssl-key", str(key), "--key", KEY, "--token", TOKEN])
    ns1 = ns_addr(s1, ADDR[0])
    url = f"wss://127.0.0.1:{s1.port}/ws"
    s2 = gelf_server(extra=["--key", KEY, "--connect", f"{url}?token={TOKEN}", "--cacert", str(ca)])
    ns_addr(s2, ADDR[1])

    wait_log(s2, link_line(url, "open"))
    (dialed,) = wait_open(s2, "direct")
    assert dialed["peer"] == url, dialed  # shown without the token
    assert_pings(ns1, ADDR[1], count=20)
    assert TOKEN not in json.dumps(s2.stats()) and TOKEN not in s2.log_text()
    st1 = tls_stats(s1, ca, token=TOKEN)
    assert [l["kind"] for l in st1["links"] if l["state"] == "open"] == ["direct"], st1
    assert s2.stats()["drops"]["auth"] == 0 and st1["drops"]["auth"] == 0


def test_wss_wrong_ca_fails_clearly_and_insecure_connects(gelf_server, ns_addr, tmp_path):
    ca, ca_key = make_ca(tmp_path, "ca")
    other_ca, _ = make_ca(tmp_path, "other")
    cert, key = make_server_cert(tmp_path, ca, ca_key)
    s1 = gelf_server(extra=["--ssl-cert", str(cert), "--ssl-key", str(key)])
    url = f"wss://127.0.0.1:{s1.port}/ws"
    wrong = gelf_server(extra=["--connect", url, "--cacert", str(other_ca)])
    insecure = gelf_server(extra=["--connect", url, "--insecure"])
    ns1, ns_wrong, ns_insecure = (ns_addr(s, ADDR[i]) for i, s in enumerate((s1, wrong, insecure)))

    m = wait_log(wrong, r".*certificate verify failed.*", timeout=60)
    assert "--cacert" in m.group(0), m.group(0)
    assert re.search(link_line(url, "cannot connect: "), m.group(0)), m.group(0)

    wait_log(insecure, link_line(url, "open"))
    assert re.search(r"(?i)warn.*(--insecure|not verified)", insecure.log_text()), insecure.log_text()
    assert_pings(ns_insecure, ADDR[0], count=10)
    st1 = tls_stats(s1, ca)
    assert len([l for l in st1["links"] if l["kind"] == "direct" and l["state"] == "open"]) == 1, st1

    # The refused link stays refused through several retries (1 s, 2 s, ...), and says so once.
    for target in (ADDR[0], ADDR[2]):
        loss, out = helpers.ping(ns_wrong, target, count=5)
        assert loss == 100, out
    assert links(wrong, "direct", "open") == []
    log = wrong.log_text()
    assert len(re.findall(link_line(url, "cannot connect"), log)) == 1, log
    assert "Traceback" not in log and wrong.alive(), log


# ---------------------------------------------------------------- 2. headless relay

def test_headless_relay(gelf_server, ns_addr, bg):
    (s1, s2), (ns1, ns2) = servers_in_namespaces(gelf_server, ns_addr, 2)
    relay = start_relay(bg, s1.ws_url, s2.ws_url)
    assert_pings(ns1, ADDR[1], count=20)
    for s in (s1, s2):
        (link,) = links(s)
        assert link["kind"] == "relay" and link["state"] == "open", link
        assert link["rx_messages"] > 0 and link["tx_messages"] > 0, link
    relay.send_signal(signal.SIGTERM)
    assert relay.wait(30) == 0, relay.pump.text()
    assert "Traceback" not in relay.pump.text()
    wait_for(lambda: links(s1) == [] and links(s2) == [], 30, what="the relay's links to close")


def test_headless_relay_without_root(gelf_server, ns_addr, bg):
    (s1, s2), (ns1, _) = servers_in_namespaces(gelf_server, ns_addr, 2)
    relay = bg(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                PYTHON, "-m", "gelf.relay", s1.ws_url, s2.ws_url], name="relay (nobody)", cwd=REPO)
    for url in (s1.ws_url, s2.ws_url):
        assert relay.pump.wait_line(link_line(url, "open"), 60), relay.pump.text()
    assert_pings(ns1, ADDR[1], count=5)
    relay.send_signal(signal.SIGINT)
    assert relay.wait(30) == 0, relay.pump.text()


# ---------------------------------------------------------------- 3. cycles

def test_triangle_of_direct_links(gelf_server, ns_addr, netns, bg, tmp_path):
    c = gelf_server()
    b = gelf_server(extra=["--connect", c.ws_url])
    a = gelf_server(extra=["--connect", b.ws_url, "--connect", c.ws_url])
    servers = [a, b, c]
    spaces = []
    for i, s in enumerate(servers):
        ns = netns()
        quiet_ns(ns)
        spaces.append(ns_addr(s, ADDR[i], ns=ns))
    for s in servers:
        wait_open(s, "direct", count=2)

    for i in range(3):
        for j in range(3):
            if i != j:
                assert_pings(spaces[i], ADDR[j], count=5)
    assert_once_on_tap(bg, tmp_path, spaces[0], spaces[2], c, ADDR[2])
    assert_once_on_tap(bg, tmp_path, spaces[1], spaces[0], a, ADDR[0])
    assert sum(s.stats()["drops"]["replay"] for s in servers) > 0, [s.stats()["drops"] for s in servers]
    assert_idle(servers, spaces)


def test_two_relays_bridging_the_same_pair(gelf_server, ns_addr, netns, bg, tmp_path):
    (s1, s2), (ns1, ns2) = quiet_servers(gelf_server, ns_addr, netns, [[], []])
    start_relay(bg, s1.ws_url, s2.ws_url, name="relay 1")
    start_relay(bg, s2.ws_url, s1.ws_url, module=True, name="relay 2")
    for s in (s1, s2):
        wait_open(s, "relay", count=2)

    assert_pings(ns1, ADDR[1], count=10)
    assert_pings(ns2, ADDR[0], count=10)
    assert_once_on_tap(bg, tmp_path, ns1, ns2, s2, ADDR[1])
    assert_once_on_tap(bg, tmp_path, ns2, ns1, s1, ADDR[0])
    drops = [s.stats()["drops"] for s in (s1, s2)]
    assert sum(d["replay"] + d["loop"] for d in drops) > 0, drops
    assert_idle([s1, s2], [ns1, ns2])


# ---------------------------------------------------------------- 4. reconnection

def test_direct_link_comes_back_after_restart(gelf_server, ns_addr):
    s1 = gelf_server()
    ns1 = ns_addr(s1, ADDR[0])
    s2 = gelf_server(extra=["--connect", s1.ws_url])
    ns2 = ns_addr(s2, ADDR[1])
    wait_open(s2, "direct")
    assert_pings(ns2, ADDR[0], count=10)

    mac = helpers.link_mac(s1.dev, ns1)
    s1.kill()  # SIGKILL: no goodbye on the socket
    wait_for(lambda: not links(s2, "direct", "open"), 60, what="server2 to notice the link is down")
    wait_log(s2, link_line(s1.ws_url, "closed"), timeout=30)
    wait_for(lambda: not helpers.iface_exists(s1.dev, ns1), 30, what=f"{s1.dev} to disappear")

    s1.start()
    ns_addr(s1, ADDR[0], ns=ns1, mac=mac)
    # The link comes back by itself: redials back off from 1 s to at most 30 s, so within 60 s.
    # How fast is a speed figure, not asserted here; it belongs in `make bench` (which does not
    # measure reconnection yet).
    wait_open(s2, "direct", timeout=60)
    assert_pings(ns2, ADDR[0], count=10)
    log = s2.log_text()
    assert len(re.findall(link_line(s1.ws_url, "open"), log)) == 2, log
    assert len(re.findall(link_line(s1.ws_url, "closed"), log)) == 1, log


# ---------------------------------------------------------------- 5. --bridge

def ns_with_lo(netns):
    ns = netns()
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    return ns


def move_tap_between(dev, src_ns, dst_ns, *addrs):
    run(["ip", "-n", src_ns, "link", "set", "dev", dev, "netns", dst_ns])
    for addr in addrs:
        run(["ip", "-n", dst_ns, "addr", "add", addr, "dev", dev] + (["nodad"] if ":" in addr else []))
    run(["ip", "-n", dst_ns, "link", "set", dev, "up"])
    run(["ip", "-n", dst_ns, "link", "set", "lo", "up"])


def gelf_in_ns(ns, *args, timeout=60):
    return helpers.gelf_once(*args, prefix=("ip", "netns", "exec", ns), timeout=timeout)


def test_bridge_reaches_a_veth_through_the_tunnel(ns_server, netns):
    s, v, nb = ns_with_lo(netns), ns_with_lo(netns), ns_with_lo(netns)
    run(["ip", "-n", s, "link", "add", "br0", "type", "bridge"])
    run(["ip", "-n", s, "link", "set", "br0", "up"])
    run(["ip", "-n", s, "link", "add", "vS", "type", "veth", "peer", "name", "vV", "netns", v])
    run(["ip", "-n", s, "link", "set", "vS", "master", "br0"])
    run(["ip", "-n", s, "link", "set", "vS", "up"])
    run(["ip", "-n", v, "addr", "add", "10.78.0.1/24", "dev", "vV"])
    run(["ip", "-n", v, "link", "set", "vV", "up"])

    a = ns_server(s, extra=["--bridge", "br0"])
    info = json.loads(run(["ip", "-n", s, "-j", "link", "show", "dev", a.dev]).stdout)[0]
    assert info.get("master") == "br0" and "UP" in info["flags"], info
    b = ns_server(s, extra=["--connect", a.ws_url])
    wait_log(b, link_line(a.ws_url, "open"))
    move_tap_between(b.dev, s, nb, "10.78.0.2/24")
    assert_pings(nb, "10.78.0.1", count=10)


def test_bridge_errors(netns):
    s = ns_with_lo(netns)
    run(["ip", "-n", s, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"])
    for br, why in (("nosuchbr", "missing"), ("veth0", "not a bridge")):
        dev = helpers.tap_name()
        code, out = gelf_in_ns(s, "--dev", dev, "--bridge", br, str(helpers.free_port()))
        errors = [l for l in out.splitlines() if l.startswith("gelf: error:")]
        assert code == 1 and len(errors) == 1 and br in errors[0], (why, out)
        assert "Traceback" not in out, out
        assert not helpers.iface_exists(dev, s), f"{dev} left behind after the error"


# ---------------------------------------------------------------- 6. --address

def test_address_ipv4_and_ipv6_on_the_tap(ns_server, netns):
    s, nb = ns_with_lo(netns), ns_with_lo(netns)
    a = ns_server(s, extra=["--address", "10.79.0.1/24", "--address", "fd79::1/64"])
    shown = run(["ip", "-n", s, "addr", "show", "dev", a.dev]).stdout
    assert "inet 10.79.0.1/24" in shown and "inet6 fd79::1/64" in shown, shown

    b = ns_server(s, extra=["--connect", a.ws_url])
    wait_log(b, link_line(a.ws_url, "open"))
    move_tap_between(b.dev, s, nb, "10.79.0.2/24", "fd79::2/64")
    wait_for(lambda: not run(["ip", "-n", s, "-6", "addr", "show", "dev", a.dev, "tentative"]).stdout.strip(),
             30, what="IPv6 duplicate address detection on the tap")
    assert_pings(nb, "10.79.0.1", count=10)
    assert_pings(nb, "fd79::1", count=10)


# ---------------------------------------------------------------- 7. --learn

@pytest.mark.parametrize("learn", [True, False], ids=["learn", "hub"])
def test_learn_keeps_unicast_off_other_ports(gelf_server, ns_addr, netns, learn):
    a = gelf_server(extra=["--learn"] if learn else [])
    b = gelf_server(extra=["--connect", a.ws_url])
    c = gelf_server(extra=["--connect", a.ws_url])
    spaces = []
    for i, s in enumerate((a, b, c)):
        ns = netns()
        quiet_ns(ns)
        spaces.append(ns_addr(s, ADDR[i], ns=ns))
    wait_open(a, "direct", count=2)
    assert_pings(spaces[1], ADDR[2], count=3)  # A learns B's and C's MACs
    assert_pings(spaces[1], ADDR[0], count=3)

    count = 20
    before = a.stats()["tap"]["written_frames"]
    loss, out = helpers.ping(spaces[1], ADDR[2], count=count)
    assert loss == 0, out
    grown = a.stats()["tap"]["written_frames"] - before
    if learn:
        assert grown <= count // 4, f"--learn: {grown} frames of B<->C traffic written to A's tap"
    else:
        assert grown >= 2 * count, f"hub: only {grown} frames written to A's tap for {count} pings"
