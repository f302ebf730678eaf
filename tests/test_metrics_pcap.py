"""Operations (issue 6): /stats and /metrics follow the traffic, /metrics is Prometheus text that
prometheus-client parses and honours --token, and --pcap records every frame crossing the tap in
a file tcpdump reads.

Two servers with a direct link (the second dials the first), their taps in namespaces the test
creates (10.77.0.1 and .2); HTTP and WebSockets on 127.0.0.1 only.
"""

import re
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import helpers
from helpers import ADDR, PYTHON, REPO, run, wait_for

pytestmark = pytest.mark.usefixtures("need_root")

PINGS = 10
TOKEN = "metrics-s3cret"


# ---------------------------------------------------------------- helpers

def get(server, path, token=None):
    """(status, content type, body text) of GET path on the server."""
    url = server.url + path + (f"?token={token}" if token else "")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read().decode("utf-8", "replace")


def scrape(server, token=None):
    """{family name: [samples]} from the server's /metrics, parsed by prometheus-client."""
    status, ctype, text = get(server, "/metrics", token)
    assert status == 200, text
    assert re.match(r"text/plain;\s*version=0\.0\.4", ctype), ctype
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(families, name, sample=None, **labels):
    """The one sample of family `name` (sample name `sample`, default name+"_total" for counters)
    whose labels include `labels`."""
    found = [s.value for s in families[name]
             if (sample is None or s.name == sample) and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{name}{labels}: {found} in {families[name]}"
    return found[0]


def direct_link(stats):
    (link,) = [l for l in stats["links"] if l["kind"] == "direct" and l["state"] == "open"]
    return link


def two_linked_servers(gelf_server, ns_addr, extra1=(), extra2=()):
    s1 = gelf_server(extra=list(extra1))
    ns1 = ns_addr(s1, ADDR[0])
    s2 = gelf_server(extra=["--connect", s1.ws_url, *extra2])
    ns2 = ns_addr(s2, ADDR[1])
    for s in (s1, s2):
        wait_for(lambda: [l for l in s.stats()["links"] if l["state"] == "open"], 60,
                 what=f"an open link on {s.dev}")
    assert helpers.wait_ping(ns2, ADDR[0]), "the direct link does not carry pings"
    return (s1, ns1), (s2, ns2)


def ping_ok(ns, addr, count=PINGS):
    loss, out = helpers.ping(ns, addr, count=count)
    assert loss == 0, out


# ---------------------------------------------------------------- /stats and /metrics

def counters(server):
    """The counters that each ping must move, read from /stats and from /metrics."""
    st = server.stats()
    link = direct_link(st)
    fams = scrape(server)
    ids = dict(link=str(link["id"]), kind="direct")
    return {
        "stats": {
            "tap read": st["tap"]["read_frames"],
            "tap written": st["tap"]["written_frames"],
            "link rx": link["rx_messages"],
            "link tx": link["tx_messages"],
        },
        "metrics": {
            "tap read": value(fams, "gelf_tap_frames", direction="read"),
            "tap written": value(fams, "gelf_tap_frames", direction="written"),
            "link rx": value(fams, "gelf_link_messages", direction="rx", **ids),
            "link tx": value(fams, "gelf_link_messages", direction="tx", **ids),
        },
    }


def test_stats_and_metrics_rise_with_traffic(gelf_server, ns_addr):
    (s1, _), (s2, ns2) = two_linked_servers(gelf_server, ns_addr)
    before = {s.dev: counters(s) for s in (s1, s2)}
    ping_ok(ns2, ADDR[0])
    for s in (s1, s2):
        after = counters(s)
        for source in ("stats", "metrics"):
            for name, old in before[s.dev][source].items():
                new = after[source][name]
                assert new - old >= PINGS, f"{s.dev} {source} {name}: {old} -> {new} after {PINGS} pings"


def test_metrics_families_and_labels(gelf_server, ns_addr):
    (s1, _), (s2, ns2) = two_linked_servers(gelf_server, ns_addr, extra2=["--no-offload"])
    ping_ok(ns2, ADDR[0], count=3)
    for s, offload in ((s1, "true"), (s2, "false")):
        st = s.stats()
        link = direct_link(st)
        fams = scrape(s)
        for name in ("gelf_uptime_seconds", "gelf_info", "gelf_tap_frames", "gelf_tap_bytes", "gelf_drops",
                     "gelf_link_messages", "gelf_link_bytes", "gelf_link_drops", "gelf_link_up"):
            assert name in fams, f"{name} missing from /metrics of {s.dev}: {sorted(fams)}"
        assert value(fams, "gelf_uptime_seconds") > 0
        info = value(fams, "gelf_info", tap=s.dev, origin=st["origin"], encryption="false", offload=offload)
        assert info == 1
        assert "version" in fams["gelf_info"][0].labels
        ids = dict(link=str(link["id"]), peer=link["peer"], kind="direct")
        assert value(fams, "gelf_link_up", state="open", **ids) == 1
        assert value(fams, "gelf_link_bytes", direction="rx", **ids) >= link["rx_bytes"] > 0
        assert value(fams, "gelf_tap_bytes", direction="read") >= st["tap"]["read_bytes"] > 0
        reasons = {sample.labels["reason"] for sample in fams["gelf_drops"]}
        assert {"auth", "replay", "queue_full"} <= reasons, reasons
    # The dialing side names its peer by URL; the dialed side by address:port.
    assert direct_link(s2.stats())["peer"] == s1.ws_url


def test_metrics_needs_the_token(gelf_server):
    s = gelf_server(extra=["--token", TOKEN])
    assert get(s, "/metrics")[0] == 403
    assert get(s, "/metrics", token="wrong")[0] == 403
    fams = scrape(s, token=TOKEN)
    assert value(fams, "gelf_drops", reason="forbidden") >= 2


def test_metrics_link_drops_by_reason(gelf_server):
    """Bad messages on a link show in gelf_link_drops_total for that link and in the total."""
    from ws4py.client.threadedclient import WebSocketClient

    s = gelf_server()
    ws = WebSocketClient(s.ws_url)
    ws.daemon = True
    ws.connect()
    try:
        ws.send("not binary")
        ws.send(b"", binary=True)
        ws.send(b"", binary=True)

        def dropped():
            fams = scrape(s)
            link = [l for l in fams["gelf_link_drops"] if l.labels["kind"] == "browser"]
            return fams if len(link) == 2 else None

        fams = wait_for(dropped, 30, what="two drop reasons on the link")
        assert value(fams, "gelf_link_drops", kind="browser", reason="text") == 1
        assert value(fams, "gelf_link_drops", kind="browser", reason="empty") == 2
        assert value(fams, "gelf_drops", reason="empty") == 2
        assert value(fams, "gelf_link_up", kind="browser", state="open") == 1
    finally:
        ws.close()


# ---------------------------------------------------------------- --pcap

def icmp_in(path):
    """(echo requests, echo replies) that tcpdump reads in the capture file."""
    out = run(["tcpdump", "-r", str(path), "-n", "icmp"]).stdout
    lines = out.splitlines()
    return (len([l for l in lines if "ICMP echo request" in l]),
            len([l for l in lines if "ICMP echo reply" in l]))


def test_pcap_records_both_directions(gelf_server, ns_addr, tmp_path):
    if not shutil.which("tcpdump"):
        pytest.skip("needs tcpdump (make sysdeps)")
    p1, p2 = tmp_path / "one.pcap", tmp_path / "two.pcap"
    # One tap with offloads (a virtio header before each frame, stripped) and one without.
    (s1, _), (s2, ns2) = two_linked_servers(gelf_server, ns_addr, extra1=["--pcap", str(p1)],
                                            extra2=["--pcap", str(p2), "--no-offload"])
    base = {p: icmp_in(p) for p in (p1, p2)}
    ping_ok(ns2, ADDR[0])
    for p in (p1, p2):
        requests, replies = icmp_in(p)  # read while the servers still run: nothing is held back
        assert requests - base[p][0] >= PINGS and replies - base[p][1] >= PINGS, \
            f"{p.name}: {requests} requests, {replies} replies for {PINGS} pings (before: {base[p]})"
    out = run(["tcpdump", "-r", str(p1), "-n", "icmp"]).stdout
    assert f"{ADDR[1]} > {ADDR[0]}: ICMP echo request" in out, out


# ---------------------------------------------------------------- errors and --help

def gelf(*args):
    return subprocess.run([PYTHON, "gelf.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)


@pytest.mark.parametrize("where", ["missing-dir", "directory"])
def test_pcap_bad_path_is_one_clear_error(tmp_path, where):
    path = "/nonexistent/dir/x.pcap" if where == "missing-dir" else str(tmp_path)
    dev = helpers.tap_name()
    res = gelf("--dev", dev, "--pcap", path, helpers.free_port())
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "Traceback" not in out, out
    errors = [l for l in out.splitlines() if re.match(r"^\S+: error: ", l)]
    assert len(errors) == 1 and errors[0].startswith("gelf: error: "), out
    assert path in errors[0], out
    assert not helpers.iface_exists(dev), f"{dev} left behind"


def test_help_documents_metrics_and_pcap():
    res = gelf("--help")
    assert res.returncode == 0, res.stderr
    for flag in ("--pcap FILE", "--pcap-size MB"):
        assert flag in res.stdout, res.stdout
    res = gelf("--pcap-size", "0", "--pcap", "x.pcap", "7001")
    assert res.returncode == 1 and "--pcap-size" in res.stderr, res.stderr  # README: Exit status
