"""End-to-end harness for gelf-mirror (issue 9): namespaces, servers, load, and the mirror itself.

Everything is driven through the command line (`gelf-mirror ...`), so the acceptance tests in
test_mirror_e2e.py exercise what a user runs, not the modules behind it.

Topology (Topology): namespaces prod, stg1, stg2, relay and cli, named `me2e<pid>...`, each with
one veth to a bridge in a sixth namespace (br), all on 10.83.0.0/24 and fd83::/64:

    prod  .1 (and .11)   stg1 .2   stg2 .3   relay .4 (and .14)   cli .5

With `impair=...`, cli is joined to the bridge through bench/wanem.py (a userspace path emulator)
instead of a veth, because this machine's kernel has no sch_netem (`tc qdisc add ... netem` says
"Specified qdisc kind is unknown"). wanem lacks netem's `duplicate`; WANEM_RUNNER adds it.

Servers: production is nginx from Debian when installed (its own config in a temp dir), else
this file's Python server; staging servers (this file run as a script, `staging`) record every
request they receive as one JSON line (method, path, body SHA-256, arrival order, connection),
and can answer 500 on one path or stall (accept, never read); a dead one is a stopped one.
The load generator (`load`) makes HTTP/1.1 requests with raw sockets: GETs, POSTs with bodies up
to 1 MiB, keep-alive and pipelined, chunked, and logs what it sent: the oracle the tests compare
the staging servers' records with.

Rules kept here: traffic only inside these namespaces; every wait bounded; every namespace and
process removed on close(), also after a failure (processes by PID).
"""

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHON = sys.executable
CLI = REPO / "gelf" / "mirror" / "cli.py"

NET4, NET6 = "10.83.0.", "fd83::"
HOSTS = {"prod": 1, "stg1": 2, "stg2": 3, "relay": 4, "cli": 5}
EXTRA = {"prod": 11, "relay": 14}  # second addresses (--bind tests)
STAGING_PORT = 18320
RELAY_PORT = 18310
STANDIN_PORT = 18330
HTTP_PORT = 80
PROBE_AGENT = re.compile(r"gelf-mirror/\S+ probe")  # the upstream probe (m-out's upstreams.py)
# Lines gelf-mirror prints when it is ready (m-out's cli.py); readiness is also checked by traffic.
READY_CAPTURE = r"capturing connections to port"
READY_RELAY = r"relay listening"
_topologies = itertools.count(1)


def v4(host, extra=False):
    return NET4 + str((EXTRA if extra else HOSTS)[host])


def v6(host, extra=False):
    return NET6 + str((EXTRA if extra else HOSTS)[host])


def hostport(addr, port):
    return "[%s]:%d" % (addr, port) if ":" in addr else "%s:%d" % (addr, port)


def sh(cmd, check=True, timeout=60, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise RuntimeError("%s -> %d\n%s%s" % (" ".join(map(str, cmd)), res.returncode, res.stdout, res.stderr))
    return res


def wait_for(pred, timeout, interval=0.1, what="condition"):
    """Poll pred() until truthy; return it, or raise TimeoutError saying what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        val = pred()
        if val:
            return val
        if time.monotonic() >= deadline:
            raise TimeoutError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


class LogPump:
    """Drains a process's output into memory, so its pipe never fills."""

    def __init__(self, stream):
        self.lines = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream):
        for raw in iter(stream.readline, b""):
            with self.cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self.cond.notify_all()
        stream.close()

    def wait_line(self, pattern, timeout, alive=lambda: True):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (not alive() and not self.thread.is_alive()):
                    return None
                self.cond.wait(min(left, 0.2))

    def text(self):
        with self.cond:
            return "\n".join(self.lines)


class Proc:
    """A background process (`ip netns exec NS ...` execs, so its PID is the program itself);
    output drained; stopped by PID: SIGTERM, then SIGKILL."""

    def __init__(self, name, cmd, cwd=REPO):
        self.name = name
        self.cmd = [str(c) for c in cmd]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, cwd=cwd, env=env)
        self.pid = self.p.pid
        self.log = LogPump(self.p.stdout)
        self.started = time.monotonic()

    def alive(self):
        return self.p.poll() is None

    def wait_line(self, pattern, timeout):
        return self.log.wait_line(pattern, timeout, alive=self.alive)

    def text(self):
        return self.log.text()

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Signal it and wait; SIGKILL if it does not exit. Returns the exit code."""
        if self.p.poll() is None:
            try:
                self.p.send_signal(sig)
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        self.log.thread.join(5)
        return self.p.returncode

    def rss_mb(self, field="VmRSS"):
        """Resident memory (VmRSS, or VmHWM: the peak) of the live process, in MB."""
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no %s for pid %d" % (field, self.pid))


# ---------------------------------------------------------------- the topology

class Topology:
    """The namespaces of the harness and everything started in them; close() removes it all."""

    def __init__(self, tmp, impair=None):
        self.tmp = Path(tmp)
        self.n = "%d%d" % (os.getpid() % 100000, next(_topologies))
        self.ns = {}
        self.procs = []
        self.dirs = []
        self.wanem = None
        self.control = None
        try:
            self._build(impair)
        except BaseException:
            self.close()
            raise

    def name(self, role):
        return "me2e%s%s" % (self.n, role)

    def _add_ns(self, role):
        ns = self.name(role)
        sh(["ip", "netns", "add", ns])
        self.ns[role] = ns
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def _build(self, impair):
        br = self._add_ns("br")
        sh(["ip", "-n", br, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "mcast_snooping", "0"])
        sh(["ip", "-n", br, "link", "set", "br0", "up"])
        for role in HOSTS:
            ns = self._add_ns(role)
            dev = "me2e%s%s" % (self.n, role[0] + role[-1])
            if role == "cli" and impair is not None:
                self._wanem(impair, ns, dev)
            else:
                sh(["ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", dev + "b", "netns", br])
                sh(["ip", "-n", br, "link", "set", dev + "b", "master", "br0"])
                sh(["ip", "-n", br, "link", "set", dev + "b", "up"])
            addrs = [(v4(role), 24), (v6(role), 64)]
            if role in EXTRA:
                addrs += [(v4(role, True), 24), (v6(role, True), 64)]
            for addr, plen in addrs:
                sh(["ip", "-n", ns, "addr", "add", "%s/%d" % (addr, plen), "dev", dev]
                   + (["nodad"] if ":" in addr else []))
            sh(["ip", "-n", ns, "link", "set", dev, "up"])
        for addr in (v4("prod"), v6("prod")):
            wait_for(lambda: self.reachable("cli", addr), 60, 0.3, "cli to reach %s" % addr)

    def _wanem(self, impair, ns, dev):
        """cli's link to the bridge through bench/wanem.py, run inside br (its taps are made there)."""
        self.control = str(self.tmp / ("wanem-%s.sock" % self.n))
        side = dev[:-1] + "w"  # the bridge's end
        dup = impair.get("duplicate", 0)
        props = {k: v for k, v in impair.items() if k != "duplicate"}
        self.wanem = self.start("wanem", ["ip", "netns", "exec", self.ns["br"], PYTHON, "-c", WANEM_RUNNER,
                                          str(REPO / "bench"), str(dup), self.control, "c=" + dev, "b=" + side])
        if not self.wanem.wait_line(r"^ready$", 30):
            raise RuntimeError("wanem did not start:\n" + self.wanem.text())
        sh(["ip", "-n", self.ns["br"], "link", "set", dev, "netns", ns])
        sh(["ip", "-n", self.ns["br"], "link", "set", side, "master", "br0"])
        sh(["ip", "-n", self.ns["br"], "link", "set", side, "up"])
        self.wanem_control({"set": {"c": props, "b": props}})

    def wanem_control(self, request):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.control)
            s.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(s.makefile().readline() or "{}")
        if not reply.get("ok"):
            raise RuntimeError("wanem: %s" % reply.get("error", "no answer"))
        return reply

    def reachable(self, role, addr, port=None):
        """One ICMP echo (or, with port, one TCP connect) from role's namespace answered."""
        if port is None:
            cmd = ["ping", "-6" if ":" in addr else "-4", "-n", "-c", "1", "-W", "2", addr]
        else:
            cmd = [PYTHON, "-c", "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)",
                   addr, str(port)]
        return sh(["ip", "netns", "exec", self.ns[role]] + cmd, check=False, timeout=30).returncode == 0

    def start(self, name, cmd, cwd=REPO):
        proc = Proc(name, cmd, cwd)
        self.procs.append(proc)
        return proc

    def tmpdir(self, prefix):
        d = tempfile.mkdtemp(prefix="me2e-%s-" % prefix, dir=self.tmp)
        self.dirs.append(d)
        return Path(d)

    def run_in(self, role, cmd, timeout=60, check=True):
        return sh(["ip", "netns", "exec", self.ns[role]] + [str(c) for c in cmd], check=check, timeout=timeout,
                  cwd=REPO)

    def listening(self, role):
        """(address, port) of every TCP listener in role's namespace."""
        out = self.run_in(role, ["ss", "-ltnH"]).stdout
        found = []
        for line in out.splitlines():
            local = line.split()[3]
            addr, _, port = local.rpartition(":")
            found.append((addr.strip("[]"), int(port)))
        return found

    def logs(self):
        """Every process's output, for a failing test's report."""
        return "\n".join("--- %s (pid %d, rc %s): %s\n%s" % (p.name, p.pid, p.p.returncode, " ".join(p.cmd[:12]),
                                                              p.text()[-6000:]) for p in self.procs)

    def close(self):
        for proc in reversed(self.procs):
            try:
                proc.stop(timeout=10)
            except (OSError, subprocess.SubprocessError) as err:  # keep cleaning
                print("me2e: could not stop %s (pid %d): %s" % (proc.name, proc.pid, err), file=sys.stderr)
        for ns in reversed(list(self.ns.values())):
            res = sh(["ip", "netns", "pids", ns], check=False)
            for pid in res.stdout.split():  # only what was started inside our own namespaces
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh(["ip", "netns", "del", ns], check=False)
        self.ns = {}
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)

    # -------------------------------------------------------------- servers

    def production(self, port=HTTP_PORT, prefer_nginx=True):
        """Production's web server in prod on every address: nginx if installed, else Python."""
        if prefer_nginx and shutil.which("nginx"):
            return Nginx(self, "prod", port)
        return Staging(self, "prod", port, name="prod-python")

    def staging(self, role, port=STAGING_PORT, **kw):
        return Staging(self, role, port, **kw)

    # -------------------------------------------------------------- the mirror

    def mirror(self, role, *args, name="gelf-mirror", ready=None, prog=None, timeout=60):
        """Start `gelf-mirror ARGS` (or `prog ARGS`) in role's namespace; wait for a line matching
        `ready` if given. The one way the tests start the mirror."""
        proc = self.start(name, ["ip", "netns", "exec", self.ns[role]] + list(prog or mirror_cmd()) + list(args))
        if ready and not proc.wait_line(ready, timeout):
            raise RuntimeError("%s did not start (rc %s):\n%s" % (name, proc.p.returncode, proc.text()))
        return proc

    def relay_stats(self, role, addr, port=RELAY_PORT):
        """A relay's /stats (JSON), read from inside its namespace."""
        out = self.run_in(role, [PYTHON, "-c", "import sys, urllib.request; sys.stdout.write(urllib.request."
                                 "urlopen(sys.argv[1], timeout=10).read().decode())",
                                 "http://%s/stats" % hostport(addr, port)], timeout=30).stdout
        return json.loads(out)

    # -------------------------------------------------------------- load

    def load(self, target, count, tag, role="cli", timeout=300, **opts):
        """Run the load generator from role to target (host:port); return its records (sent)."""
        out = self.tmp / ("load-%s-%s.jsonl" % (self.n, tag))
        cmd = [PYTHON, str(HERE / "mirror_harness.py"), "load", target, str(count), tag, str(out)]
        for key, val in opts.items():
            cmd += ["--" + key.replace("_", "-"), str(val)]
        res = self.run_in(role, cmd, timeout=timeout, check=False)
        records, summary = read_load(out)
        if res.returncode != 0 or summary is None:
            raise RuntimeError("load generator failed (rc %d):\n%s%s" % (res.returncode, res.stdout[-3000:],
                                                                       res.stderr[-3000:]))
        return records, summary

    def warm_up(self, target, stagings, timeout=60, tag="warm", copies=1):
        """Send small GETs to production until one of them has reached every staging server
        (`copies` times: through that many mirrors): the mirror is capturing and its upstreams are
        connected. Warm-up paths are /warm/...; comparisons skip them."""
        deadline = time.monotonic() + timeout
        k = 0

        def arrived(staging):
            counts = {}
            for r in staging.requests():
                if r["path"].startswith("/warm/%s" % tag):
                    path = r["path"].split("/")[2]
                    counts[path] = counts.get(path, 0) + 1
            return counts

        while True:
            k += 1
            self.load(target, 1, "%s%d" % (tag, k), path_prefix="/warm", timeout=60)
            seen = [arrived(s) for s in stagings]
            if any(all(c.get("%s%d" % (tag, j), 0) >= copies for c in seen) for j in range(1, k + 1)):
                return k
            if time.monotonic() > deadline:
                raise TimeoutError("warm-up: no request reached all of %s %d time(s) within %ss (arrived: %s)"
                                   % ([s.name for s in stagings], copies, timeout, seen))
            time.sleep(0.5)


def mirror_cmd():
    """The gelf-mirror command: the venv's console script (what users run), else the module."""
    script = Path(PYTHON).parent / "gelf-mirror"
    return [str(script)] if script.exists() else [PYTHON, "-m", "gelf.mirror.cli"]


def parse_report(text):
    """gelf-mirror's final line, `done: N connections, B bytes; NAME k=v k=v; NAME -` (m-out's
    cli.report), as {"conns", "bytes", "outputs": {name: {k: v}}}; None if it has none."""
    m = None
    for m in re.finditer(r"done: (\d+) connections, (\d+) bytes; (.*)$", text, re.M):
        pass
    if m is None:
        return None
    outputs = {}
    for part in m.group(3).split("; "):
        name, _, rest = part.strip().partition(" ")
        outputs[name] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)}
    return {"conns": int(m.group(1)), "bytes": int(m.group(2)), "outputs": outputs}


WANEM_RUNNER = r'''
import random, sys
sys.path.insert(0, sys.argv[1])
import wanem

DUP = float(sys.argv[2])


class DupSwitch(wanem.Switch):
    """netem's duplicate, which wanem lacks: a frame is offered to the links a second time (the
    copy is delayed, reordered or lost on its own, as netem's)."""

    duplicated = 0

    def receive(self, src, frame, now):
        super().receive(src, frame, now)
        if DUP and random.random() < DUP:
            self.duplicated += 1
            super().receive(src, frame, now)

    def control(self, request):
        reply = super().control(request)
        if request.get("stats"):
            reply["duplicated"] = self.duplicated
        return reply


wanem.Switch = DupSwitch
sys.exit(wanem.main(sys.argv[3:]))
'''


# ---------------------------------------------------------------- servers

NGINX_CONF = """
user root;
worker_processes %(workers)d;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log warn;
events { worker_connections 4096; }
http {
    access_log %(access)s;
    client_body_temp_path %(dir)s/body;
    client_max_body_size 4m;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {
        listen %(port)d reuseport;
        listen [::]:%(port)d ipv6only=on reuseport;
        location / { return 200 "ok\\n"; }
    }
}
"""


def nginx_config(directory, port, workers=1, access_log=True):
    """nginx.conf for a server answering 200 "ok" to everything on every address of its namespace
    (bodies read and discarded); the access log, one line per request, counts them."""
    access = "%s/access.log" % directory if access_log else "off"
    path = Path(directory) / "nginx.conf"
    path.write_text(NGINX_CONF % {"dir": directory, "port": port, "workers": workers, "access": access})
    return path


class Nginx:
    """nginx in a namespace, master in the foreground (daemon off) so it is stopped by its PID."""

    def __init__(self, topo, role, port, workers=1):
        self.role, self.port, self.name = role, port, "nginx-%s" % role
        self.dir = topo.tmpdir("nginx")
        conf = nginx_config(self.dir, port, workers)
        self.proc = topo.start(self.name, ["ip", "netns", "exec", topo.ns[role], "nginx", "-p", self.dir, "-c", conf,
                                           "-e", self.dir / "error.log", "-g", "daemon off;"])
        wait_for(lambda: not self.proc.alive() or topo.reachable(role, "127.0.0.1", port), 30, 0.2, "nginx")
        if not self.proc.alive():
            raise RuntimeError("nginx did not start:\n%s%s" % (self.proc.text(), _read(self.dir / "error.log")))

    def count(self):
        return len(_read(self.dir / "access.log").splitlines())


def _read(path):
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


class Staging:
    """A recording HTTP server (this file's `staging` role) in a namespace, on every address.

    mode: "ok" answers 200 (500 on fail_path); "stall" accepts and never reads. A dead upstream
    is a stopped one (stop()); start() again on the same record file is it coming back."""

    def __init__(self, topo, role, port, mode="ok", fail_path=None, name=None, record=None):
        self.topo, self.role, self.port = topo, role, port
        self.name = name or "staging-%s-%d" % (role, port)
        self.record = record or topo.tmpdir("rec") / "requests.jsonl"
        self.proc = None
        self.start(mode, fail_path)

    def start(self, mode="ok", fail_path=None):
        cmd = ["ip", "netns", "exec", self.topo.ns[self.role], PYTHON, str(HERE / "mirror_harness.py"), "staging",
               str(self.port), str(self.record), "--mode", mode]
        if fail_path:
            cmd += ["--fail-path", fail_path]
        self.proc = self.topo.start(self.name, cmd)
        if not self.proc.wait_line(r"^listening", 30):
            raise RuntimeError("%s did not start:\n%s" % (self.name, self.proc.text()))
        return self

    def stop(self):
        if self.proc is not None:
            self.proc.stop()

    def requests(self, probes=False):
        """Every request recorded so far (all runs of this server), in arrival order."""
        found = []
        for line in _read(self.record).splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if probes or not PROBE_AGENT.search(rec.get("agent", "")):
                found.append(rec)
        return found

    def tagged(self, tag):
        return [r for r in self.requests() if r["path"].startswith("/e2e/%s/" % tag)]


# ---------------------------------------------------------------- comparing what arrived

def key(rec):
    return (rec["method"], rec["path"], rec["sha"])


def compare(sent, got):
    """Problems (a list of strings, empty if none) between what the clients sent and what one
    server received: every request exactly once, identical method/path/body SHA-256, and each
    client connection's requests arriving on one connection, in order."""
    problems = []
    want = {key(r) for r in sent}
    seen = {}
    for r in got:
        seen[key(r)] = seen.get(key(r), 0) + 1
    missing = [k for k in want if k not in seen]
    twice = [k for k, n in seen.items() if n > 1]
    extra = [k for k in seen if k not in want]
    if missing:
        problems.append("%d of %d requests missing, e.g. %s" % (len(missing), len(want), sorted(missing)[:3]))
    if twice:
        problems.append("%d requests arrived more than once, e.g. %s" % (len(twice), twice[:3]))
    if extra:
        problems.append("%d requests arrived that no client sent like this (wrong body?), e.g. %s"
                        % (len(extra), extra[:3]))
    by_client, by_server = {}, {}
    for r in sent:
        by_client.setdefault(r["conn"], []).append(r["path"])
    for r in got:
        by_server.setdefault((r["run"], r["conn"]), []).append(r["path"])
    server_seqs = {tuple(v) for v in by_server.values()}
    split = [c for c, paths in by_client.items() if tuple(paths) not in server_seqs]
    if split and not missing:
        problems.append("%d client connections did not arrive as one connection in order, e.g. %s"
                        % (len(split), by_client[split[0]][:4]))
    return problems


def read_load(path):
    records, summary = [], None
    for line in _read(path).splitlines():
        rec = json.loads(line)
        if "summary" in rec:
            summary = rec["summary"]
        else:
            records.append(rec)
    return records, summary


# ================================================================ roles run inside namespaces

def listen_all(port, rcvbuf=None):
    """A listening socket on every IPv4 and IPv6 address of the namespace."""
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind(("::", port))
    s.listen(512)
    return s


class Reader:
    """Buffered reads from a socket: a head up to the blank line, exact lengths, chunked bodies."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def fill(self):
        data = self.sock.recv(262144)
        if not data:
            raise EOFError
        self.buf += data

    def head(self):
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > 65536:
                raise ValueError("head over 64 KiB")
            self.fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        return lines[0], fields

    def exact(self, n):
        while len(self.buf) < n:
            self.fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def line(self):
        while b"\r\n" not in self.buf:
            self.fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def body(self, fields, until_close=False):
        """The decoded body, as hash and length (never kept whole)."""
        h, n = hashlib.sha256(), 0
        if "chunked" in fields.get("transfer-encoding", "").lower():
            while True:
                size = int(self.line().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.line():  # trailer fields, then the blank line
                        pass
                    break
                chunk = self.exact(size)
                h.update(chunk)
                n += size
                self.exact(2)
        elif "content-length" in fields:
            left = int(fields["content-length"])
            while left:
                chunk = self.exact(min(left, 262144))
                h.update(chunk)
                n += len(chunk)
                left -= len(chunk)
        elif until_close:
            h.update(self.buf)
            n += len(self.buf)
            self.buf = b""
            while True:
                try:
                    self.fill()
                except EOFError:
                    break
                h.update(self.buf)
                n += len(self.buf)
                self.buf = b""
        return h.hexdigest(), n


def staging_main(args):
    """Record every request as one JSON line; answer 200 "ok" (500 on --fail-path), or stall."""
    lock = threading.Lock()
    seq = itertools.count(1)
    conns = itertools.count(1)
    out = open(args.record, "a", buffering=1)
    run = "%d-%d" % (os.getpid(), int(time.time()))
    held = []
    srv = listen_all(args.port, rcvbuf=4096 if args.mode == "stall" else None)
    print("listening %d %s" % (args.port, args.mode), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

    def serve(sock, peer, conn):
        reader = Reader(sock)
        index = 0
        try:
            while True:
                try:
                    request_line, fields = reader.head()
                except EOFError:
                    return
                method, target, version = (request_line.split(" ") + ["", ""])[:3]
                sha, n = reader.body(fields)
                index += 1
                rec = {"method": method, "path": target, "sha": sha, "len": n, "run": run, "conn": conn,
                       "i": index, "peer": peer, "agent": fields.get("user-agent", ""),
                       "chunked": "chunked" in fields.get("transfer-encoding", "").lower(), "t": time.time()}
                with lock:
                    rec["seq"] = next(seq)
                    out.write(json.dumps(rec) + "\n")
                fail = args.fail_path and target.split("?")[0] == args.fail_path
                body = b"fail\n" if fail else b"ok\n"
                close = fields.get("connection", "").lower() == "close" or version == "HTTP/1.0"
                sock.sendall(b"HTTP/1.1 %s\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n%s\r\n%s" % (
                    b"500 Internal Server Error" if fail else b"200 OK", len(body),
                    b"Connection: close\r\n" if close else b"", body))
                if close:
                    return
        except (OSError, EOFError, ValueError):
            return
        finally:
            sock.close()

    while True:
        sock, addr = srv.accept()
        if args.mode == "stall":
            held.append(sock)  # never read: the sender's window closes
            continue
        peer = hostport(addr[0].replace("::ffff:", ""), addr[1])
        threading.Thread(target=serve, args=(sock, peer, next(conns)), daemon=True).start()


def plan_connections(args):
    """The connections to make: [{mode, close, requests: [(method, chunked, size)]}], from the seed."""
    rng = random.Random(args.seed)
    conns, total = [], 0
    while total < args.count:
        n = min(args.count - total, rng.randint(1, args.per_conn))
        mode = "pipelined" if rng.random() < args.pipelined else "keepalive"
        reqs = []
        for _ in range(n):
            r = rng.random()
            if r < args.posts:
                chunked = rng.random() < args.chunked
                s = rng.random()
                if s < args.large and args.max_body > 131072:
                    size = rng.randint(131072, args.max_body)
                elif s < args.large + 0.3:
                    size = rng.randint(4096, min(131072, args.max_body))
                else:
                    size = rng.randint(0, min(4096, args.max_body))
                reqs.append(("POST", chunked, size))
            else:
                reqs.append(("GET", False, 0))
        conns.append({"mode": mode, "close": rng.random() < 0.5, "requests": reqs, "seed": rng.getrandbits(32)})
        total += n
    if args.posts and args.max_body >= 1 << 20:  # "bodies up to 1 MiB": one of exactly 1 MiB
        conns[0]["requests"][0] = ("POST", False, 1 << 20)
    return conns


def build_request(args, c, i, method, chunked, size, last, close, rng):
    path = "%s/%s/%d/%d?k=%d" % (args.path_prefix, args.tag, c, i, rng.getrandbits(20))
    body = rng.randbytes(size) if size else b""
    head = ["%s %s HTTP/1.1" % (method, path), "Host: %s" % args.target, "User-Agent: me2e-load"]
    if method == "POST":
        if chunked:
            head.append("Transfer-Encoding: chunked")
            parts, at = [], 0
            while at < len(body):
                n = rng.randint(1, 65536)
                parts.append(b"%x\r\n%s\r\n" % (len(body[at:at + n]), body[at:at + n]))
                at += n
            payload = b"".join(parts) + b"0\r\n\r\n"
        else:
            head.append("Content-Length: %d" % size)
            payload = body
    else:
        payload = b""
    if last and close:
        head.append("Connection: close")
    rec = {"method": method, "path": path, "sha": hashlib.sha256(body).hexdigest(), "len": size,
           "chunked": chunked}
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload, rec


def read_response(reader, method):
    line, fields = reader.head()
    status = int(line.split(" ")[1])
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return status, fields
    reader.body(fields, until_close=True)
    return status, fields


def connect(target, timeout=60):
    host, _, port = target.rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)


def load_main(args):
    """Make the planned requests; write one JSON line per request (what was sent, the answer)."""
    conns = plan_connections(args)
    out = open(args.out, "w", buffering=1)
    lock = threading.Lock()
    errors = []
    started = time.time()

    def emit(rec):
        with lock:
            out.write(json.dumps(rec) + "\n")

    def one(c, plan):
        rng = random.Random(plan["seed"])
        reqs = plan["requests"]
        built = [build_request(args, c, i, m, ch, sz, i == len(reqs) - 1, plan["close"], rng)
                 for i, (m, ch, sz) in enumerate(reqs)]
        try:
            sock = connect(args.target)
            reader = Reader(sock)
            if plan["mode"] == "pipelined":
                t0 = time.time()
                sender = threading.Thread(target=sock.sendall, args=(b"".join(b for b, _ in built),))
                sender.start()  # a thread: a big pipelined batch must not deadlock against the answers
                for data, rec in built:
                    status, _ = read_response(reader, rec["method"])
                    emit(dict(rec, conn=c, mode="pipelined", status=status, t_sent=t0, t_done=time.time()))
                sender.join(60)
            else:
                for data, rec in built:
                    t0 = time.time()
                    sock.sendall(data)
                    status, _ = read_response(reader, rec["method"])
                    emit(dict(rec, conn=c, mode="keepalive", status=status, t_sent=t0, t_done=time.time()))
            sock.close()
        except (OSError, EOFError, ValueError) as err:
            with lock:
                errors.append("conn %d: %s: %s" % (c, type(err).__name__, err))

    if args.interval:
        paced(args, conns, emit, errors)
    else:
        work = list(enumerate(conns))
        threads = []
        lock_work = threading.Lock()

        def worker():
            while True:
                with lock_work:
                    if not work:
                        return
                    c, plan = work.pop(0)
                one(c, plan)

        for _ in range(args.parallel):
            t = threading.Thread(target=worker, daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
    summary = {"requests": sum(len(p["requests"]) for p in conns), "conns": len(conns), "errors": errors,
               "seconds": time.time() - started}
    out.write(json.dumps({"summary": summary}) + "\n")
    out.close()
    print(json.dumps(summary), flush=True)
    return 1 if errors else 0


def paced(args, conns, emit, errors):
    """One request every --interval seconds, in one global order, over keep-alive connections
    kept open side by side (request k on connection k mod N): a recording with known timing."""
    socks = {}
    order = [(c, i) for c, plan in enumerate(conns) for i in range(len(plan["requests"]))]
    order.sort(key=lambda ci: (ci[1], ci[0]))  # round-robin over the connections
    rngs = {c: random.Random(plan["seed"]) for c, plan in enumerate(conns)}
    start = time.monotonic()
    for k, (c, i) in enumerate(order):
        plan = conns[c]
        m, ch, sz = plan["requests"][i]
        last = i == len(plan["requests"]) - 1
        data, rec = build_request(args, c, i, m, ch, sz, last, plan["close"], rngs[c])
        delay = start + k * args.interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            if c not in socks:
                socks[c] = Reader(connect(args.target))
            t0 = time.time()
            socks[c].sock.sendall(data)
            status, _ = read_response(socks[c], m)
            emit(dict(rec, conn=c, mode="paced", k=k, status=status, t_sent=t0, t_done=time.time()))
            if last:
                socks.pop(c).sock.close()
        except (OSError, EOFError, ValueError) as err:
            errors.append("conn %d: %s: %s" % (c, type(err).__name__, err))
    for reader in socks.values():
        reader.sock.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description="gelf-mirror e2e harness roles (run in namespaces)")
    sub = parser.add_subparsers(dest="role", required=True)
    st = sub.add_parser("staging", help="a recording HTTP/1.1 server")
    st.add_argument("port", type=int)
    st.add_argument("record")
    st.add_argument("--mode", choices=("ok", "stall"), default="ok")
    st.add_argument("--fail-path")
    ld = sub.add_parser("load", help="HTTP/1.1 load: GET, POST (chunked too), keep-alive and pipelined")
    ld.add_argument("target", help="host:port or [v6]:port")
    ld.add_argument("count", type=int)
    ld.add_argument("tag")
    ld.add_argument("out")
    ld.add_argument("--seed", type=int, default=1)
    ld.add_argument("--parallel", type=int, default=6)
    ld.add_argument("--per-conn", type=int, default=20)
    ld.add_argument("--pipelined", type=float, default=0.35, help="share of pipelined connections")
    ld.add_argument("--posts", type=float, default=0.35, help="share of POSTs")
    ld.add_argument("--chunked", type=float, default=0.4, help="share of POSTs sent chunked")
    ld.add_argument("--large", type=float, default=0.05, help="share of POSTs over 128 KiB")
    ld.add_argument("--max-body", type=int, default=1 << 20)
    ld.add_argument("--interval", type=float, default=0.0, help="paced: seconds between requests")
    ld.add_argument("--path-prefix", default="/e2e")
    args = parser.parse_args(argv)
    if args.role == "staging":
        return staging_main(args)
    return load_main(args)


if __name__ == "__main__":
    sys.exit(main())
