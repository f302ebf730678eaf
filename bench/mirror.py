#!/usr/bin/env python3
"""The mirror section of `make bench` (issue 9, Performance): what gelf-mirror costs production
and how much it mirrors, beside the references measured in the same run.

Run as root from the checkout: `python bench/bench.py --only mirror [--quick]` (with the other
rows: `make bench`). While developing: `python bench/mirror.py [--quick] [--rows alone tcpdump]`.

Topology: namespaces cli, prod and stg (`gelfmir-PID-...`, IPv6 off); veth cli 10.84.1.2 -
prod 10.84.1.1, and prod 10.84.2.1 - stg 10.84.2.2. Production is nginx from Debian (one worker,
`return 200 "ok"`, bodies read and discarded) on prod:80; the load is wrk (Debian) in cli, paced
by a Lua `delay()` (wrk is closed-loop: C connections each waiting 10 ms between requests); the
staging server is the same nginx on stg:18380. Every count comes from the nginx access logs
(one line per request): what production served and what staging received.

Rows:
  alone     production alone: the rates it sustains, its latency at 1 000 req/s
  tcpdump   `tcpdump -w /dev/null 'tcp port 80'` in prod (the capture floor); "missing" = the
            packets tcpdump says the kernel dropped
  mirror    `gelf-mirror -c -p 80 -u tcp://10.84.2.2:18380` in prod; "missing" = requests
            production served that staging never received (waited for until it stops growing)
Figures per row: the highest rate of small keep-alive GETs with 0 missing (a ladder of paced
rates, stopping at the first with losses), the same for 64 KiB POSTs in MB/s, the capturing
process's CPU (% of one core) and RSS at 1 000 req/s, and production's latency (wrk's p50 / p99)
at 1 000 req/s: the latency with and without the mirror is the alone row against the mirror row.

Traffic goes only to the namespaces made here; every load is bounded in count and time (a
fixed ladder of steps of a few seconds); every namespace and process is removed on exit, error
and SIGINT/SIGTERM by bench.py's Scope (processes by PID).
"""

import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CLI = REPO / "gelf" / "mirror" / "cli.py"
PROD, STG, CLIENT = "10.84.1.1", "10.84.2.2", "10.84.1.2"
STG_PORT = 18380
ROWS = ["alone", "tcpdump", "mirror"]
LABELS = {"alone": "production alone (nginx)", "tcpdump": "`tcpdump -w /dev/null` (capture floor)",
          "mirror": "gelf-mirror capture → plain staging"}
GET_RATES = [1000, 2000, 3000, 5000, 7500, 10000, 15000, 20000, 30000, 50000]
POST_RATES = [50, 100, 200, 400, 800, 1600, 3200, 6400, 12800]  # x 64 KiB: 3.3 to 839 MB/s
POST_SIZE = 65536
REFERENCE_RATE = 1000  # CPU, RSS and latency are measured at this rate

NGINX = """
user root;
worker_processes 1;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log warn;
events { worker_connections 4096; }
http {
    access_log %(dir)s/access.log;
    client_body_temp_path %(dir)s/body;
    client_max_body_size 4m;
    client_body_buffer_size 128k;
    keepalive_requests 1000000;
    server {
        listen %(addr)s:%(port)d;
        location / { return 200 "ok\\n"; }
    }
}
"""

WRK_LUA = """
%(body)s
function delay()
    return %(delay)d
end
"""


def pacing(rate):
    """(connections, ms between a connection's requests) for about `rate` requests/s from wrk,
    whose delay() is whole milliseconds. 10 ms between requests, so that production's own
    latency (0.1 to 2 ms) costs the paced rate little: at 2 ms the 15 000 req/s step reached
    only 12 000 with the mirror running, at 10 ms 100 connections give 1 000 req/s."""
    conns = max(1, math.ceil(rate / 100))
    return conns, max(1, int(round(conns * 1000 / rate)))


def parse_wrk(text):
    """Requests/s, latency p50 and p99 (ms) and socket errors from `wrk --latency` output."""
    def ms(value, unit):
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]

    lat = {p: ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"rps": float(rps.group(1)) if rps else None, "p50": lat.get("50"), "p99": lat.get("99"),
            "errors": sum(map(int, errors.groups())) if errors else 0,
            "non2xx": int(non2xx.group(1)) if non2xx else 0}


def tcpdump_dropped(text):
    m = re.search(r"(\d+) packets? dropped by kernel", text)
    return int(m.group(1)) if m else None


class Mirror:
    def __init__(self, bench):
        self.B = sys.modules[type(bench).__module__]  # bench.py, whether run as a script or imported
        self.bench = bench
        self.quick = bench.args.quick
        self.step_s = 2 if self.quick else 5
        self.names = iter(range(1, 1 << 30))

    def name(self, what):
        return "mirror-%d-%s" % (next(self.names), what)

    # -- topology and servers

    def build(self, scope):
        B = self.B
        pid = os.getpid()
        ns = {k: scope.add_netns("gelfmir-%d-%s" % (pid, k)) for k in ("cli", "prod", "stg")}
        for a, b, addr_a, addr_b, tag in (("cli", "prod", CLIENT, PROD, "c"), ("stg", "prod", STG, "10.84.2.1", "s")):
            dev_a, dev_b = B.TAG + "m" + tag + "a", B.TAG + "m" + tag + "b"
            B.sh(["ip", "link", "add", dev_a, "netns", ns[a], "type", "veth", "peer", "name", dev_b, "netns", ns[b]])
            B.configure(dev_a, ns[a], addr_a)
            B.configure(dev_b, ns[b], addr_b)
        self.ns = ns
        self.prod = self.nginx(scope, "prod", PROD, 80)
        self.stg = self.nginx(scope, "stg", STG, STG_PORT)
        B.wait_ping(ns["cli"], PROD)
        B.wait_ping(ns["prod"], STG)

    def nginx(self, scope, role, addr, port):
        d = Path(scope.tmpdir())
        (d / "nginx.conf").write_text(NGINX % {"dir": d, "addr": addr, "port": port})
        proc = scope.start(self.name("nginx-" + role), ["ip", "netns", "exec", self.ns[role], "nginx", "-p", str(d),
                                                        "-c", str(d / "nginx.conf"), "-e", str(d / "error.log"),
                                                        "-g", "daemon off;"])
        proc.access = d / "access.log"
        deadline = time.monotonic() + 10
        while not proc.access.exists():
            if not proc.alive() or time.monotonic() > deadline:
                raise self.B.RowFailed("nginx (%s) did not start: %s %s" % (
                    role, proc.tail(), (d / "error.log").read_text()[-300:] if (d / "error.log").exists() else ""))
            time.sleep(0.05)
        return proc

    @staticmethod
    def count(proc):
        with open(proc.access, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    # -- one paced step of load

    def wrk(self, scope, rate, post=False, seconds=None):
        """wrk from cli at about `rate` req/s (None: as fast as it goes) for a step; its figures."""
        seconds = seconds or self.step_s
        conns, delay = pacing(rate) if rate else (16, 0)
        d = Path(scope.tmpdir())
        body = ('wrk.method = "POST"\nwrk.body = string.rep("x", %d)\n'
                'wrk.headers["Content-Type"] = "application/octet-stream"' % POST_SIZE) if post else ""
        lua = d / "pace.lua"
        lua.write_text(WRK_LUA % {"body": body, "delay": delay} if delay else body + "\n")
        res = self.B.sh(["ip", "netns", "exec", self.ns["cli"], "wrk", "-t1", "-c%d" % conns, "-d%ds" % seconds,
                         "--timeout", "5s", "--latency", "-s", str(lua), "http://%s/" % PROD],
                        timeout=seconds + 30, check=False)
        figures = parse_wrk(res.stdout)
        if figures["rps"] is None:
            raise self.B.RowFailed("wrk: %s" % (res.stderr or res.stdout).strip()[-300:])
        return figures

    def settle(self, proc, quiet=1.5, timeout=30):
        """Wait until proc's access log stops growing for `quiet` s (what is in flight arrives)."""
        last, since, deadline = self.count(proc), time.monotonic(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.count(proc)
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    def step(self, scope, row, rate, post, capture=None):
        """One paced step: production's rate and latency, and what the capture missed."""
        B = self.B
        tcpdump = None
        if row == "tcpdump":
            tcpdump = scope.start(self.name("tcpdump"), ["ip", "netns", "exec", self.ns["prod"], "tcpdump", "-i",
                                                         B.TAG + "mcb", "-n", "-B", "4096", "-w", "/dev/null",
                                                         "tcp port 80"])
            if not tcpdump.wait_line(r"listening on", 10):
                raise B.RowFailed("tcpdump did not start: %s" % tcpdump.tail())
            capture = tcpdump
        p0, s0 = self.count(self.prod), self.count(self.stg)
        cpu0, t0 = (B.cpu_seconds(capture.pid) if capture else 0), time.monotonic()
        figures = self.wrk(scope, rate, post)
        elapsed = time.monotonic() - t0
        if capture:
            figures["cpu"] = 100 * (B.cpu_seconds(capture.pid) - cpu0) / elapsed
            figures["rss"] = rss_mb(capture.pid)
        served = self.settle(self.prod, 0.5) - p0
        figures.update(served=served, rate=served / elapsed, target=rate, post=post)
        if row == "mirror":
            if not capture.alive():
                raise B.RowFailed("gelf-mirror exited: %s" % capture.tail())
            figures["missing"] = served - (self.settle(self.stg) - s0)
        elif row == "tcpdump":
            tcpdump.stop()
            scope.procs.remove(tcpdump)
            figures["missing"] = tcpdump_dropped(tcpdump.text())
            if figures["missing"] is None:
                raise B.RowFailed("tcpdump printed no drop count: %s" % tcpdump.tail())
        else:
            figures["missing"] = 0
        B.log("mirror %s: %s %s req/s -> %.0f req/s, p99 %s ms, missing %s, wrk errors %d, non-2xx %d%s" % (
            row, "POST" if post else "GET", rate or "max", figures["rate"], figures["p99"], figures["missing"],
            figures["errors"], figures["non2xx"],
            ", capture CPU %.0f%%" % figures["cpu"] if "cpu" in figures else ""))
        return figures

    def ladder(self, scope, row, rates, post, capture, out):
        """Paced steps up the ladder until one misses requests; once wrk cannot reach a paced rate,
        the rest of the ladder is skipped for one unpaced step (as fast as wrk and nginx go)."""
        steps = out.setdefault("post_steps" if post else "get_steps", [])
        rates = list(rates)
        while True:
            rate = rates.pop(0) if rates else None
            if rate is None and capture is not None:  # the peak before the first overload, for the RSS goal
                out.setdefault("peak_paced", peak(capture.pid))
            f = self.step(scope, row, rate, post, capture)
            steps.append(f)
            if f["missing"] or f["errors"] or f["non2xx"] or rate is None:
                return
            if f["rate"] < 0.8 * rate:
                rates = []

    # -- rows

    def row(self, scope, row, out):
        capture = None
        if row == "mirror":
            if not CLI.exists():
                raise self.B.RowFailed("gelf/mirror/cli.py is not there yet (issue 9's parts are not merged)")
            capture = scope.start(self.name("gelf-mirror"), ["ip", "netns", "exec", self.ns["prod"], self.B.PYTHON,
                                                             "-m", "gelf.mirror.cli", "-c", "-p", "80", "-u",
                                                             "tcp://%s:%d" % (STG, STG_PORT)], cwd=str(REPO))
            if not capture.wait_line(r"capturing connections to port", 30):
                raise self.B.RowFailed("gelf-mirror did not start: %s" % capture.tail())
            self.warm_up(scope, capture)
        ref = self.step(scope, row, REFERENCE_RATE, False, capture)
        out["ref"] = ref
        self.ladder(scope, row, [r for r in GET_RATES if r > REFERENCE_RATE], False, capture, out)
        self.ladder(scope, row, POST_RATES, True, capture, out)
        if capture:
            out["peak_rss"] = peak(capture.pid)
            out["log_tail"] = capture.tail(2)

    def warm_up(self, scope, capture, timeout=30):
        """Requests until staging has received one: capture and its upstream are up."""
        deadline = time.monotonic() + timeout
        s0 = self.count(self.stg)
        while self.count(self.stg) == s0:
            if time.monotonic() > deadline or not capture.alive():
                raise self.B.RowFailed("nothing mirrored within %ds: %s" % (timeout, capture.tail()))
            self.B.sh(["ip", "netns", "exec", self.ns["cli"], "wrk", "-t1", "-c1", "-d1s", "http://%s/" % PROD],
                      timeout=30, check=False)
            time.sleep(0.5)
        self.settle(self.stg)


def rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def preflight():
    return ["needs '%s' (make sysdeps)" % tool for tool in ("nginx", "wrk", "tcpdump") if not shutil.which(tool)]


def run(bench, rows=None):
    """Run the rows (all by default) on `bench` (a bench.Bench); return {row: results}."""
    m = Mirror(bench)
    B = m.B
    results = {"_run": {"load_before": os.getloadavg()[0], "quick": m.quick}}
    problems = preflight()
    started = time.monotonic()
    for row in rows or ROWS:
        out = results[row] = {}
        if problems:
            out["failed"] = "; ".join(problems)
            continue
        scope = bench.scope = B.Scope()
        t = time.monotonic()
        B.log("mirror: %s" % row)
        try:
            m.build(scope)
            m.row(scope, row, out)
        except B.RowFailed as err:
            out["failed"] = str(err)
        except Exception as err:  # a bug or a surprise: report it, go on with the next row
            out["failed"] = "%s: %s" % (type(err).__name__, err)
        finally:
            bench.scope = None
            scope.close()
        B.log("mirror: %s done in %.0f s%s" % (row, time.monotonic() - t,
                                               ": failed: " + out["failed"] if "failed" in out else ""))
    results["_run"].update(load_after=os.getloadavg()[0], elapsed=time.monotonic() - started)
    return results


def best(steps, post):
    """The highest production rate among steps with nothing missing, and the step after (or None)."""
    clean = [s for s in steps if not s["missing"] and not s["errors"] and not s["non2xx"]]
    top = max(clean, key=lambda s: s["rate"], default=None)
    if top is None:
        return "none clean"
    value = top["rate"] * POST_SIZE / 1e6 if post else top["rate"]
    text = ("%.1f MB/s" if post else "%.0f req/s") % value
    if steps and steps[-1] is not top and steps[-1]["missing"]:
        text += " (next: %.0f req/s, %d missing)" % (steps[-1]["rate"], steps[-1]["missing"])
    return text


def report(results):
    run_ = results.get("_run", {})
    out = ["## Mirror (issue 9): production beside gelf-mirror", "",
           "- run: %s%.0f s; load average (1 min) before / after: %.2f / %.2f" % (
               "--quick, " if run_.get("quick") else "", run_.get("elapsed", 0), run_.get("load_before", 0),
               run_.get("load_after", 0)), "",
           "| row | small GETs, highest rate with 0 missing | 64 KiB POSTs, highest with 0 missing "
           "| capture CPU %% of a core @%d req/s | capture RSS MB @%d req/s (peak over the paced GETs / at the end) | production p50 / p99 ms @%d req/s "
           "| notes |" % (REFERENCE_RATE, REFERENCE_RATE, REFERENCE_RATE),
           "|---|--:|--:|--:|--:|--:|---|"]
    for row in ROWS:
        r = results.get(row)
        if r is None:
            continue
        if "failed" in r and "ref" not in r:
            out.append("| %s | failed: %s | | | | | |" % (LABELS[row], r["failed"].replace("|", "/")))
            continue
        ref = r.get("ref", {})
        cpu = "%.1f" % ref["cpu"] if "cpu" in ref else "–"
        rss = "%.0f" % ref["rss"] if "rss" in ref else "–"
        if r.get("peak_rss"):
            rss += " (%.0f / %.0f)" % (r.get("peak_paced") or float("nan"), r["peak_rss"])
        lat = "%.2f / %.2f" % (ref["p50"], ref["p99"]) if ref.get("p99") is not None else "–"
        notes = []
        if ref:
            notes.append("reference step %.0f req/s, %s missing" % (ref["rate"], ref["missing"]))
        if "failed" in r:
            notes.append("failed: " + r["failed"])
        out.append("| %s | %s | %s | %s | %s | %s | %s |" % (
            LABELS[row], best([ref] + r.get("get_steps", []), False), best(r.get("post_steps", []), True),
            cpu, rss, lat, "; ".join(n.replace("|", "/") for n in notes)))
    out += ["", "Legend: namespaces cli → prod → stg (veth, IPv4); production and staging are nginx (1 worker, "
            "`return 200`), the load is wrk -t1 in cli paced by a Lua delay() (C connections, D ms between each "
            "one's requests), steps of a few seconds up a fixed ladder (GET %s req/s, then unpaced; POST %s req/s "
            "of 64 KiB, then unpaced), stopping at the first step with anything missing. Rates are what "
            "production's access log counted per second of the step. Missing: tcpdump's kernel drops, or "
            "requests production served that staging's access log never showed. CPU: utime+stime of the "
            "capturing process over the step at %d req/s (the kernel's copy of each packet into the capture's "
            "buffer is charged to the sending side, not to it); RSS then; peaks: VmHWM after the paced GET steps, and at the end, after the unpaced steps (which overload the capture on purpose) and the POSTs." % (
                ", ".join(map(str, GET_RATES)), ", ".join(map(str, POST_RATES)), REFERENCE_RATE), ""]
    return "\n".join(out)


def main(argv):
    import argparse
    import signal

    sys.path.insert(0, str(BENCH))
    import bench as B

    parser = argparse.ArgumentParser(description="the mirror part of the gelf benchmark")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS)
    args = parser.parse_args(argv)
    args.udp_rate = "300M"
    if os.geteuid() != 0:
        sys.exit("mirror.py: run as root (namespaces, capture)")
    B.LOGS.mkdir(parents=True, exist_ok=True)

    def on_signal(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise B.Interrupted()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        results = run(B.Bench(args), args.rows)
    except (KeyboardInterrupt, B.Interrupted):
        B.log("interrupted: cleaned up")
        return 130
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
