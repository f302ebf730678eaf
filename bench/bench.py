#!/usr/bin/env python3
"""gelf benchmark (`make bench`): throughput, loss, latency and cost, against reference rows.

Run as root from the checkout: `python bench/bench.py [--quick] [--only ROW ...]`.

Every tap row builds the same topology: two fresh network namespaces A (10.90.0.1/24) and
B (10.90.0.2/24) with IPv6 off, joined by the row's link. gelf servers listen on 127.0.0.1 in
the root namespace and their taps are moved into A and B. Traffic goes only to loopback and to
the namespaces the bench creates; every load is bounded in count and time, and every
namespace, interface and process the bench made is removed on exit, on error and on
Ctrl-C/SIGTERM (processes by PID).

Rows:
  R1           kernel veth pair between A and B
  R2           minimal Python tap-to-tap copier (bench/tapcopy.py): Python's ceiling, no offloads
  R3           the browser's relay ceiling: bench/relay_ceiling.html between two plain WebSocket
               endpoints (bench/ws_ceiling.py), at 1514 and 65536 bytes per message
  direct       gelf server2 --connect ws://server1/ws
  relay        `gelf relay` between the two servers
  browser      headless Chromium on server1's page with ?peer=server2
  *-enc        the same with --key on both servers
  pressure     bench/pressure.py: what misbehaving or numerous clients cost the others
  mirror       bench/mirror.py: gelf-mirror (issue 9) beside production alone and tcpdump
  wan          the WAN part, bench/wan.py: gelf and plain TCP over an emulated wide-area path

Output: Markdown tables on stdout and in bench/results.md (a run of only the LAN rows, or only
`wan`, replaces only its own part of the file); logs of the last run in bench/tmp/.
"""

import argparse
import datetime
import http.server
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import mirror  # bench/mirror.py: the mirror section (issue 9)
import pressure  # bench/pressure.py: the "under pressure" section (issue 15)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LOGS = BENCH / "tmp"
RESULTS = BENCH / "results.md"
PYTHON = sys.executable
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
KEY = "000102030405060708090a0b0c0d0e0f"
ADDR_A, ADDR_B = "10.90.0.1", "10.90.0.2"
IPERF_PORT = 5201
TAG = "gb%d" % (os.getpid() % 10000)  # prefix of interface names (at most 15 characters)
BUDGET = 570  # seconds: rows that would start later are skipped, so the LAN part stays < 10 min

TAP_ROWS = ["R1", "R2", "direct", "direct-enc", "relay", "relay-enc", "browser", "browser-enc"]
ALL_ROWS = ["R1", "R2", "R3"] + TAP_ROWS[2:] + ["pressure", "mirror"]
WAN = "wan"  # the WAN part (bench/wan.py): its own table, after the rows above
WAN_HEADING = "## WAN"  # where the WAN part starts in RESULTS
LABELS = {
    "R1": "R1 kernel veth",
    "R2": "R2 Python tap copier",
    "direct": "gelf direct link",
    "direct-enc": "gelf direct link, encrypted",
    "relay": "gelf headless relay",
    "relay-enc": "gelf headless relay, encrypted",
    "browser": "gelf headless Chromium page",
    "browser-enc": "gelf headless Chromium page, encrypted",
}


class RowFailed(Exception):
    """A row (or one measurement of it) could not be done; the reason goes into the table."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM: unwind through every finally, which removes what the bench made."""


def log(msg):
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes and commands

def sh(cmd, timeout=15, check=True):
    """Run a short command; return its CompletedProcess (text). Raises RowFailed on failure."""
    try:
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RowFailed("timed out after %ss: %s" % (timeout, " ".join(cmd))) from None
    if check and res.returncode != 0:
        raise RowFailed("%s -> exit %d: %s" % (" ".join(cmd), res.returncode,
                                               (res.stderr or res.stdout).strip()[-300:]))
    return res


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A background process in its own session, output in a log file; stopped by its PID."""

    def __init__(self, name, cmd, cwd=None, pass_fds=()):
        self.name = name
        self.path = LOGS / ("%s.log" % name)
        self._out = open(self.path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._out,
                                  stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True,
                                  pass_fds=pass_fds)
        self.pid = self.p.pid

    def text(self):
        try:
            return self.path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n=3):
        lines = [l for l in self.text().splitlines() if l.strip()]
        return " | ".join(lines[-n:])[-300:]

    def wait_line(self, pattern, timeout):
        """Wait for a line of output matching pattern; return the match or None."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text())
            if m:
                return m
            if self.p.poll() is not None or time.monotonic() > deadline:
                return rx.search(self.text())
            time.sleep(0.05)

    def alive(self):
        return self.p.poll() is None

    def stop(self, group=False, grace=5):
        """SIGTERM (the whole process group we created with it, if group), then SIGKILL."""
        try:
            if self.p.poll() is None:
                self._signal(signal.SIGTERM, group)
                try:
                    self.p.wait(grace)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL, group)
                    self.p.wait(5)
            if group:  # children that outlived their parent (Chromium's zygote, renderers)
                self._signal(signal.SIGKILL, True)
        finally:
            self._out.close()

    def _signal(self, sig, group):
        try:
            if group:
                os.killpg(self.pid, sig)
            elif self.p.poll() is None:
                os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime of one process, in seconds (/proc/PID/stat fields 14 and 15)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def group_cpu_seconds(pgid):
    """utime + stime of the live processes of one process group (Chromium and its helpers)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def status_mb(pid, field):
    """A memory figure of /proc/PID/status (VmRSS, VmHWM...) in MB; NaN if it is not there."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb(pid):
    return status_mb(pid, "VmHWM")


# ---------------------------------------------------------------- scope: what one row created

class Scope:
    """Processes and namespaces created for one row; close() removes them all, newest first."""

    def __init__(self):
        self.procs = []
        self.netns = []
        self.dirs = []

    def start(self, name, cmd, cwd=None, pass_fds=()):
        proc = Proc(name, cmd, cwd, pass_fds)
        self.procs.append(proc)
        return proc

    def add_netns(self, name):
        sh(["ip", "netns", "add", name])
        self.netns.append(name)
        for key in ("all", "default"):
            self.ns_write(name, "/proc/sys/net/ipv6/conf/%s/disable_ipv6" % key, "1")
        sh(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    @staticmethod
    def ns_write(ns, path, value):
        """Write a /proc/sys file as seen from inside ns (no sysctl binary needed)."""
        sh(["ip", "netns", "exec", ns, "sh", "-c", "[ ! -e %s ] || echo %s > %s" % (path, value, path)])

    def tmpdir(self):
        d = tempfile.mkdtemp(prefix="gelf-bench-")
        self.dirs.append(d)
        return d

    def close(self):
        for proc in reversed(self.procs):
            try:
                proc.stop(group=getattr(proc, "group", False))
            except Exception as err:  # keep cleaning
                log("could not stop %s (pid %d): %s" % (proc.name, proc.pid, err))
        self.procs = []
        for ns in reversed(self.netns):
            res = sh(["ip", "netns", "pids", ns], check=False)
            for pid in res.stdout.split():  # only processes this bench started in its namespace
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh(["ip", "netns", "del", ns], check=False)
        self.netns = []
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.dirs = []


# ---------------------------------------------------------------- measurements

def place(dev, ns, addr):
    """Move an interface of the root namespace into ns, give it addr/24 and bring it up."""
    deadline = time.monotonic() + 10
    while not os.path.exists("/sys/class/net/%s" % dev):
        if time.monotonic() > deadline:
            raise RowFailed("interface %s never appeared" % dev)
        time.sleep(0.05)
    sh(["ip", "link", "set", "dev", dev, "netns", ns])
    configure(dev, ns, addr)


def configure(dev, ns, addr):
    Scope.ns_write(ns, "/proc/sys/net/ipv6/conf/all/disable_ipv6", "1")
    sh(["ip", "-n", ns, "addr", "add", "%s/24" % addr, "dev", dev])
    sh(["ip", "-n", ns, "link", "set", "dev", dev, "up"])


def wait_ping(ns, addr, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = sh(["ip", "netns", "exec", ns, "ping", "-n", "-c", "1", "-W", "1", addr], check=False)
        if res.returncode == 0:
            return
        time.sleep(0.2)
    raise RowFailed("no ping reply from %s within %ss" % (addr, timeout))


def percentile(sorted_values, p):
    """Nearest-rank percentile."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def ping_rtt(ns, addr, count, interval):
    res = sh(["ip", "netns", "exec", ns, "ping", "-n", "-c", str(count), "-i", str(interval),
              "-W", "1", addr], timeout=count * interval + 20, check=False)
    times = sorted(float(t) for t in re.findall(r"time=([\d.]+) ms", res.stdout))
    if not times:
        raise RowFailed("ping: no replies")
    return {"median": statistics.median(times), "p99": percentile(times, 99),
            "lost": count - len(times)}


_iperf_runs = itertools.count(1)


def iperf_server(scope, ns, addr):
    """A one-off iperf3 server on addr in ns, listening."""
    server = scope.start("iperf3-server-%d" % next(_iperf_runs),
                         ["ip", "netns", "exec", ns, "iperf3", "-s", "-1", "-B", addr,
                          "-p", str(IPERF_PORT), "--forceflush"])
    if not server.wait_line(r"Server listening", 10):
        raise RowFailed("iperf3 server did not start: %s" % server.tail())
    return server


def iperf(scope, ns_client, ns_server, args, seconds, addr=ADDR_B):
    """One iperf3 test to addr (fresh one-off server in ns_server); return the client's JSON."""
    server = iperf_server(scope, ns_server, addr)
    try:
        cmd = ["ip", "netns", "exec", ns_client, "iperf3", "-c", addr, "-p", str(IPERF_PORT),
               "-t", str(seconds), "-J", "--connect-timeout", "3000"] + args
        res = sh(cmd, timeout=seconds + 25, check=False)
        try:
            data = json.loads(res.stdout)
        except ValueError:
            raise RowFailed("iperf3 %s: exit %d, no JSON: %s" % (" ".join(args), res.returncode,
                                                                 (res.stderr or res.stdout)[-200:]))
        if data.get("error"):
            raise RowFailed("iperf3 %s: %s" % (" ".join(args), data["error"]))
        return data
    finally:
        server.stop()
        scope.procs.remove(server)


def tcp_gbps(scope, ns_a, ns_b, seconds, reverse):
    data = iperf(scope, ns_a, ns_b, ["-R"] if reverse else [], seconds)
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def udp_loss(scope, ns_a, ns_b, seconds, rate):
    data = iperf(scope, ns_a, ns_b, ["-u", "-l", "1400", "-b", rate], seconds)
    end = data["end"]
    recv = end.get("sum_received") or end["sum"]  # the receiver's side (server report)
    return {"loss": recv["lost_percent"], "mbps": recv["bits_per_second"] / 1e6}


def get_stats(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/stats" % port, timeout=3) as r:
        return json.loads(r.read())


def wait_links(port, kind, timeout=20, needs=(), stats=get_stats):
    """Wait until server `port` has an open link (of `kind`, unless None), while `needs` live.
    `stats(port)` reads the server's /stats (port may be anything that function takes)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        for proc in needs:
            if not proc.alive():
                raise RowFailed("%s exited (%s): %s" % (proc.name, proc.p.returncode, proc.tail()))
        try:
            links = stats(port).get("links", [])
            last = [(l.get("kind"), l.get("state")) for l in links]
            if any(l.get("state") == "open" and (kind is None or l.get("kind") == kind) for l in links):
                return
        except (OSError, ValueError) as err:
            last = str(err)
        time.sleep(0.2)
    raise RowFailed("no open %s link on %s after %ss (links: %s)" % (kind or "", port, timeout, last))


def browser_traffic(ports):
    """Messages and bytes the page delivered to the servers (rx of their browser links)."""
    msgs = nbytes = 0
    for port in ports:
        for link in get_stats(port).get("links", []):
            if link.get("kind") == "browser":
                msgs += link["rx_messages"]
                nbytes += link["rx_bytes"]
    return msgs, nbytes


def start_chromium(scope, name, url, netns=None, devtools=None):
    """Headless Chromium on url, in netns if given. devtools = (read fd, write fd) of two pipes:
    Chromium then speaks the DevTools protocol on them (--remote-debugging-pipe: it reads
    commands from its fd 3 and writes answers to its fd 4)."""
    cmd = [CHROMIUM] + CHROMIUM_ARGS + ["--user-data-dir=%s" % scope.tmpdir(), url]
    fds = ()
    if devtools:
        fds = tuple(devtools)
        cmd = ["bash", "-c", 'exec "$0" "$@" 3<&%d 4>&%d %d<&- %d>&-' % (fds * 2),  # dash: fds < 10 only
               CHROMIUM, "--remote-debugging-pipe"] + cmd[1:]
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    proc = scope.start(name, cmd, pass_fds=fds)
    proc.group = True  # Chromium forks helpers into its session: stop the whole group
    return proc


# ---------------------------------------------------------------- rows

class Bench:
    def __init__(self, args):
        self.args = args
        q = args.quick
        self.tcp_s = 3 if q else 10
        self.udp_s = 2 if q else 5
        self.pings = 50 if q else 200
        self.r3_warm, self.r3_s = (0.5, 2) if q else (1, 5)
        self.rate = args.udp_rate
        self.results = {}  # row -> dict
        self.r3 = {}  # size -> dict
        self.r3_rtt = None  # the browser's own relay round trip
        self.scope = None
        self.http = None

    # -- one tap row

    def tap_row(self, row):
        res = {"cpu": {}, "rss": {}, "notes": []}
        self.results[row] = res
        scope = self.scope = Scope()
        try:
            ns_a = scope.add_netns("gelfbench-%d-a" % os.getpid())
            ns_b = scope.add_netns("gelfbench-%d-b" % os.getpid())
            procs, browser = self.build(row, scope, ns_a, ns_b)
            wait_ping(ns_a, ADDR_B)
            cpu0 = {name: cpu_seconds(p.pid) for name, p in procs.items()}
            chrome0 = group_cpu_seconds(browser.pid) if browser else 0
            self.measure(row, res, scope, ns_a, ns_b, procs)
            for name, p in procs.items():
                if not p.alive():
                    res["notes"].append("%s exited: %s" % (name, p.tail(1)))
                    continue
                res["cpu"][name] = cpu_seconds(p.pid) - cpu0[name]
                res["rss"][name] = peak_rss_mb(p.pid)
            if browser:
                res["notes"].append("Chromium %.1f CPU s" % (group_cpu_seconds(browser.pid) - chrome0))
        except RowFailed as err:
            res["failed"] = str(err)
        except Exception as err:  # a bug or a surprise: report it in the row, go on with the next
            res["failed"] = "%s: %s" % (type(err).__name__, err)
        finally:
            self.scope = None
            scope.close()

    def build(self, row, scope, ns_a, ns_b):
        """Create the row's link between A and B; return ({name: measured process}, chromium)."""
        if row == "R1":
            sh(["ip", "link", "add", TAG + "va", "netns", ns_a, "type", "veth",
                "peer", "name", TAG + "vb", "netns", ns_b])
            configure(TAG + "va", ns_a, ADDR_A)
            configure(TAG + "vb", ns_b, ADDR_B)
            return {}, None
        if row == "R2":
            copier = scope.start("tapcopy", [PYTHON, str(BENCH / "tapcopy.py"), TAG + "ca", TAG + "cb"])
            if not copier.wait_line(r"^ready$", 10):
                raise RowFailed("tapcopy did not start: %s" % copier.tail())
            place(TAG + "ca", ns_a, ADDR_A)
            place(TAG + "cb", ns_b, ADDR_B)
            return {"copier": copier}, None
        mode, _, enc = row.partition("-")
        key = ["--key", KEY] if enc else []
        p1, p2 = free_port(), free_port()
        s1 = self.gelf(scope, "server1", TAG + "s1", p1, key)
        s2 = self.gelf(scope, "server2", TAG + "s2", p2,
                       key + (["--connect", "ws://127.0.0.1:%d/ws" % p1] if mode == "direct" else []))
        place(TAG + "s1", ns_a, ADDR_A)
        place(TAG + "s2", ns_b, ADDR_B)
        procs = {"s1": s1, "s2": s2}
        browser = None
        self.ports = (p1, p2)
        if mode == "direct":
            wait_links(p1, "direct")
            wait_links(p2, None)
        elif mode == "relay":
            procs["relay"] = scope.start("relay", [PYTHON, "gelf.py", "relay", "ws://127.0.0.1:%d/ws" % p1,
                                                   "ws://127.0.0.1:%d/ws" % p2], cwd=REPO)
            wait_links(p1, "relay", needs=[procs["relay"]])
            wait_links(p2, "relay", needs=[procs["relay"]])
        else:
            browser = start_chromium(scope, "chromium-" + row, "http://127.0.0.1:%d/?peer=127.0.0.1:%d" % (p1, p2))
            wait_links(p1, "browser", 30, needs=[browser])
            wait_links(p2, "browser", 30, needs=[browser])
        return procs, browser

    def gelf(self, scope, name, dev, port, extra):
        cmd = [PYTHON, "gelf.py", "--host", "127.0.0.1", "--dev", dev] + extra + [str(port)]
        proc = scope.start(name, cmd, cwd=REPO)
        if not proc.wait_line(r"\[Gelf\] Relay listening: 127\.0\.0\.1 %d\b" % port, 20):
            raise RowFailed("%s did not start: %s" % (name, proc.tail()))
        return proc

    def measure(self, row, res, scope, ns_a, ns_b, procs):
        def attempt(key, fn):
            try:
                res[key] = fn()
            except Exception as err:
                res[key] = None
                res["notes"].append("%s failed: %s" % (key, err if isinstance(err, RowFailed)
                                                       else "%s: %s" % (type(err).__name__, err)))

        settle = 0.5  # let queues drain between tests
        attempt("rtt", lambda: ping_rtt(ns_a, ADDR_B, self.pings, 0.01))
        time.sleep(settle)
        page = row.startswith("browser")
        if page:
            try:
                m0, t0 = browser_traffic(self.ports), time.monotonic()
            except (OSError, ValueError, KeyError) as err:
                page = False
                res["notes"].append("page rate: %s" % err)
        attempt("tcp_ab", lambda: tcp_gbps(scope, ns_a, ns_b, self.tcp_s, False))
        if page:
            try:
                m1, t1 = browser_traffic(self.ports), time.monotonic()
                res["page"] = {"msgs": (m1[0] - m0[0]) / (t1 - t0),
                               "size": (m1[1] - m0[1]) / max(1, m1[0] - m0[0])}
            except (OSError, ValueError, KeyError) as err:
                res["notes"].append("page rate: %s" % err)
        time.sleep(settle)
        attempt("tcp_ba", lambda: tcp_gbps(scope, ns_a, ns_b, self.tcp_s, True))
        time.sleep(settle)
        attempt("udp", lambda: udp_loss(scope, ns_a, ns_b, self.udp_s, self.rate))

    # -- R3: the browser's relay ceiling

    def r3_row(self):
        for size in (1514, 65536, "rtt"):
            scope = self.scope = Scope()
            try:
                result = self.r3_round_trip(scope) if size == "rtt" else self.r3_size(scope, size)
            except RowFailed as err:
                result = {"failed": str(err)}
            except Exception as err:
                result = {"failed": "%s: %s" % (type(err).__name__, err)}
            finally:
                self.scope = None
                scope.close()
            if size == "rtt":
                self.r3_rtt = result
            else:
                self.r3[size] = result

    def r3_round_trip(self, scope):
        """Median and p99 of a small message going out and back through the page (an echo
        endpoint on the other side): what Chromium alone adds to a round trip."""
        pp, pe = free_port(), free_port()
        tool = str(BENCH / "ws_ceiling.py")
        pinger = scope.start("r3-pinger", [PYTHON, tool, "pinger", str(pp), str(self.pings), "0.01"])
        echo = scope.start("r3-echo", [PYTHON, tool, "echo", str(pe)])
        for p in (pinger, echo):
            if not p.wait_line(r"^listening$", 10):
                raise RowFailed("%s did not start: %s" % (p.name, p.tail()))
        url = "http://127.0.0.1:%d/relay_ceiling.html?src=ws://127.0.0.1:%d/&dst=ws://127.0.0.1:%d/" % (
            self.http_port(), pp, pe)
        start_chromium(scope, "chromium-r3-rtt", url)
        m = pinger.wait_line(r"^(\{.*\})$", 30 + self.pings * 0.05)
        if not m:
            raise RowFailed("no round trips through the page: %s" % pinger.tail())
        rtts = sorted(json.loads(m.group(1))["rtts_ms"])
        return {"median": percentile(rtts, 50), "p99": percentile(rtts, 99)}

    def r3_size(self, scope, size):
        ps, pk = free_port(), free_port()
        tool = str(BENCH / "ws_ceiling.py")
        source = scope.start("r3-source-%d" % size, [PYTHON, tool, "source", str(ps), str(size)])
        sink = scope.start("r3-sink-%d" % size, [PYTHON, tool, "sink", str(pk), str(self.r3_warm), str(self.r3_s)])
        for p in (source, sink):
            if not p.wait_line(r"^listening$", 10):
                raise RowFailed("%s did not start: %s" % (p.name, p.tail()))
        url = "http://127.0.0.1:%d/relay_ceiling.html?src=ws://127.0.0.1:%d/&dst=ws://127.0.0.1:%d/" % (
            self.http_port(), ps, pk)
        browser = start_chromium(scope, "chromium-r3-%d" % size, url)
        deadline = time.monotonic() + 30 + self.r3_warm
        while not sink.wait_line(r"^measuring$", 0.5):
            if not browser.alive():
                raise RowFailed("Chromium exited (%s): %s" % (browser.p.returncode, browser.tail()))
            if time.monotonic() > deadline:
                raise RowFailed("the page never relayed a message: %s" % sink.tail())
        cpu0 = {"source": cpu_seconds(source.pid), "Chromium": group_cpu_seconds(browser.pid)}
        m = sink.wait_line(r"^(\{.*\})$", 10 + self.r3_s)
        if not m:
            raise RowFailed("no result from the sink: %s" % sink.tail())
        cpu = {"source": cpu_seconds(source.pid) - cpu0["source"],
               "Chromium": group_cpu_seconds(browser.pid) - cpu0["Chromium"]}
        data = json.loads(m.group(1))
        return {"msgs": data["messages"] / data["seconds"],
                "mbps": data["bytes"] * 8 / data["seconds"] / 1e6, "cpu": cpu}

    def http_port(self):
        """Serve bench/ on 127.0.0.1 (for relay_ceiling.html) from a thread of this process."""
        if self.http is None:
            class Quiet(http.server.SimpleHTTPRequestHandler):
                def __init__(self, *a, **kw):
                    super().__init__(*a, directory=str(BENCH), **kw)

                def log_message(self, *a):
                    pass

            self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
            threading.Thread(target=self.http.serve_forever, daemon=True).start()
        return self.http.server_address[1]

    # -- the run

    def run(self, rows):
        self.load = [os.getloadavg()[0]]
        started = time.monotonic()
        try:
            for row in rows:
                if time.monotonic() - started > BUDGET:
                    self.results[row] = {"failed": "skipped: the bench's %d s budget is spent" % BUDGET}
                    continue
                log("row %s" % row)
                t = time.monotonic()
                if row == "R3":
                    self.r3_row()
                elif row == "pressure":
                    self.results[row] = pressure.run(self)
                elif row == "mirror":
                    self.results[row] = mirror.run(self)
                else:
                    self.tap_row(row)
                log("row %s done in %.0f s%s" % (row, time.monotonic() - t,
                                                 "" if row == "R3" or "failed" not in self.results[row]
                                                 else ": failed: " + self.results[row]["failed"]))
        finally:
            if self.scope is not None:
                self.scope.close()
            if self.http is not None:
                self.http.shutdown()
        self.load.append(os.getloadavg()[0])
        return time.monotonic() - started

    # -- the table

    def report(self, rows, elapsed):
        out = ["# gelf benchmark", ""] + header(self.args.quick, elapsed, self.load)
        tap_rows = [r for r in rows if r not in ("R3", "pressure", "mirror")]
        if tap_rows:
            out += ["| row | TCP A→B Gbit/s | TCP B→A Gbit/s | ×R2 (A→B / B→A) | UDP loss %% @%s (rx Mbit/s) "
                    "| RTT median ms | RTT p99 ms | CPU s | peak RSS MB | notes |" % self.rate,
                    "|---|--:|--:|--:|--:|--:|--:|---|---|---|"]
            for row in tap_rows:
                out.append(self.table_row(row))
            out.append("")
        if "R3" in rows:
            out += ["R3, the browser's own relay ceiling (headless Chromium, page relaying between two plain "
                    "WebSocket endpoints, no gelf):", "",
                    "| message bytes | messages/s | Mbit/s | CPU s while measuring (source, Chromium all processes) |", "|--:|--:|--:|---|"]
            for size in (1514, 65536):
                r = self.r3.get(size, {"failed": "not run"})
                if "failed" in r:
                    out.append("| %d | failed: %s | | |" % (size, r["failed"]))
                else:
                    out.append("| %d | %.0f | %.0f | %s |" % (size, r["msgs"], r["mbps"], ", ".join(
                        "%s %.1f" % kv for kv in r["cpu"].items())))
            rtt = self.r3_rtt or {"failed": "not run"}
            out += ["", "R3 round trip, a small message out and back through the page (%d, 10 ms apart): %s" % (
                self.pings, "failed: %s" % rtt["failed"] if "failed" in rtt else
                "median %.3f ms, p99 %.3f ms" % (rtt["median"], rtt["p99"]))]
            out.append("")
        out += [] if not tap_rows and "R3" not in rows else [
            "Legend: A and B are network namespaces (10.90.0.1 and .2/24, IPv6 off). TCP: iperf3 %d s per "
            "direction, receiver's rate. ×R2: TCP rate over R2's in the same run. UDP: iperf3 -u -l 1400 -b %s "
            "for %d s, loss and rate at the receiver. RTT: %d pings at 10 ms intervals, idle link. CPU s: "
            "utime+stime of each process during the measurements (s1/s2 = gelf servers, relay = gelf relay, "
            "copier = R2's process); peak RSS: VmHWM. Browser rows: page msg/s = messages the page delivered "
            "to the servers during TCP A→B (both directions), ×R3 = that over R3's messages/s at the size "
            "nearest the average message. Chromium is launched directly on the page URL (no driver attached)."
            % (self.tcp_s, self.rate, self.udp_s, self.pings), ""]
        if "pressure" in rows:
            out.append(pressure.report(self.results.get("pressure", {})))
        if "mirror" in rows:
            out.append(mirror.report(self.results.get("mirror", {})))
        return "\n".join(out)

    def table_row(self, row):
        r = self.results.get(row, {"failed": "not run"})
        cells = [LABELS[row]]
        if "failed" in r:
            return "| %s | failed: %s | | | | | | | | |" % (LABELS[row], r["failed"].replace("|", "/"))
        r2 = self.results.get("R2", {})

        def gbps(key):
            return "failed" if r.get(key) is None else "%.3f" % r[key]

        def ratio(key):
            if r.get(key) is None or not r2.get(key):
                return "–"
            return "%.2f" % (r[key] / r2[key])

        cells += [gbps("tcp_ab"), gbps("tcp_ba"), "%s / %s" % (ratio("tcp_ab"), ratio("tcp_ba"))]
        udp = r.get("udp")
        cells.append("failed" if udp is None else "%.2f (%.0f)" % (udp["loss"], udp["mbps"]))
        rtt = r.get("rtt")
        cells += ["failed", "failed"] if rtt is None else ["%.3f" % rtt["median"], "%.3f" % rtt["p99"]]
        cells.append(", ".join("%s %.1f" % kv for kv in r["cpu"].items()) or "–")
        cells.append(", ".join("%s %.0f" % kv for kv in r["rss"].items()) or "–")
        notes = []
        if rtt and rtt["lost"]:
            notes.append("%d pings lost" % rtt["lost"])
        page = r.get("page")
        if page:
            note = "page %.1fk msg/s, avg %.0f B" % (page["msgs"] / 1000, page["size"])
            ok = {s: v for s, v in self.r3.items() if "failed" not in v}
            if ok:
                size = min(ok, key=lambda s: abs(math.log(s) - math.log(max(1, page["size"]))))
                note += " = %.2f×R3@%d" % (page["msgs"] / ok[size]["msgs"], size)
            notes.append(note)
        notes += r["notes"]
        cells.append("; ".join(n.replace("|", "/") for n in notes))
        return "| " + " | ".join(cells) + " |"


def header(quick, elapsed, load):
    """The lines that say where and how a run was made, for the top of a results section."""
    return ["- date: %s" % datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "- CPU: %s, %d cores; kernel %s" % (cpu_model(), os.cpu_count(), platform.release()),
            "- gelf: commit %s" % git_commit(),
            "- tools: Python %s, %s, %s" % (platform.python_version(), tool_version([CHROMIUM, "--version"]),
                                            tool_version(["iperf3", "--version"])),
            "- run: %s%.0f s; load average (1 min) before / after: %.2f / %.2f%s" % (
                "--quick, " if quick else "", elapsed, load[0], load[-1],
                # The bench loads the machine itself: only a load before it started says other work ran.
                " (other work was running before the start: figures may be pessimistic)"
                if load[0] > 0.5 else " (after: the bench's own load)"),
            ""]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_commit():
    try:
        head = sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = sh(["git", "-C", str(REPO), "status", "--porcelain", "--", "gelf", "static", "templates",
                    "gelf.py"]).stdout.strip()
        return head + (" + uncommitted changes in gelf" if dirty else "")
    except (RowFailed, OSError):
        return "unknown (no git)"


def tool_version(cmd):
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return res.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "%s: not found" % cmd[0]


def preflight(rows):
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root (network namespaces, taps)")
    if not os.path.exists("/dev/net/tun"):
        problems.append("needs /dev/net/tun")
    for tool in ("ip", "ping", "iperf3"):
        if not shutil.which(tool):
            problems.append("needs '%s' (make sysdeps)" % tool)
    if any(r.startswith("browser") or r in ("R3", WAN) for r in rows) and not os.access(CHROMIUM, os.X_OK):
        problems.append("needs Chromium at %s (make sysdeps)" % CHROMIUM)
    return problems


def write_results(lan, wan):
    """Write RESULTS: the parts this run made, and the other part as the last run left it."""
    old = RESULTS.read_text() if RESULTS.exists() else ""
    old_lan, sep, old_wan = old.partition("\n" + WAN_HEADING)
    lan = lan or old_lan.rstrip("\n")
    wan = wan or (WAN_HEADING + old_wan if sep else "")
    RESULTS.write_text("\n\n".join(part for part in (lan or "# gelf benchmark", wan) if part))


def main(argv=None):
    import wan as wan_bench  # bench/wan.py imports this module: import it only once this one is loaded

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short durations, for a smoke run (~2 min for the LAN rows, ~5 for the WAN part)")
    parser.add_argument("--only", nargs="+", metavar="ROW",
                        help="run only these rows (space or comma separated): %s" % " ".join(ALL_ROWS + [WAN]))
    parser.add_argument("--udp-rate", default="300M", help="iperf3 UDP offered rate (default: %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="print the table but do not write %s" % RESULTS)
    wan_bench.add_arguments(parser)
    args = parser.parse_args(argv)
    rows = ALL_ROWS + [WAN]
    if args.only:
        wanted = [w for arg in args.only for w in arg.split(",") if w]
        unknown = [w for w in wanted if w not in rows]
        if unknown:
            parser.error("unknown row(s) %s; rows are: %s" % (", ".join(unknown), " ".join(rows)))
        rows = [r for r in rows if r in wanted]
    problems = preflight(rows)
    if problems:
        for p in problems:
            print("bench: error: " + p, file=sys.stderr)
        return 1

    shutil.rmtree(LOGS, ignore_errors=True)
    LOGS.mkdir(parents=True)
    install_signal_handlers()
    lan_rows = [r for r in rows if r != WAN]
    lan = wan = None
    try:
        if lan_rows:
            bench = Bench(args)
            lan = bench.report(lan_rows, bench.run(lan_rows))
            print(lan, flush=True)
        if WAN in rows:
            wan = wan_bench.run(args)
            print(("\n" if lan else "") + wan, flush=True)
    except (KeyboardInterrupt, Interrupted):
        log("interrupted: cleaned up")
        return 130
    if not args.no_write:
        write_results(lan, wan)
        log("wrote %s (logs in %s)" % (RESULTS.relative_to(REPO), LOGS.relative_to(REPO)))
    return 0


def install_signal_handlers():
    """SIGINT and SIGTERM raise Interrupted, which unwinds through every finally (the cleanup)."""

    def on_signal(signum, frame):
        # once: the cleanup that follows (every finally) must not be interrupted in turn
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


if __name__ == "__main__":
    sys.modules.setdefault("bench", sys.modules[__name__])  # one module, also for bench/wan.py's import
    sys.exit(main())
