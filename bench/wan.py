#!/usr/bin/env python3
"""gelf WAN benchmark: TCP through gelf over an emulated WAN, against plain TCP on the same path.

Run as root from the checkout: `make bench` runs it after the LAN rows of bench/bench.py, and
`make bench BENCH_ARGS="--only wan"` (or `python bench/wan.py [--quick] [--no-write]`) runs it
alone. `make soak` (bench/soak.py) uses the same topology for its 10-minute soak.

Topology: network namespaces A and B hold the gelf servers (underlay 10.91.0.1 and .2/24, taps
10.92.0.1 and .2/24) and P the page (headless Chromium, 10.91.0.3). Each sits behind one port of
the path emulator, bench/wanem.py: a learning switch whose ports are WAN links (it stands in for
`tc netem` and `tbf` on a router, which the kernel this was written on lacks). The links towards
A and B carry the scenario's delay, loss and rate; the link towards P is clean, so every path,
A→B directly or A→P→B, crosses exactly one shaped link each way, with the same properties.
TCP congestion control is --cc (cubic, Linux's usual default) on every route of every namespace,
for the outer TCP (gelf's links, Chromium's sockets) and the inner one (inside the tunnel) alike.

Rows:
  W1      plain TCP A→B on the underlay: the path of the direct link
  direct  gelf, B --connect ws://A; TCP A→B inside the tunnel
  W2      plain TCP A→P→B on the underlay, forwarded by P's kernel (to B's second address
          10.91.0.12, routed through P both ways): the path of the page
  page    gelf, Chromium in P on A's page with ?peer=B; TCP A→B inside the tunnel
Scenarios, measured in each row:
  50 ms RTT, 100 Mbit/s, 0 % and 1 % loss each way: iperf3 A→B, Mbit/s at the receiver
  20 Mbit/s, 40 ms RTT: ping RTT A→B idle, then during a bulk iperf3 A→B (latency under load)
  flap: on the 50 ms path, every port drops every frame for 10 s; how long after the path
        returns pings get through again (plain rows: a ping over one TCP connection,
        bench/tcpping.py), the TCP connection attempts (SYNs) the emulator saw from the cut
        on, and the link events in gelf's logs

Traffic goes only to addresses inside the namespaces the bench creates; every namespace, tap
and process is removed on exit, error, Ctrl-C and SIGTERM (processes by PID), as in bench.py.
"""

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time

import bench
from bench import BENCH, LOGS, PYTHON, REPO, TAG, RowFailed, Scope, log, percentile, place, sh

UNDERLAY = {"a": "10.91.0.1", "b": "10.91.0.2", "p": "10.91.0.3", "c": "10.91.0.4"}
VIA_P = "10.91.0.12"  # B's second address: packets to and from it are routed through P
TUNNEL = {"a": "10.92.0.1", "b": "10.92.0.2", "c": "10.92.0.3"}
GELF_PORT = 7001
ECHO_PORT = 5300
BUDGET = 600  # seconds: rows that would start later are skipped

QUEUE = 0.025  # seconds of the rate the bottleneck buffers (drop-tail), in every scenario
WAN_50 = {"delay": 0.025, "rate": 100e6, "queue": QUEUE}
WAN_50_LOSS = dict(WAN_50, loss=0.01)
WAN_LOADED = {"delay": 0.020, "rate": 20e6, "queue": QUEUE}
OUTAGE = 10.0

ROWS = ["W1", "direct", "W2", "page"]
LABELS = {
    "W1": "W1 plain TCP, A→B",
    "direct": "gelf direct link (`--connect`)",
    "W2": "W2 plain TCP, A→P→B (P forwards)",
    "page": "gelf through headless Chromium in P",
}
REFERENCE = {"direct": "W1", "page": "W2"}


# ---------------------------------------------------------------- the topology

class Wan:
    """Namespaces for `hosts`, each behind one port of the path emulator; created in `scope`."""

    def __init__(self, scope, hosts, cc):
        self.hosts = hosts
        self.ns = {h: scope.add_netns("gelfwan-%d-%s" % (os.getpid(), h)) for h in hosts}
        self.control_path = str(LOGS / ("wanem-%d.sock" % os.getpid()))
        taps = {h: TAG + "w" + h for h in hosts}
        self.emulator = scope.start("wanem", [PYTHON, str(BENCH / "wanem.py"), self.control_path]
                                    + ["%s=%s" % kv for kv in taps.items()])
        if not self.emulator.wait_line(r"^ready$", 10):
            raise RowFailed("the path emulator did not start: %s" % self.emulator.tail())
        self.cc = cc
        for h, ns in self.ns.items():
            place(taps[h], ns, UNDERLAY[h])
            self.pin_cc(h, UNDERLAY[h], taps[h])
            Scope.ns_write(ns, "/proc/sys/net/ipv4/conf/all/accept_redirects", "0")
        if "p" in hosts:
            self._route_through_p(taps)

    def pin_cc(self, host, addr, dev):
        """Make TCP over the /24 of addr on dev use the congestion control --cc. Per route
        (congctl), because a namespace's default may only be one of the kernel's "allowed"
        ones, which here are reno and bbr (the kernel's default)."""
        net = addr.rsplit(".", 1)[0] + ".0/24"
        sh(["ip", "-n", self.ns[host], "route", "replace", net, "dev", dev, "proto", "kernel", "scope", "link",
            "src", addr, "congctl", self.cc])

    def _route_through_p(self, taps):
        """B's second address VIA_P is reached through P both ways: W2, plain TCP on the page's path."""
        a, b, p = self.ns["a"], self.ns["b"], self.ns["p"]
        for key in ("ip_forward", "conf/all/send_redirects", "conf/default/send_redirects",
                    "conf/%s/send_redirects" % taps["p"], "conf/all/rp_filter", "conf/%s/rp_filter" % taps["p"]):
            Scope.ns_write(p, "/proc/sys/net/ipv4/" + key, "1" if key == "ip_forward" else "0")
        sh(["ip", "-n", b, "addr", "add", VIA_P + "/32", "dev", taps["b"]])
        sh(["ip", "-n", b, "rule", "add", "from", VIA_P, "table", "100", "pref", "100"])
        sh(["ip", "-n", b, "route", "add", UNDERLAY["a"], "via", UNDERLAY["p"], "dev", taps["b"],
            "onlink", "table", "100", "congctl", self.cc])
        sh(["ip", "-n", a, "route", "add", VIA_P, "via", UNDERLAY["p"], "dev", taps["a"], "onlink",
            "congctl", self.cc])

    def control(self, request):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.control_path)
            s.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(s.makefile().readline() or "{}")
        if not reply.get("ok"):
            raise RowFailed("path emulator: %s" % reply.get("error", "no answer"))
        return reply

    def shape(self, link):
        """Give the links towards the servers the properties `link`; the page's link stays clean."""
        self.control({"set": {h: ({} if h == "p" else link) for h in self.hosts}})

    def cut(self, down):
        self.control({"down": down})

    def syns(self, port):
        return int(self.control({"stats": True})["syn"].get(str(port), 0))


def ns_stats(where):
    """/stats of the gelf server at where = (namespace, address)."""
    ns, addr = where
    res = sh(["ip", "netns", "exec", ns, PYTHON, "-c",
              "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], "
              "timeout=3).read().decode())", "http://%s:%d/stats" % (addr, GELF_PORT)], check=False)
    if res.returncode != 0:
        raise OSError(res.stderr.strip()[-200:] or "exit %d" % res.returncode)
    return json.loads(res.stdout)


def start_gelf(scope, wan, host, extra=(), name=None):
    """A gelf server in host's namespace, on its underlay address, with its tap addressed."""
    cmd = ["ip", "netns", "exec", wan.ns[host], PYTHON, "gelf.py", "--host", UNDERLAY[host],
           "--dev", TAG + "g" + host, "--address", TUNNEL[host] + "/24"] + list(extra) + [str(GELF_PORT)]
    proc = scope.start(name or "gelf-" + host, cmd, cwd=REPO)
    if not proc.wait_line(r"\[Gelf\] Relay listening: %s %d\b" % (re.escape(UNDERLAY[host]), GELF_PORT), 20):
        raise RowFailed("%s did not start: %s" % (proc.name, proc.tail()))
    wan.pin_cc(host, TUNNEL[host], TAG + "g" + host)
    return proc


def gelf_url(host):
    return "ws://%s:%d/ws" % (UNDERLAY[host], GELF_PORT)


def page_url(host, peers):
    return "http://%s:%d/?%s" % (UNDERLAY[host], GELF_PORT,
                                 "&".join("peer=%s:%d" % (UNDERLAY[p], GELF_PORT) for p in peers))


# ---------------------------------------------------------------- probes

PING_LINE = re.compile(r"^\[(\d+\.\d+)\] .*icmp_seq=(\d+) .*time=([\d.]+) ms", re.M)


def ping_cmd(ns, addr, count, interval, delay=0):
    """ping with a reply timestamp on every line (-D), optionally after `delay` seconds."""
    ping = "ping -n -D -c %d -i %s -W 2 %s" % (count, interval, addr)
    return ["ip", "netns", "exec", ns, "sh", "-c", ("sleep %s; exec " % delay if delay else "exec ") + ping]


def ping_replies(proc):
    """[(unix time received, seq, rtt ms)] from a ping_cmd process's log."""
    return [(float(t), int(s), float(r)) for t, s, r in PING_LINE.findall(proc.text())]


def ping_times(proc):
    """Unix times at which a ping_cmd process got its replies."""
    return [t for t, _, _ in ping_replies(proc)]


def tcpping_times(proc):
    """Unix times at which a `tcpping.py ping` process got its echoes."""
    return [float(t) for t in re.findall(r"^(\d+\.\d+) \d+$", proc.text(), re.M)]


def wait_exit(proc, timeout):
    """Give proc up to timeout seconds to end by itself (the caller stops it in any case)."""
    try:
        proc.p.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


# ---------------------------------------------------------------- rows

class WanBench:
    def __init__(self, args):
        self.args = args
        q = args.quick
        self.tput_s = 8 if q else 20
        self.idle_pings = 20 if q else 50
        self.load_s = 10 if q else 25
        self.results = {}
        self.wan = None

    def run(self):
        self.load = [os.getloadavg()[0]]
        started = time.monotonic()
        topo = Scope()  # the namespaces and the path emulator, for all rows
        try:
            try:
                self.wan = Wan(topo, ("a", "b", "p"), self.args.cc)
            except RowFailed as err:
                for row in ROWS:
                    self.results[row] = {"failed": "topology: %s" % err}
                return time.monotonic() - started
            for row in ROWS:
                if time.monotonic() - started > BUDGET:
                    self.results[row] = {"failed": "skipped: the WAN bench's %d s budget is spent" % BUDGET}
                    continue
                log("WAN row %s" % row)
                t = time.monotonic()
                self.row(row)
                log("WAN row %s done in %.0f s%s" % (row, time.monotonic() - t,
                                                     ": failed: " + self.results[row]["failed"]
                                                     if "failed" in self.results[row] else ""))
        finally:
            topo.close()
        self.load.append(os.getloadavg()[0])
        return time.monotonic() - started

    def row(self, row):
        res = {"load": [], "notes": []}
        self.results[row] = res
        scope = Scope()  # this row's processes; the namespaces belong to the topology
        try:
            self.wan.shape({})
            target, servers = self.build(row, scope)
            bench.wait_ping(self.wan.ns["a"], target, 30)

            def attempt(key, fn):
                res["load"].append(os.getloadavg()[0])
                try:
                    res[key] = fn()
                except RowFailed as err:
                    res["notes"].append("%s failed: %s" % (key, err))
                except Exception as err:
                    res["notes"].append("%s failed: %s: %s" % (key, type(err).__name__, err))

            attempt("tput", lambda: self.throughput(scope, target, WAN_50))
            attempt("tput_loss", lambda: self.throughput(scope, target, WAN_50_LOSS))
            attempt("loaded", lambda: self.loaded(scope, target))
            attempt("flap", lambda: self.flap(scope, row, target, servers))
            for proc in servers.values():
                if not proc.alive():
                    res["notes"].append("%s exited: %s" % (proc.name, proc.tail(1)))
        except RowFailed as err:
            res["failed"] = str(err)
        except Exception as err:
            res["failed"] = "%s: %s" % (type(err).__name__, err)
        finally:
            scope.close()

    def build(self, row, scope):
        """Start the row's servers (or nothing, for a plain row); return (target address, servers)."""
        if row == "W1":
            return UNDERLAY["b"], {}
        if row == "W2":
            return VIA_P, {}
        ns = self.wan.ns
        a = start_gelf(scope, self.wan, "a")
        b = start_gelf(scope, self.wan, "b", ["--connect", gelf_url("a")] if row == "direct" else [])
        servers = {"a": a, "b": b}
        if row == "direct":
            bench.wait_links((ns["a"], UNDERLAY["a"]), "direct", 30, needs=[a, b], stats=ns_stats)
        else:
            page = bench.start_chromium(scope, "chromium-p", page_url("a", ["b"]), netns=ns["p"])
            for h in ("a", "b"):
                bench.wait_links((ns[h], UNDERLAY[h]), "browser", 40, needs=[a, b, page], stats=ns_stats)
        return TUNNEL["b"], servers

    def throughput(self, scope, target, link):
        self.wan.shape(link)
        time.sleep(1)
        data = bench.iperf(scope, self.wan.ns["a"], self.wan.ns["b"], ["-O", "2"], self.tput_s, addr=target)
        end = data["end"]
        return {"mbps": end["sum_received"]["bits_per_second"] / 1e6,
                "retransmits": end["sum_sent"].get("retransmits")}

    def loaded(self, scope, target):
        """Ping RTT idle, then during a bulk transfer, on the 20 Mbit/s, 40 ms path."""
        ns_a = self.wan.ns["a"]
        self.wan.shape(WAN_LOADED)
        time.sleep(1)
        idle = bench.ping_rtt(ns_a, target, self.idle_pings, 0.1)
        warm = 4  # the bulk transfer's slow start is over by then
        sent = int((self.load_s - warm - 1) / 0.1)
        pinger = scope.start("ping-loaded", ping_cmd(ns_a, target, sent, 0.1, warm))
        try:
            data = bench.iperf(scope, ns_a, self.wan.ns["b"], [], self.load_s, addr=target)
            wait_exit(pinger, 15)
        finally:
            pinger.stop()
        rtts = sorted(r for _, _, r in ping_replies(pinger))
        if not rtts:
            raise RowFailed("no ping replies during the bulk transfer")
        return {"idle": idle["median"], "median": statistics.median(rtts), "p95": percentile(rtts, 95),
                "max": rtts[-1], "lost": sent - len(rtts),
                "mbps": data["end"]["sum_received"]["bits_per_second"] / 1e6}

    def flap(self, scope, row, target, servers):
        """Cut every link for OUTAGE s; seconds from the path's return to the first reply."""
        wan, ns_a = self.wan, self.wan.ns["a"]
        wan.shape(WAN_50)
        time.sleep(1)
        before, recover, after = 5, 25, 3
        span = before + OUTAGE + recover + after
        if servers:
            probe = scope.start("ping-flap", ping_cmd(ns_a, target, int(span / 0.1), 0.1))
            times, port = ping_times, GELF_PORT
        else:
            echo = scope.start("tcpping-echo", ["ip", "netns", "exec", wan.ns["b"], PYTHON,
                                                str(BENCH / "tcpping.py"), "echo", target, str(ECHO_PORT)])
            if not echo.wait_line(r"^listening$", 10):
                raise RowFailed("tcpping echo did not start: %s" % echo.tail())
            probe = scope.start("tcpping", ["ip", "netns", "exec", ns_a, PYTHON, str(BENCH / "tcpping.py"),
                                            "ping", target, str(ECHO_PORT), "0.1", str(span)])
            times, port = tcpping_times, ECHO_PORT
        try:
            time.sleep(before)
            if not times(probe):
                raise RowFailed("no replies before the cut: %s" % probe.tail())
            logs = {name: len(proc.text()) for name, proc in servers.items()}
            syn0 = wan.syns(port)
            wan.cut(True)
            try:
                time.sleep(OUTAGE)
            finally:
                wan.cut(False)
            up = time.time()
            back = None
            deadline = time.monotonic() + recover
            while time.monotonic() < deadline:
                later = [t for t in times(probe) if t > up]
                if later:
                    back = min(later) - up
                    break
                time.sleep(0.1)
            time.sleep(after)
            syns = wan.syns(port) - syn0
        finally:
            probe.stop()
        events = sum(len(re.findall(r"\blink\b", proc.text()[logs[name]:])) for name, proc in servers.items())
        result = {"back": back, "syns": syns, "events": events}
        if servers:
            result["links"] = {h: len([l for l in ns_stats((wan.ns[h], UNDERLAY[h]))["links"]
                                       if l.get("state") == "open"]) for h in servers}
        return result

    # -- the table

    def report(self, elapsed):
        out = ["## WAN: gelf over an emulated wide-area path", ""]
        out += bench.header(self.args.quick, elapsed, self.load)
        out += [
               "| row | 50 ms, 0 % loss: Mbit/s | 50 ms, 1 % loss: Mbit/s | × plain (0 % / 1 %) "
               "| 20 Mbit/s, 40 ms: idle RTT ms | under load: RTT median / p95 / max ms (bulk Mbit/s) "
               "| flap: back after s | flap: SYNs, link events | load avg before each test | notes |",
               "|---|--:|--:|--:|--:|--:|--:|--:|---|---|"]
        for row in ROWS:
            out.append(self.table_row(row))
        out += ["", (
            "Legend: A, B and P are network namespaces behind a path emulator (bench/wanem.py, in place of "
            "netem/tbf); every path crosses one shaped link each way. 50 ms: 25 ms each way, 100 Mbit/s "
            "bottleneck with a drop-tail buffer of %d ms, iperf3 A→B %d s (first 2 s omitted), receiver's rate; "
            "1 %% loss: each frame dropped with probability 0.01, each way. Latency under load: 20 Mbit/s, "
            "20 ms each way, same buffer; %d idle pings, then pings every 0.1 s from 4 s into a %d s bulk "
            "iperf3 A→B. Flap: on the 50 ms path every frame is dropped for %d s; \"back after\" is the first "
            "reply after the path returns (gelf rows: ping inside the tunnel every 0.1 s; plain rows: a ping "
            "over one TCP connection, TCP's own recovery); SYNs: TCP connection attempts the emulator saw "
            "from the cut until 3 s after the recovery; link events: link lines in the gelf servers' logs "
            "then. TCP congestion control %s in every namespace, outer and inner TCP alike." % (
                QUEUE * 1000, self.tput_s, self.idle_pings, self.load_s, OUTAGE, self.args.cc)), ""]
        return "\n".join(out)

    def table_row(self, row):
        r = self.results.get(row, {"failed": "not run"})
        if "failed" in r:
            return "| %s | failed: %s |  |  |  |  |  |  |  |  |" % (LABELS[row], r["failed"].replace("|", "/"))
        cells = [LABELS[row]]
        ref = self.results.get(REFERENCE.get(row), {})
        for key in ("tput", "tput_loss"):
            cells.append("%.1f" % r[key]["mbps"] if key in r else "failed")
        if row in REFERENCE:
            ratios = []
            for key in ("tput", "tput_loss"):
                ok = key in r and key in ref and ref[key]["mbps"] > 0
                ratios.append("%.2f" % (r[key]["mbps"] / ref[key]["mbps"]) if ok else "–")
            cells.append(" / ".join(ratios))
        else:
            cells.append("1")
        loaded = r.get("loaded")
        if loaded:
            cells += ["%.0f" % loaded["idle"], "%.0f / %.0f / %.0f (%.1f)" % (
                loaded["median"], loaded["p95"], loaded["max"], loaded["mbps"])]
        else:
            cells += ["failed", "failed"]
        flap = r.get("flap")
        if flap:
            cells.append("not within 25 s" if flap["back"] is None else "%.1f" % flap["back"])
            cells.append("%d, %d" % (flap["syns"], flap["events"]) if "links" in flap else "%d, –" % flap["syns"])
        else:
            cells += ["failed", "failed"]
        cells.append(", ".join("%.2f" % l for l in r["load"]))
        notes = list(r["notes"])
        if loaded and loaded["lost"]:
            notes.append("%d pings lost under load" % loaded["lost"])
        if flap and "links" in flap:
            notes.append("open links after the flap: %s" % ", ".join("%s %d" % kv for kv in flap["links"].items()))
        cells.append("; ".join(n.replace("|", "/") for n in notes))
        return "| " + " | ".join(cells) + " |"


def add_arguments(parser):
    parser.add_argument("--cc", default="cubic", choices=["cubic", "bbr", "reno"],
                        help="TCP congestion control of the WAN rows, outer and inner TCP (default: %(default)s)")


def run(args):
    """The WAN part of the bench: its Markdown section."""
    wan = WanBench(args)
    elapsed = wan.run()
    return wan.report(elapsed)


def main(argv=None):
    return bench.main(["--only", "wan"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.modules.setdefault("wan", sys.modules[__name__])  # one module, also for bench.py's import
    sys.exit(main())
