"""End to end on loopback (ports 18130-18169): a fake capture source -> relay output -> relay
instance (a real `gelf-mirror -r` process) -> plain TCP server, byte-identical; sealed with
--key and behind --token; chained relays found by the probe; and bad peers on a relay's port
(wrong key, wrong token, garbage, a gelf Ethernet client): one clear log line, the connection
closed, the relay still serving."""

import json
import os
import signal
import socket
import subprocess
import urllib.request

import pytest

import wsclient
from gelf import fastws, wire
from gelf.mirror import events
from gelf.mirror.dispatch import Dispatcher
from gelf.mirror.outputs.relay import Output as RelayOutput
from helpers import PYTHON, REPO, LogPump, make_certificate
from mirror_helpers import Sink, connection, interleave, port_in, wait_for

LOW, HIGH = 18130, 18169
KEY = "00112233445566778899aabbccddeeff"
HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def is_probe(stream):
    return b"gelf-mirror/" in stream[:200] and b" probe\r\n" in stream[:200]


class Procs:
    """gelf-mirror processes, stopped by PID at teardown (SIGINT, then SIGKILL)."""

    def __init__(self):
        self.procs = []

    def start(self, *args, ready=r"relay listening|replaying"):
        proc = subprocess.Popen([PYTHON, "-m", "gelf.mirror.cli", *map(str, args)], cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        proc.pump = LogPump(proc.stdout)
        self.procs.append(proc)
        if ready:
            found = proc.pump.wait_line(ready, 30, alive=lambda: proc.poll() is None)
            assert found, "gelf-mirror %s did not start:\n%s" % (args, proc.pump.text())
        return proc

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


@pytest.fixture
def procs():
    made = Procs()
    yield made
    made.stop()


@pytest.fixture
def sinks():
    made = []

    def make(**kw):
        sink = Sink(port_in(LOW, HIGH), **kw)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.stop()


@pytest.fixture
def outputs():
    made = []

    def make(*args, **kw):
        output = RelayOutput(*args, **kw)
        made.append(output)
        output.start()
        return output

    yield make
    for output in made:
        output.close(0.5)


def key_file(tmp_path, key=KEY, name="key"):
    path = tmp_path / name
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


def mirror_traffic(dispatcher, n=8):
    """n connections of keep-alive, pipelined requests with bodies, interleaved; returns their bytes."""
    wanted, streams = [], []
    for i in range(n):
        body = os.urandom(40_000 + 9_000 * i)
        data = (b"POST /up/%d HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (i, len(body)) + body
                + b"GET /a/%d HTTP/1.1\r\n\r\nGET /b/%d HTTP/1.1\r\n\r\n" % (i, i))
        wanted.append(data)
        streams.append(connection([data[j:j + 1448] for j in range(0, len(data), 1448)])[1])
    dispatcher.dispatch_all(interleave(streams))
    return wanted


def delivered(sink, count):
    wait_for(lambda: sum(1 for s, c in zip(*sink.snapshot()) if c and not is_probe(s)) >= count, 40,
             what="%d connections at the plain server" % count)
    return sorted(s for s in sink.snapshot()[0] if not is_probe(s))


def start_relay(procs, upstream, *extra):
    port = port_in(LOW, HIGH)
    return port, procs.start("-r", "-p", port, "-u", upstream, "-v", *extra)


def test_fake_capture_through_relay_is_byte_identical(procs, sinks, outputs):
    sink = sinks(reply=HTTP_OK)
    port, relay = start_relay(procs, "tcp://127.0.0.1:%d" % sink.port)
    output = outputs("ws://127.0.0.1:%d/ws" % port)
    wait_for(lambda: output.stats()["up"], 30, what="the relay link")
    wanted = mirror_traffic(Dispatcher([output]))
    assert delivered(sink, len(wanted)) == sorted(wanted)
    assert output.stats()["lost_events"] == output.stats()["queue_full"] == 0
    with urllib.request.urlopen("http://127.0.0.1:%d/stats" % port, timeout=10) as answer:
        assert answer.headers["X-Gelf-Mirror"] == "relay"
        stats = json.load(answer)
    assert stats["mirror"]["conns"] == len(wanted)
    assert stats["mirror"]["outputs"][0]["replayed_bytes"] == sum(map(len, wanted))


def test_sealed_and_token(procs, sinks, outputs, tmp_path):
    sink = sinks(reply=HTTP_OK)
    port, relay = start_relay(procs, "tcp://127.0.0.1:%d" % sink.port, "--key-file", key_file(tmp_path),
                              "--token", "s3cret")
    output = outputs("ws://127.0.0.1:%d/ws?token=s3cret" % port, wire.Sealer(bytes.fromhex(KEY)))
    wait_for(lambda: output.stats()["up"], 30, what="the sealed relay link")
    wanted = mirror_traffic(Dispatcher([output]), n=4)
    assert delivered(sink, 4) == sorted(wanted)
    assert "s3cret" not in relay.pump.text()


def test_wrong_key_is_refused_and_relay_keeps_serving(procs, sinks, outputs):
    sink = sinks()
    port, relay = start_relay(procs, "tcp://127.0.0.1:%d" % sink.port, "--key", KEY)
    bad = outputs("ws://127.0.0.1:%d/ws" % port, wire.Sealer(bytes(16)))
    wait_for(lambda: bad.stats()["up"], 30, what="the link")
    mirror_traffic(Dispatcher([bad]), n=2)
    assert relay.pump.wait_line(r"fail authentication: its --key does not match this relay's; closing it", 30)
    assert relay.pump.wait_line(r"link \d+ closed", 30)
    unsealed = outputs("ws://127.0.0.1:%d/ws" % port)
    wait_for(lambda: unsealed.stats()["up"], 30, what="the unsealed link")
    mirror_traffic(Dispatcher([unsealed]), n=1)
    assert relay.pump.wait_line(r"sends unencrypted streams but this relay has a key", 30)
    good = outputs("ws://127.0.0.1:%d/ws" % port, wire.Sealer(bytes.fromhex(KEY)))
    wait_for(lambda: good.stats()["up"], 30, what="the good link")
    wanted = mirror_traffic(Dispatcher([good]), n=2)
    assert delivered(sink, 2) == sorted(wanted)  # only the good link's connections arrived
    assert relay.poll() is None and "Traceback" not in relay.pump.text()


def test_wrong_token_is_refused(procs, sinks, outputs):
    sink = sinks()
    port, relay = start_relay(procs, "tcp://127.0.0.1:%d" % sink.port, "--token", "right")
    bad = outputs("ws://127.0.0.1:%d/ws?token=wrong" % port)
    wait_for(lambda: bad.stats()["error"], 30, what="the refused dial")
    assert "403" in bad.stats()["error"] and "token" in bad.stats()["error"]
    assert relay.pump.wait_line(r"refused /ws from \S+: wrong or missing token", 30)
    assert "wrong" not in relay.pump.text().replace("wrong or missing", "")
    assert relay.poll() is None


def test_garbage_and_ethernet_clients_are_closed(procs, sinks):
    sink = sinks()
    port, relay = start_relay(procs, "tcp://127.0.0.1:%d" % sink.port)
    # garbage that is not even HTTP: the gate answers 400 and closes
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(os.urandom(64).replace(b"G", b"x") + b"\r\n\r\n")
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400")
    # garbage inside a WebSocket
    client = wsclient.Client(wsclient.upgrade(port))
    client.send(b"\x01\x02" + os.urandom(40))
    close = client.closed(30)
    assert close is not None and close[0] == fastws.CloseCode.POLICY_VIOLATION
    assert relay.pump.wait_line(r"does not send gelf-mirror streams \(malformed", 30)
    # a gelf (Ethernet) client: a DATA message of frames
    client = wsclient.Client(wsclient.upgrade(port, headers=["User-Agent: gelf/0.1.0 direct"]))
    client.send(wire.encode([b"\xff" * 6 + b"\x02\0\0\0\0\x01\x88\xb5gelf"], 0x0A0B0C0D, 1))
    assert client.closed(30) is not None
    assert relay.pump.wait_line(r"it is a gelf \(Ethernet\) client, not gelf-mirror", 30)
    # events for a connection never opened are dropped, not replayed; the relay still serves
    client = wsclient.Client(wsclient.upgrade(port))
    client.send(events.seal(events.encode(events.Event(events.Kind.DATA, 5, 1.0, 0, b"x")), 7, 1))
    assert relay.poll() is None and "Traceback" not in relay.pump.text()
    assert sink.snapshot()[0] == []


def test_chained_relays_found_by_probe_and_a_direct_plain_server(procs, sinks, tmp_path):
    """--replay -> relay A -> relay B -> plain server, each hop written host:port (the probe tells
    relays from plain servers), plus the same capture straight to a second plain server."""
    far, near = sinks(reply=HTTP_OK), sinks(reply=HTTP_OK)
    port_b, relay_b = start_relay(procs, "tcp://127.0.0.1:%d" % far.port)
    port_a, relay_a = start_relay(procs, "127.0.0.1:%d" % port_b)
    assert relay_a.pump.wait_line(r"is a gelf-mirror relay", 30)
    recording = str(tmp_path / "rec.gelfmir")
    with open(recording, "wb") as handle:
        events.write_header(handle)
        wanted = []
        for i in range(5):
            data = b"GET /chain/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i * 3
            wanted.append(data)
            handle.write(events.encode_all(connection([data[:10], data[10:]], ts=1000.0 + i * 0.01)[1]))
    capture = procs.start("--replay", recording, "-u", "127.0.0.1:%d" % port_a, "-u", "127.0.0.1:%d" % near.port,
                          ready=None)
    assert capture.wait(60) == 0, capture.pump.text()
    assert delivered(far, 5) == sorted(wanted)
    assert delivered(near, 5) == sorted(wanted)
    text = capture.pump.text()
    assert "is a gelf-mirror relay" in text and "is a plain server" in text


def test_tls_relay_found_by_probe_with_cacert_key_and_token(procs, sinks, tmp_path):
    """A relay serving wss (--ssl-cert) behind --token and --key; capture writes it host:port and
    the probe finds a TLS relay (gelf's 400 for plain HTTP on a TLS port), then dials wss://."""
    cert, key = make_certificate(tmp_path)
    sink = sinks(reply=HTTP_OK)
    secret = key_file(tmp_path)
    token = key_file(tmp_path, "t0ken-value", "token")
    port, relay = start_relay(procs, "tcp://127.0.0.1:%d" % sink.port, "--ssl-cert", cert, "--ssl-key", key,
                              "--key-file", secret, "--token-file", token)
    recording = str(tmp_path / "rec.gelfmir")
    with open(recording, "wb") as handle:
        events.write_header(handle)
        wanted = [b"GET /tls/%d HTTP/1.1\r\n\r\n" % i for i in range(3)]
        for i, data in enumerate(wanted):
            handle.write(events.encode_all(connection([data], ts=50.0 + i * 0.01)[1]))
    capture = procs.start("--replay", recording, "-u", "127.0.0.1:%d" % port, "--cacert", cert,
                          "--key-file", secret, "--token-file", token, ready=None)
    assert capture.wait(60) == 0, capture.pump.text()
    assert delivered(sink, 3) == sorted(wanted)
    assert "sending to relay:wss://127.0.0.1:%d/ws" % port in capture.pump.text()
    assert "t0ken-value" not in capture.pump.text() + relay.pump.text()


def test_relay_output_loses_while_relay_is_down_and_recovers(procs, sinks, outputs):
    sink = sinks(reply=HTTP_OK)
    port = port_in(LOW, HIGH)
    output = outputs("ws://127.0.0.1:%d/ws" % port)  # nothing listens there yet
    dispatcher = Dispatcher([output])
    mirror_traffic(dispatcher, n=3)
    wait_for(lambda: output.stats()["upstream_down"] == 3, 20, what="connections lost while the relay is down")
    procs.start("-r", "-p", port, "-u", "tcp://127.0.0.1:%d" % sink.port)
    wait_for(lambda: output.stats()["up"], 40, what="the link to come up (DialLink's backoff)")
    wanted = mirror_traffic(dispatcher, n=3)
    assert delivered(sink, 3) == sorted(wanted)


def test_relay_bind_listens_there_only(procs, sinks, outputs):
    sink = sinks()
    port, relay = start_relay(procs, "tcp://127.0.0.1:%d" % sink.port, "--bind", "127.0.0.1")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=10).close()
    socket.create_connection(("127.0.0.1", port), timeout=10).close()
    port6, relay6 = start_relay(procs, "tcp://127.0.0.1:%d" % sink.port, "--bind", "::1")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port6), timeout=10).close()
    output = outputs("ws://[::1]:%d/ws" % port6)
    wait_for(lambda: output.stats()["up"], 30, what="the link over IPv6")
    wanted = mirror_traffic(Dispatcher([output]), n=2)
    assert delivered(sink, 2) == sorted(wanted)
