"""gelf-mirror's command line: Gopher's four example lines work as written (hosts and ports
replaced by test addresses, ports 18170-18199) and mean what Gopher means; every user mistake is
one `gelf-mirror: error:` line, exit status 1, no traceback, nothing created."""

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from gelf.mirror import checks, cli, events
from gelf.mirror.upstreams import Upstream
from helpers import PYTHON, REPO, LogPump
from mirror_helpers import Sink, connection, port_in, wait_for
from test_cli_errors import assert_user_error

LOW, HIGH = 18170, 18199
HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def mirror(*args, prefix=(), timeout=60):
    cmd = [*prefix, PYTHON, "-m", "gelf.mirror.cli", *map(str, args)]
    try:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail("%s did not exit within %ss; output:\n%s%s" % (cmd, timeout, err.stdout, err.stderr))


def plan(*args):
    return checks.check(cli.build_parser().parse_args([str(a) for a in args]))


def test_help_explains_every_flag():
    res = mirror("--help")
    assert res.returncode == 0, res.stderr
    for action in cli.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in res.stdout, "--help does not mention %s" % flag
        assert action.help, "%s has no help" % action.option_strings
    for word in ("relay", "plain server", "200%", "CAP_NET_RAW", "tcp://", "relay://"):
        assert word in res.stdout


def test_entry_points():
    script = Path(PYTHON).parent / "gelf-mirror"
    assert script.exists(), "gelf-mirror is not installed beside %s (make venv)" % PYTHON
    assert "--upstream" in subprocess.run([str(script), "--help"], capture_output=True, text=True).stdout
    res = subprocess.run([PYTHON, "gelf.py", "mirror", "--help"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and "gelf-mirror" in res.stdout and "--upstream" in res.stdout


# ---------------------------------------------------------------- Gopher's lines, as written

def test_gopher_line_1_capture_to_one_upstream():
    """machineA: gopher --mode=capture --port=80 --upstream=machineB:1080"""
    p = plan("--mode=capture", "--port=80", "--upstream=127.0.0.2:1080")
    assert (p.mode, p.port, p.bind) == ("capture", 80, None)
    assert p.upstreams == [Upstream("auto", "127.0.0.2", 1080)]  # relay or plain server: the probe says


def test_gopher_line_2_capture_to_three_upstreams():
    """machineA: gopher -c -p 80 -u machineB:3280 -u machineC:3280 -u machineD"""
    p = plan("-c", "-p", "80", "-u", "127.0.0.2:3280", "-u", "127.0.0.3:3280", "-u", "127.0.0.4")
    assert (p.mode, p.port) == ("capture", 80)
    assert p.upstreams == [Upstream("auto", "127.0.0.2", 3280), Upstream("auto", "127.0.0.3", 3280),
                           Upstream("auto", "127.0.0.4", 80)]  # machineD: a web server on port 80


def test_gopher_lines_3_and_4_relays_replay_to_their_upstream(tmp_path):
    """machineB: gopher -r -p 3280 -u localhost:80 / machineC: gopher -r -p 3280 -u machineA:1080,
    run for real, fed by line 2's capture (here --replay of a recording, with the same -u list)."""
    web_b, web_a, web_d = (Sink(port_in(LOW, HIGH), reply=HTTP_OK) for _ in range(3))
    port_b, port_c = port_in(LOW, HIGH), None
    procs = []
    try:
        def start(*args):
            proc = subprocess.Popen([PYTHON, "-m", "gelf.mirror.cli", *map(str, args)], cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            proc.pump = LogPump(proc.stdout)
            procs.append(proc)
            return proc

        relay_b = start("-r", "-p", port_b, "-u", "localhost:%d" % web_b.port)
        assert relay_b.pump.wait_line("relay listening", 30), relay_b.pump.text()
        port_c = port_in(LOW, HIGH)
        relay_c = start("-r", "-p", port_c, "-u", "127.0.0.1:%d" % web_a.port)
        assert relay_c.pump.wait_line("relay listening", 30), relay_c.pump.text()
        recording = tmp_path / "line2.gelfmir"
        with open(recording, "wb") as handle:
            events.write_header(handle)
            for i in range(3):
                handle.write(events.encode_all(connection([b"GET /gopher/%d HTTP/1.1\r\n\r\n" % i],
                                                          ts=100.0 + i * 0.01)[1]))
        capture = start("--replay", recording, "-u", "127.0.0.1:%d" % port_b, "-u", "127.0.0.1:%d" % port_c,
                        "-u", "127.0.0.1:%d" % web_d.port)
        assert capture.wait(60) == 0, capture.pump.text()
        wanted = sorted(b"GET /gopher/%d HTTP/1.1\r\n\r\n" % i for i in range(3))
        for web in (web_b, web_a, web_d):
            def got(web=web):
                streams = [s for s in web.snapshot()[0] if b" probe\r\n" not in s]
                return sorted(streams) == wanted and streams
            wait_for(got, 40, what="the requests at every web server")
        text = capture.pump.text()
        assert text.count("is a gelf-mirror relay") == 2 and text.count("is a plain server") == 1, text
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for web in (web_b, web_a, web_d):
            web.stop()


def test_upstream_forms():
    parse = lambda text: plan("-c", "-p", "80", "-u", text).upstreams[0]  # noqa: E731
    assert parse("[::1]:8080") == Upstream("auto", "::1", 8080)
    assert parse("::1") == Upstream("auto", "::1", 80)
    assert parse("tcp://127.0.0.1") == Upstream("tcp", "127.0.0.1", 80)
    assert parse("relay://127.0.0.1:3280") == Upstream("relay", "127.0.0.1", 3280)
    assert parse("wss://localhost:8443/ws") == Upstream("wss", "localhost", 8443)
    assert plan("-r", "-p", port_in(LOW, HIGH), "-u", "tcp://[::1]:80", "--bind", "::1").bind == "::1"


# ---------------------------------------------------------------- mistakes

def private_file(tmp_path, name, text, mode=0o600):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


MISTAKES = [
    (["-p", "80", "-u", "127.0.0.1"], "say what to do"),
    (["-c", "-r", "-p", "80", "-u", "127.0.0.1"], "one mode"),
    (["--mode=copy", "-p", "80"], "invalid choice"),
    (["-c", "-u", "127.0.0.1"], "needs -p"),
    (["-r", "-u", "127.0.0.1"], "needs -p"),
    (["-c", "-p", "70000", "-u", "127.0.0.1"], "port"),
    (["-c", "-p", "80"], "at least one upstream"),
    (["-c", "-p", "80", "-u", "ftp://127.0.0.1"], "unknown scheme"),
    (["-c", "-p", "80", "-u", "127.0.0.1:99999"], "valid port"),
    (["-c", "-p", "80", "-u", "[::1:80"], "IPv6"),
    (["-c", "-p", "80", "-u", "no-such-host.invalid"], "cannot resolve"),
    (["-c", "-p", "80", "-u", "127.0.0.1", "--bind", "not-an-ip"], "not an IPv4 or IPv6"),
    (["-c", "-p", "80", "-u", "127.0.0.1", "--bind", "192.0.2.99"], "not on this machine"),
    (["-c", "-p", "80", "-u", "127.0.0.1", "--key", "abc"], "32 or 64 hex"),
    (["-c", "-p", "80", "-u", "127.0.0.1", "--key", "00" * 16, "--key-file", "KEY600"], "either --key or --key-file"),
    (["-c", "-p", "80", "-u", "127.0.0.1", "--key-file", "KEY644"], "chmod 600"),
    (["-c", "-p", "80", "-u", "127.0.0.1", "--token", ""], "must not be empty"),
    (["-c", "-p", "80", "-u", "127.0.0.1", "--ssl-cert", "a", "--ssl-key", "b"], "relay mode"),
    (["-r", "-p", "FREE", "-u", "127.0.0.1", "--ssl-cert", "a"], "go together"),
    (["-r", "-p", "FREE", "-u", "127.0.0.1", "--ssl-cert", "KEY600", "--ssl-key", "KEY600"], "cannot use certificate"),
    (["-c", "-p", "80", "-u", "tcp://127.0.0.1", "--key", "00" * 16], "every upstream is tcp://"),
    (["-c", "-p", "80", "-u", "tcp://127.0.0.1", "--token", "t"], "every upstream is tcp://"),
    (["-c", "-p", "80", "-u", "relay://127.0.0.1:1", "--cacert", "KEY600"], "only applies to wss://"),
    (["-c", "-p", "80", "-u", "wss://127.0.0.1:1", "--cacert", "KEY600"], "cannot load CA"),
    (["--replay", "REC", "-u", "127.0.0.1", "--speed", "2"], "not a speed"),
    (["-c", "-p", "80", "-u", "127.0.0.1", "--speed", "200%"], "only applies to --replay"),
    (["-c", "-p", "80", "-u", "127.0.0.1", "--loop"], "only applies to --replay"),
    (["--replay", "/nonexistent/rec", "-u", "127.0.0.1"], "cannot read --replay file"),
    (["--replay", "KEY600", "-u", "127.0.0.1"], "not a gelf-mirror recording"),
    (["-r", "-p", "FREE", "--replay", "REC", "-u", "127.0.0.1"], "does not go with relay"),
    (["--replay", "REC", "-p", "80", "-u", "127.0.0.1"], "needs none"),
    (["-r", "-p", "BUSY", "-u", "127.0.0.1", "--record", "OUT"], "already in use"),
    (["-c", "-p", "80", "-u", "127.0.0.1", "--record", "/nonexistent/dir/rec"], "cannot write --record"),
    (["--hots", "x", "-c", "-p", "80", "-u", "127.0.0.1"], "unknown option --hots"),
]


@pytest.mark.parametrize("args, mention", MISTAKES, ids=[m for _, m in MISTAKES])
def test_mistake_is_one_line(args, mention, tmp_path):
    recording = tmp_path / "rec"
    recording.write_bytes(b"GELFMIR1")
    out = tmp_path / "out.gelfmir"
    names = {"KEY600": private_file(tmp_path, "k600", "00" * 16),
             "KEY644": private_file(tmp_path, "k644", "00" * 16, 0o644),
             "REC": recording, "OUT": out, "FREE": port_in(LOW, HIGH)}
    busy = socket.socket()
    try:
        if "BUSY" in args:
            busy.bind(("0.0.0.0", port_in(LOW, HIGH)))
            busy.listen(1)
            names["BUSY"] = busy.getsockname()[1]
        res = mirror(*[names.get(a, a) for a in args])
    finally:
        busy.close()
    line = assert_user_error(res, mention, prog="gelf-mirror")
    assert "s3cret" not in line
    assert not out.exists(), "a mistake must not create the --record file"


def test_capture_without_cap_net_raw_says_what_is_missing(tmp_path):
    out = tmp_path / "rec.gelfmir"
    res = mirror("-c", "-p", "80", "-u", "127.0.0.1", "--record", out,
                 prefix=["setpriv", "--bounding-set", "-net_raw", "--inh-caps", "-net_raw"])
    assert_user_error(res, r"needs CAP_NET_RAW: run as root", prog="gelf-mirror")
    assert not out.exists()


def test_replay_runs_to_the_end_with_record(tmp_path):
    """--replay FILE --record COPY: the copy holds the same connections (nothing needs a network)."""
    source = tmp_path / "in.gelfmir"
    with open(source, "wb") as handle:
        events.write_header(handle)
        handle.write(events.encode_all(connection([b"one", b"two"], ts=5.0)[1]))
    copy = tmp_path / "copy.gelfmir"
    res = mirror("--replay", source, "--record", copy, "--speed", "400%")
    assert res.returncode == 0, res.stderr
    with open(copy, "rb") as handle:
        got = list(events.read_file(handle))
    assert [(e.kind, e.data) for e in got][1:] == [(events.Kind.DATA, b"one"), (events.Kind.DATA, b"two"),
                                                   (events.Kind.CLOSE, b"fin")]
    assert re.search(r"done: 1 connections", res.stderr)
    assert os.path.getsize(copy) > 8


def test_capture_mode_wires_source_to_outputs(monkeypatch, tmp_path):
    """-c runs source.live_events -> Dispatcher -> outputs: with a fake source in place of live
    capture (capture.py and reassembly.py are joined in that one function), the plain server gets
    every connection and --record keeps them."""
    from gelf.mirror import source

    sink = Sink(port_in(LOW, HIGH))
    wanted = [b"GET /live/%d HTTP/1.1\r\n\r\n" % i * 2 for i in range(4)]
    calls = []

    def fake_live_events(port, bind, stop, **kw):
        calls.append((port, bind))
        for data in wanted:
            yield connection([data[:7], data[7:]])[1]

    monkeypatch.setattr(source, "live_events", fake_live_events)
    record = tmp_path / "live.gelfmir"
    try:
        assert cli.main(["-c", "-p", "8080", "-u", "tcp://127.0.0.1:%d" % sink.port, "--record", str(record)]) == 0
        assert calls == [(8080, None)]
        wait_for(lambda: sorted(sink.snapshot()[0]) == sorted(wanted), 30, what="the captured connections")
    finally:
        sink.stop()
    with open(record, "rb") as handle:
        assert sum(1 for e in events.read_file(handle) if e.kind == events.Kind.OPEN) == 4


# ---------------------------------------------------------------- filters, comparison, --stats

FLAG_MISTAKES = [
    (["--sample", "0"], "--sample.*percentage"),
    (["--sample", "100.5"], "--sample.*percentage"),
    (["--sample", "half"], "--sample.*percentage"),
    (["--rate", "0"], "--rate.*not a rate"),
    (["--rate", "-3"], "--rate.*not a rate"),
    (["--allow-path", "^/api/("], "--allow-path.*not a valid regular expression"),
    (["--deny-path", "[a-"], "--deny-path.*not a valid regular expression"),
    (["--method", "GET,,POST"], "--method.*HTTP methods"),
    (["--method", "GET POST"], "--method.*HTTP methods"),
    (["--ignore-header", "X Build"], "not a header name"),
    (["--ignore-header", "Date", "--no-compare"], "--no-compare turns it off"),
    (["--stats", "nonsense"], r"--stats.*\[ADDR:\]PORT"),
    (["--stats", "127.0.0.1:0"], r"--stats.*\[ADDR:\]PORT"),
    (["--stats", "not-an-ip:18400"], "not an IPv4 or IPv6"),
    (["--stats", "192.0.2.99:18400"], "not on this machine"),
    (["--stats", "BUSY"], "already in use"),
]


@pytest.mark.parametrize("args, mention", FLAG_MISTAKES, ids=[m for _, m in FLAG_MISTAKES])
def test_filter_and_stats_mistakes_are_one_line(args, mention, tmp_path):
    out = tmp_path / "out.gelfmir"
    busy = socket.socket()
    try:
        if "BUSY" in args:
            busy.bind(("127.0.0.1", port_in(18400, 18499)))
            busy.listen(1)
            args = [str(busy.getsockname()[1]) if a == "BUSY" else a for a in args]
        res = mirror("-c", "-p", "80", "-u", "127.0.0.1", "--record", out, *args)
    finally:
        busy.close()
    assert_user_error(res, mention, prog="gelf-mirror")
    assert not out.exists(), "a mistake must not create the --record file"


def test_relay_stats_port_must_differ_from_its_own():
    port = port_in(18400, 18499)
    res = mirror("-r", "-p", port, "-u", "tcp://127.0.0.1:80", "--stats", port)
    assert_user_error(res, "already serves /stats and /metrics on its port", prog="gelf-mirror")


def test_filter_flags_build_the_chain_in_order():
    stats_port = port_in(18400, 18499)
    p = plan("-c", "-p", "80", "-u", "127.0.0.1", "--sample", "25%", "--rate", "50", "--allow-path", "^/api/",
             "--deny-path", "secret", "--method", "get,post", "--ignore-header", "X-Build", "--stats", stats_port)
    chain = p.settings.filters
    assert [f.name for f in chain.filters] == ["sample", "rate", "http"]
    assert chain.filters[0].threshold == 2 ** 62 and chain.filters[1].rate == 50
    http = chain.filters[2]
    assert http.methods == {"GET", "POST"} and http.reject("GET", "/api/x") is None
    assert http.reject("GET", "/static") == "allow" and http.reject("GET", "/api/secret") == "deny"
    assert (p.settings.compare, p.settings.ignore_headers, p.settings.stats) == (True, ["X-Build"],
                                                                                 ("127.0.0.1", stats_port))
    bare = plan("-c", "-p", "80", "-u", "127.0.0.1", "--sample", "100")
    assert bare.settings.filters is None and bare.settings.stats is None  # no HTTP filter unless asked
    assert plan("-c", "-p", "80", "-u", "127.0.0.1", "--no-compare").settings.compare is False


def test_help_tells_comparison_is_on_by_default():
    out = mirror("--help").stdout
    for words in ("--no-compare", "server-to-client", "/metrics", "gelf-mirror report", "0 < PCT <= 100"):
        assert words in " ".join(out.split()), words


REPORT_MISTAKES = [
    (["http://127.0.0.1:PORT/stats"], "cannot reach http://127.0.0.1:.*/stats"),
    (["/nonexistent/stats.json"], "cannot read /nonexistent/stats.json"),
    (["NOTJSON"], "is not JSON"),
    (["NOCOMPARE"], "not a gelf-mirror /stats document"),
    (["OFF"], "--no-compare"),
]


@pytest.mark.parametrize("args, mention", REPORT_MISTAKES, ids=[m for _, m in REPORT_MISTAKES])
def test_report_mistakes_are_one_line(args, mention, tmp_path):
    files = {"NOTJSON": "<html>", "NOCOMPARE": '{"events": 1}', "OFF": '{"compare": null}'}
    names = {}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        names[name] = str(tmp_path / name)
    args = [names.get(a, a).replace("PORT", str(port_in(18400, 18499))) for a in args]
    assert_user_error(mirror("report", *args), mention, prog="gelf-mirror")


def test_report_from_a_saved_file_also_through_gelf_mirror(tmp_path):
    from gelf.mirror.compare import Comparer

    saved = tmp_path / "stats.json"
    saved.write_text(json.dumps({"compare": Comparer().snapshot()}))
    res = mirror("report", saved)
    assert res.returncode == 0 and "no upstream has answered yet" in res.stdout, res.stderr
    res = subprocess.run([PYTHON, "gelf.py", "mirror", "report", str(saved)], cwd=REPO, capture_output=True,
                         text=True)
    assert res.returncode == 0 and res.stdout.startswith("production: 0 requests"), res.stderr
