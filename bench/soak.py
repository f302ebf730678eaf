#!/usr/bin/env python3
"""gelf soak (`make soak`): 10 minutes of traffic through a page and a direct link, with churn.

Run as root from the checkout: `python bench/soak.py [--minutes N] [--no-write]`.

Topology (bench/wan.py's, with a third server): gelf servers in namespaces A, B and C
(10.92.0.1-.3 on their taps, with one key), and in P a headless Chromium on A's page with
?peer=B and a headless relay (`gelf relay`) between B and C; C dials A (--connect). The three
links make a triangle, so every server keeps a path to the others while one link churns. The
path emulator delays every path by 5 ms each way (on the links towards the servers). For the whole run, iperf3 --bidir runs A↔B and
A↔C (each direction capped at --rate, so the soak stays a soak and not a CPU race), while the
page is reloaded (DevTools protocol, Page.reload) every 30 s and the relay is stopped and
started again every 30 s, 15 s after each reload.

Every 10 s it samples each server's RSS (VmRSS) and its links in /stats. At the end it checks:
  RSS flat       each server's largest RSS in the last minute ≤ 1.2 × in the first minute
  no link leak   once the churn has stopped and 10 s have passed, /stats lists exactly the
                 links that exist (A: page and C; B: page and relay; C: A and relay), all open
  no errors      no line in the gelf servers' or relays' logs says error, exception,
                 traceback or warning
Output: a Markdown section on stdout and in bench/soak.md; logs in bench/tmp/.
"""

import argparse
import collections
import json
import os
import re
import select
import statistics
import sys
import time

import bench
from bench import LOGS, PYTHON, REPO, Interrupted, RowFailed, Scope, log
from wan import TUNNEL, UNDERLAY, Wan, gelf_url, ns_stats, page_url, start_gelf, wait_exit

RESULTS = bench.BENCH / "soak.md"
KEY = bench.KEY
PERIOD = 30.0  # seconds between page reloads, and between relay restarts
SAMPLE = 10.0  # seconds between samples
LINK = {"delay": 0.005}
EXPECTED = {"a": {"browser": 1, "direct": 1}, "b": {"browser": 1, "relay": 1}, "c": {"direct": 1, "relay": 1}}
ERROR_LINE = re.compile(r"error|exception|traceback|warning", re.I)


class DevTools:
    """The DevTools protocol over Chromium's pipes: one command at a time, answers by id."""

    def __init__(self, send_fd, answer_fd):
        self.send_fd, self.answer_fd = send_fd, answer_fd
        self.ids = 0
        self.buf = b""
        self.session = None

    def call(self, method, params=None, session=None, timeout=10):
        self.ids += 1
        msg = {"id": self.ids, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.send_fd, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self.ids:
                    if "error" in answer:
                        raise RowFailed("DevTools %s: %s" % (method, answer["error"]))
                    return answer.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.answer_fd], [], [], left)[0]:
                raise RowFailed("DevTools %s: no answer in %ss" % (method, timeout))
            data = os.read(self.answer_fd, 1 << 16)
            if not data:
                raise RowFailed("DevTools %s: Chromium closed its pipe" % method)
            self.buf += data

    def reload(self):
        if self.session is None:
            pages = [t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"]
            if not pages:
                raise RowFailed("DevTools: no page target")
            self.session = self.call("Target.attachToTarget",
                                     {"targetId": pages[0]["targetId"], "flatten": True})["sessionId"]
        self.call("Page.reload", session=self.session)


def rss_mb(pid):
    return bench.status_mb(pid, "VmRSS")


class Soak:
    def __init__(self, args):
        self.args = args
        self.samples = []  # (seconds since start, {host: rss MB}, {host: [links]})
        self.counts = {"reloads": 0, "relay restarts": 0}
        self.problems = []

    def run(self):
        self.load = [os.getloadavg()[0]]
        started = time.monotonic()
        topo = Scope()
        pipes = []
        try:
            wan = Wan(topo, ("a", "b", "c", "p"), self.args.cc)
            wan.shape(LINK)
            ns = wan.ns
            servers = {"a": start_gelf(topo, wan, "a", ["--key", KEY])}
            servers["b"] = start_gelf(topo, wan, "b", ["--key", KEY])
            servers["c"] = start_gelf(topo, wan, "c", ["--key", KEY, "--connect", gelf_url("a")])
            cmd_r, cmd_w = os.pipe()
            ans_r, ans_w = os.pipe()
            pipes += [cmd_w, ans_r]
            page = bench.start_chromium(topo, "chromium-p", page_url("a", ["b"]), netns=ns["p"],
                                        devtools=(cmd_r, ans_w))
            os.close(cmd_r)
            os.close(ans_w)
            devtools = DevTools(cmd_w, ans_r)
            relays = [self.start_relay(topo, ns["p"], 1)]
            self.servers = servers
            for h, kinds in EXPECTED.items():
                for kind in kinds:
                    bench.wait_links((ns[h], UNDERLAY[h]), kind, 40, needs=list(servers.values()) + [page],
                                     stats=ns_stats)
            for h in ("b", "c"):
                bench.wait_ping(ns["a"], TUNNEL[h], 30)
            seconds = int(self.args.minutes * 60)
            iperfs = [self.start_iperf(topo, ns["a"], ns[h], TUNNEL[h], seconds) for h in ("b", "c")]
            t0 = time.monotonic()
            next_sample, next_reload, next_restart = t0, t0 + PERIOD, t0 + PERIOD / 2
            while time.monotonic() - t0 < seconds:
                now = time.monotonic()
                if now >= next_sample:
                    self.sample(now - t0, wan)
                    next_sample += SAMPLE
                if now >= next_reload:
                    devtools.reload()
                    self.counts["reloads"] += 1
                    next_reload += PERIOD
                if now >= next_restart:
                    relays[-1].stop()
                    topo.procs.remove(relays[-1])
                    relays.append(self.start_relay(topo, ns["p"], len(relays) + 1))
                    self.counts["relay restarts"] += 1
                    next_restart += PERIOD
                for proc in list(servers.values()) + [page]:
                    if not proc.alive():
                        raise RowFailed("%s exited: %s" % (proc.name, proc.tail()))
                time.sleep(max(0.05, min(next_sample, next_reload, next_restart) - time.monotonic()))
            self.iperf = {}
            for h, proc in zip(("b", "c"), iperfs):
                wait_exit(proc, 30)
                self.iperf[h] = self.iperf_result(proc)
            time.sleep(10)  # the last relay has been up 15 s, the page 30 s: every link is back
            self.final = {h: ns_stats((ns[h], UNDERLAY[h]))["links"] for h in servers}
            self.logs = {p.name: p.text() for p in list(servers.values()) + relays}
        finally:
            for fd in pipes:
                os.close(fd)
            topo.close()
        self.load.append(os.getloadavg()[0])
        return time.monotonic() - started

    def start_relay(self, scope, ns, n):
        return scope.start("relay-%d" % n, ["ip", "netns", "exec", ns, PYTHON, "gelf.py", "relay",
                                            gelf_url("b"), gelf_url("c")], cwd=REPO)

    def start_iperf(self, scope, ns_client, ns_server, addr, seconds):
        bench.iperf_server(scope, ns_server, addr)
        return scope.start("iperf3-%s" % addr, ["ip", "netns", "exec", ns_client, "iperf3", "-c", addr,
                                                "-p", str(bench.IPERF_PORT), "--bidir", "-b", self.args.rate,
                                                "-t", str(seconds), "-J", "--connect-timeout", "5000"])

    @staticmethod
    def iperf_result(proc):
        try:
            end = json.loads(proc.text())["end"]
            return {"there": end["sum_received"]["bits_per_second"] / 1e6,
                    "back": end["sum_received_bidir_reverse"]["bits_per_second"] / 1e6}
        except (ValueError, KeyError) as err:
            return {"failed": "%s: %s" % (type(err).__name__, proc.tail(2) or err)}

    def sample(self, t, wan):
        rss, links = {}, {}
        for h, proc in self.servers.items():
            rss[h] = rss_mb(proc.pid)
            try:
                links[h] = ns_stats((wan.ns[h], UNDERLAY[h]))["links"]
            except (OSError, ValueError) as err:
                links[h] = None
                self.problems.append("/stats of %s at %.0f s: %s" % (h, t, err))
        self.samples.append((t, rss, links, os.getloadavg()[0]))

    # -- the figures

    def report(self, elapsed):
        minutes = {}
        for t, rss, links, load in self.samples:
            minutes.setdefault(int(t // 60), []).append((rss, links, load))
        hosts = sorted(self.servers)
        out = ["# gelf soak", ""] + bench.header(False, elapsed, self.load)
        out += ["- %g minutes; page reloads: %d, relay restarts: %d; iperf3 --bidir A↔B and A↔C at %s "
                "per direction; congestion control %s" % (self.args.minutes, self.counts["reloads"],
                                                          self.counts["relay restarts"], self.args.rate,
                                                          self.args.cc), "",
                "| minute | RSS MB, largest (A / B / C) | links in /stats, most (A / B / C) | load avg |",
                "|--:|--:|--:|--:|"]
        for m in sorted(minutes):
            rows = minutes[m]
            out.append("| %d | %s | %s | %.2f |" % (m + 1, " / ".join(
                "%.1f" % max(r[0][h] for r in rows) for h in hosts), " / ".join(
                "%d" % max(len(r[1][h] or ()) for r in rows) for h in hosts),
                statistics.mean(r[2] for r in rows)))
        checks = []
        first, last = minutes[min(minutes)], minutes[max(minutes)]
        for h in hosts:
            a, b = max(r[0][h] for r in first), max(r[0][h] for r in last)
            checks.append(("RSS of %s flat: %.1f → %.1f MB (× %.2f)" % (h.upper(), a, b, b / a), b <= a * 1.2))
        for h in hosts:
            links = self.final[h]
            kinds = dict(collections.Counter(link.get("kind") for link in links))
            opened = all(l.get("state") == "open" for l in links)
            checks.append(("links of %s at the end: %s" % (h.upper(), ", ".join(
                "%s %d" % kv for kv in sorted(kinds.items())) or "none"), kinds == EXPECTED[h] and opened))
        errors = [(name, line) for name, text in self.logs.items() for line in text.splitlines()
                  if ERROR_LINE.search(line)]
        checks.append(("error lines in %d logs: %d" % (len(self.logs), len(errors)), not errors))
        for h, r in sorted(self.iperf.items()):
            checks.append(("iperf3 A↔%s: %s" % (h.upper(), r["failed"] if "failed" in r else
                                                "%.1f Mbit/s there, %.1f back" % (r["there"], r["back"])),
                           "failed" not in r))
        for problem in self.problems:
            checks.append((problem, False))
        out += ["", "Checks:", ""] + ["- %s: %s" % ("ok" if ok else "FAILED", text) for text, ok in checks]
        out += ["- %s: %s" % (name, line[:200]) for name, line in errors[:10]]
        out.append("")
        self.ok = all(ok for _, ok in checks)
        return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="how long (default: %(default)s)")
    parser.add_argument("--rate", default="10M", help="iperf3 rate per direction (default: %(default)s)")
    parser.add_argument("--cc", default="cubic", choices=["cubic", "bbr", "reno"],
                        help="TCP congestion control (default: %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="do not write %s" % RESULTS)
    args = parser.parse_args(argv)
    problems = bench.preflight(["wan"])
    if problems:
        for p in problems:
            print("soak: error: " + p, file=sys.stderr)
        return 1
    LOGS.mkdir(parents=True, exist_ok=True)
    bench.install_signal_handlers()
    soak = Soak(args)
    try:
        elapsed = soak.run()
    except (KeyboardInterrupt, Interrupted):
        log("interrupted: cleaned up")
        return 130
    except RowFailed as err:
        print("soak: failed: %s" % err, file=sys.stderr)
        return 1
    text = soak.report(elapsed)
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
        log("wrote %s (logs in %s)" % (RESULTS.relative_to(REPO), LOGS.relative_to(REPO)))
    return 0 if soak.ok else 1


if __name__ == "__main__":
    sys.exit(main())
