"""gelf-mirror end to end with filters and response comparison (issue 9, acceptance 6), on
loopback, ports 18400-18499: a recording made here with events.py (the clients' requests and
production's answers, direction 1) is replayed with --replay to a staging server run by the test,
which answers 500 on one path and 200 elsewhere. /stats, /metrics and `gelf-mirror report` must
name exactly that path, with the match rate the test works out from what it sent; --allow-path,
--method and --sample must change what the staging server receives, as the test predicts.

Every wait is bounded and generous; nothing here measures speed."""

import hashlib
import io
import json
import signal
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gelf.mirror import events, pipeline
from gelf.mirror.compare import Comparer
from gelf.mirror.dispatch import Dispatcher
from gelf.mirror.events import TO_CLIENT, TO_SERVER, Event, Kind
from helpers import PYTHON, REPO, LogPump
from mirror_helpers import port_in, wait_for

LOW, HIGH = 18400, 18499
BROKEN = "/broken"
PROD_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Staging:
    """A keep-alive HTTP/1.1 server: 500 (body `no`) on BROKEN, 200 (body `ok`) elsewhere; it
    keeps every (method, path, body) it was sent, in arrival order."""

    def __init__(self, port):
        received, lock = [], threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with lock:
                    received.append((self.command, self.path, body))
                status, text = (500, b"no") if self.path.split("?")[0] == BROKEN else (200, b"ok")
                self.send_response(status)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            do_GET = do_POST = do_PUT = answer

            def log_message(self, *args):
                pass

        self.received, self.lock = received, lock
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = port
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.1,), daemon=True)
        self.thread.start()

    def got(self):
        with self.lock:
            return list(self.received)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def request(method, path, body=b""):
    head = "%s %s HTTP/1.1\r\nHost: prod\r\n" % (method, path)
    if body:
        head += "Content-Length: %d\r\n" % len(body)
    return head.encode() + b"\r\n" + body


def client_port(conn):
    return 41000 + conn


def write_recording(path, exchanges, hold=None):
    """One connection per (method, path, body): OPEN, the request, production's 200 `ok` as a
    direction-1 event, CLOSE fin; 10 ms apart. `hold` seconds after the last, one more event (a
    CLOSE for a connection never opened, which nothing replays) keeps the replay running."""
    t = 1_700_000_000.0
    with open(path, "wb") as handle:
        events.write_header(handle)
        for conn, (method, target, body) in enumerate(exchanges, 1):
            evs = [events.open_event(conn, t, 4, ("192.0.2.7", client_port(conn)), ("192.0.2.80", 80)),
                   Event(Kind.DATA, conn, t + 0.001, TO_SERVER, request(method, target, body)),
                   Event(Kind.DATA, conn, t + 0.002, TO_CLIENT, PROD_ANSWER),
                   events.close_event(conn, t + 0.003, "fin")]
            handle.write(events.encode_all(evs))
            t += 0.01
        if hold:
            handle.write(events.encode(events.close_event(10 ** 6, t + hold, "fin")))


def start(*args):
    proc = subprocess.Popen([PYTHON, "-m", "gelf.mirror.cli", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proc.pump = LogPump(proc.stdout)
    return proc


def run(*args, timeout=90):
    try:
        return subprocess.run([PYTHON, "-m", "gelf.mirror.cli", *map(str, args)], cwd=REPO, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail("gelf-mirror %s did not exit within %ss:\n%s%s" % (args, timeout, err.stdout, err.stderr))


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def get(url):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read().decode()


PATHS = ["/a", "/b", BROKEN, "/c?x=1", BROKEN + "?y=2", "/d", "/e", "/f", "/g", "/h"]  # 2 of 10 fail


def check_comparison(base, upstream, tmp_path):
    """/stats, /metrics and `gelf-mirror report` (URL and saved file) at `base` (http://host:port)."""
    def paired():
        doc = json.loads(get(base + "/stats"))
        row = doc["compare"]["upstreams"].get(upstream)
        return row and row["paired"] == len(PATHS) and doc
    doc = wait_for(paired, 60, what="every request paired at " + base)
    row = doc["compare"]["upstreams"][upstream]
    assert list(doc["compare"]["upstreams"]) == [upstream]
    assert (row["requests"], row["responses"], row["unpaired"]) == (10, 10, 0)
    assert (row["status_match"], row["body_match"]) == (8, 8)
    assert row["status_match_rate"] == pytest.approx(0.8) and row["body_match_rate"] == pytest.approx(0.8)
    assert row["headers_match_rate"] == pytest.approx(1.0)  # Date and Server are ignored by default
    assert row["top_mismatches"] == [{"method": "GET", "path": BROKEN, "count": 2}]  # query left out
    assert (doc["compare"]["requests"], doc["compare"]["responses"]) == (10, 10)
    assert "filters" in doc

    metrics = get(base + "/metrics")
    label = 'upstream="%s"' % upstream
    assert 'gelf_mirror_match_ratio{part="status",%s} 0.8' % label in metrics, metrics
    assert 'gelf_mirror_upstream_paired_total{%s} 10.0' % label in metrics, metrics
    assert 'gelf_mirror_mismatches{method="GET",path="%s",%s} 2.0' % (BROKEN, label) in metrics, metrics

    for source in (base + "/stats", tmp_path / "saved.json"):
        if source != base + "/stats":
            source.write_text(json.dumps(doc))
        res = run("report", source)
        assert res.returncode == 0, res.stderr
        assert "upstream %s:" % upstream in res.stdout, res.stdout
        assert "status match 80.0% (8/10), body match 80.0% (8/10)" in res.stdout, res.stdout
        assert "     2  GET %s" % BROKEN in res.stdout, res.stdout
        assert "production: 10 requests, 10 responses" in res.stdout, res.stdout


def test_replay_compares_staging_with_production(tmp_path):
    """Acceptance 6 through the command: --replay, --stats, /stats, /metrics, report."""
    staging = Staging(port_in(LOW, HIGH))
    stats_port = port_in(LOW, HIGH)
    recording = tmp_path / "prod.gelfmir"
    write_recording(recording, [("GET", p, b"") for p in PATHS], hold=300)
    upstream = "tcp://127.0.0.1:%d" % staging.port
    proc = start("--replay", recording, "-u", upstream, "--stats", "127.0.0.1:%d" % stats_port, "-v")
    try:
        assert proc.pump.wait_line("serving http://127.0.0.1:%d/stats" % stats_port, 30), proc.pump.text()
        check_comparison("http://127.0.0.1:%d" % stats_port, upstream, tmp_path)
        assert sorted(p for _, p, _ in staging.got()) == sorted(PATHS)
    finally:
        stop(proc)
        staging.stop()
    assert proc.returncode == 0, proc.pump.text()
    text = proc.pump.text()
    assert "\x1b[K" not in text, "the progress line is for a terminal only"
    assert "status match 80.0% (8/10)" in text  # -v: the report in the log at the end


def test_relay_compares_with_production_answers_from_the_stream(tmp_path):
    """A relay with a plain-server upstream compares too: production's answers reach it as
    direction-1 events through the stream; its own port serves /stats and /metrics."""
    staging = Staging(port_in(LOW, HIGH))
    relay_port = port_in(LOW, HIGH)
    recording = tmp_path / "prod.gelfmir"
    write_recording(recording, [("GET", p, b"") for p in PATHS])
    upstream = "tcp://127.0.0.1:%d" % staging.port
    stats_port = port_in(relay_port + 1, HIGH)  # the relay's port is not bound yet: another one
    relay = start("-r", "-p", relay_port, "-u", upstream, "--stats", "127.0.0.1:%d" % stats_port)
    try:
        assert relay.pump.wait_line("relay listening", 30), relay.pump.text()
        res = run("--replay", recording, "-u", "relay://127.0.0.1:%d" % relay_port, "--no-compare")
        assert res.returncode == 0, res.stderr
        check_comparison("http://127.0.0.1:%d" % relay_port, upstream, tmp_path)
        extra = json.loads(get("http://127.0.0.1:%d/stats" % stats_port))  # --stats on a relay: the same
        assert extra["compare"]["upstreams"][upstream]["paired"] == len(PATHS)
        assert extra["filters"] == {} and extra["outputs"][0]["name"] == upstream
    finally:
        stop(relay)
        staging.stop()
    assert relay.returncode == 0, relay.pump.text()


def replay_to_staging(tmp_path, exchanges, *flags):
    staging = Staging(port_in(LOW, HIGH))
    recording = tmp_path / "filters.gelfmir"
    write_recording(recording, exchanges)
    try:
        res = run("--replay", recording, "-u", "tcp://127.0.0.1:%d" % staging.port, *flags)
        assert res.returncode == 0, res.stderr
        time.sleep(0.5)  # the last answers have been read (the replay lingers for them): nothing more comes
        return staging.got()
    finally:
        staging.stop()


MIXED = [("GET", "/api/1", b""), ("POST", "/api/2", b"x" * 3000), ("GET", "/static/app.js", b""),
         ("GET", "/api/3?q=1", b""), ("PUT", "/api/4", b"put"), ("GET", "/health", b""),
         ("POST", "/login", b"user=a"), ("GET", "/api/5", b"")]


def test_allow_path_and_method_change_what_staging_receives(tmp_path):
    everything = replay_to_staging(tmp_path, MIXED, "--no-compare")
    assert sorted(everything) == sorted(MIXED)
    got = replay_to_staging(tmp_path, MIXED, "--allow-path", "^/api/", "--method", "GET,put")
    assert sorted(got) == sorted(e for e in MIXED if e[1].startswith("/api/") and e[0] in ("GET", "PUT"))
    got = replay_to_staging(tmp_path, MIXED, "--deny-path", r"^/(health|login)\b")
    assert sorted(got) == sorted(e for e in MIXED if e[1] not in ("/health", "/login"))


def test_sample_keeps_the_connections_its_hash_chooses(tmp_path):
    """--sample 50: the oracle is BLAKE2b of the 4-tuple worked out here (docs/mirror.md, Filters)."""
    exchanges = [("GET", "/s/%d" % i, b"") for i in range(40)]

    def chosen(conn):
        key = ("192.0.2.7 %d 192.0.2.80 80" % client_port(conn)).encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") < 2 ** 63
    expected = sorted(path for conn, (_, path, _) in enumerate(exchanges, 1) if chosen(conn))
    assert 0 < len(expected) < len(exchanges)
    got = replay_to_staging(tmp_path, exchanges, "--sample", "50")
    assert sorted(p for _, p, _ in got) == expected


def test_ticker_draws_the_progress_line_and_expires():
    """The progress line goes to the screen it is given (cli gives stderr only on a TTY), redrawn
    in place; the Comparer's expire runs on the tick."""
    comparer = Comparer(linger=0.0)
    pipe = pipeline.Pipeline(None, comparer).use(Dispatcher([]))
    pipe.dispatch(events.open_event(1, time.time(), 4, ("192.0.2.7", 1), ("192.0.2.80", 80)))
    pipe.dispatch(Event(Kind.DATA, 1, time.time(), TO_SERVER, request("GET", "/x")))
    pipe.dispatch(events.close_event(1, time.time(), "fin"))
    screen = io.StringIO()
    ticker = pipeline.Ticker(pipe, screen, tick=0.05)
    ticker.start()
    try:
        wait_for(lambda: screen.getvalue().count("\r\x1b[K") >= 2, 20, what="two redraws")
        wait_for(lambda: pipe.compare_snapshot()["conns"] == 0, 20, what="the closed connection expired")
    finally:
        ticker.stop()
    assert "req 1 | prod p99" in screen.getvalue()
    assert screen.getvalue().endswith("\r\x1b[K")  # the line is wiped at the end


def test_pipeline_order_filters_then_comparer_then_outputs():
    """A request cut by the filter never reaches the Comparer or an output; a kept one reaches
    the Comparer before the output is offered it."""
    seen = []
    comparer = Comparer()

    class Recorder:
        name = "rec"

        def offer(self, event):
            seen.append((event.kind, bytes(event.data), comparer.snapshot()["requests"]))
            return True

        def stats(self):
            return {}

    pipe = pipeline.Pipeline(pipeline.build_filters(allow=["^/keep"]), comparer).use(Dispatcher([Recorder()]))
    now = time.time()
    pipe.dispatch(events.open_event(7, now, 4, ("192.0.2.7", 1), ("192.0.2.80", 80)))
    pipe.dispatch(Event(Kind.DATA, 7, now, TO_SERVER, request("GET", "/drop") + request("GET", "/keep")))
    kinds = [(k, d) for k, d, _ in seen]
    assert kinds[0][0] == Kind.OPEN and kinds[1] == (Kind.DATA, request("GET", "/keep"))
    assert seen[1][2] == 1  # the Comparer had counted the kept request before the output saw it
    assert pipe.document()["filters"]["http"]["allow"] == 1
