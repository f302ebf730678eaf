"""Bad input on a server's /ws is dropped and counted, never reaches the tap, and does not
disturb the traffic relayed by a page at the same time."""

import random
import signal
import time

import pytest

import helpers
from helpers import encode, eth_frame, wait_link_state, wait_ping

pytestmark = pytest.mark.usefixtures("need_root", "need_chromium")

BAD = b"GELF-BAD-INPUT"
GOOD = b"GELF-GOOD-INPUT"
MTU = 1500


def bad_messages():
    """(drop reason, payload, binary, own connection) for everything the raw client sends.
    Every payload carries the BAD marker where it could end up on the tap if the server let it
    through. Messages over the size limit go on connections of their own: a server may refuse
    such a giant by closing the socket (after counting it)."""
    rnd = random.Random(0x6E1F)
    origin = rnd.getrandbits(32)
    seq = time.time_ns()
    marked = eth_frame(BAD * 8)
    msgs = [
        ("text", (BAD * 4).decode(), False, False),
        ("text", "{}", False, False),
        ("empty", b"", True, False),
        ("empty", b"", True, False),
        # a frame over MTU + 18 in an otherwise valid message
        ("oversize", encode([eth_frame(BAD * 143)], origin, seq + 1), True, False),
        # unknown version, unknown flag bit, header without records, record past the end
        ("malformed", encode([marked], origin, seq + 3, version=2), True, False),
        ("malformed", encode([marked], origin, seq + 4, version=0), True, False),
        ("malformed", encode([marked], origin, seq + 5, flags=0x80), True, False),
        ("malformed", encode([], origin, seq + 6), True, False),
        ("malformed", encode([marked], origin, seq + 7)[:-10], True, False),
        ("malformed", encode([marked], origin, seq + 8)[:10], True, False),
        # an unknown message type
        ("unknown_type", encode([marked], origin, seq + 9, type=7), True, False),
    ]
    for _ in range(6):  # random bytes, never starting with the valid version byte
        n = rnd.randrange(17, 1200)
        blob = bytearray(rnd.getrandbits(8) for _ in range(n))
        blob[0] = rnd.choice([0] + list(range(2, 256)))
        blob[n // 2:n // 2] = BAD
        msgs.append(("malformed", bytes(blob), True, False))
    # 100 KiB: one giant frame, and 100 small frames in one message (over the
    # 16 + 16 + 65536 + 4 + (MTU + 18) bytes a non-OFFLOAD message may have, docs/design.md)
    msgs.append(("oversize", encode([eth_frame(BAD * 7300)], origin, seq + 2), True, True))
    msgs.append(("oversize", encode([eth_frame(BAD * 70)] * 100, origin, seq + 10), True, True))
    assert len(eth_frame(BAD * 143)) > MTU + 18
    assert len(msgs[-1][1]) > 16 + 16 + 65536 + 4 + MTU + 18
    return msgs


def connect(url):
    from ws4py.client.threadedclient import WebSocketClient

    ws = WebSocketClient(url)
    ws.daemon = True
    ws.connect()
    return ws


def close_quietly(ws):
    try:
        ws.close()
    except Exception:
        pass


# ws4py's client thread may raise when the server refuses a giant by closing the socket.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_bad_input_dropped_and_counted(gelf_server, ns_addr, open_page, bg, tmp_path):
    s1, s2 = gelf_server(mtu=MTU), gelf_server(mtu=MTU)
    ns1, ns2 = ns_addr(s1, "10.77.0.1"), ns_addr(s2, "10.77.0.2")
    page = open_page(f"{s1.url}/?peer=127.0.0.1:{s2.port}")
    wait_link_state(page, s1.port, "open")
    wait_link_state(page, s2.port, "open")
    assert wait_ping(ns1, "10.77.0.2"), "no traffic through the page"

    # Everything written to server 2's tap is captured.
    pcap = tmp_path / "tap2.pcap"
    dump = bg(["ip", "netns", "exec", ns2, "tcpdump", "-i", s2.dev, "-n", "-U", "-s", "0",
               "-w", str(pcap)], name="tcpdump (ns2)")
    assert dump.pump.wait_line(r"listening on", 60), f"tcpdump did not start:\n{dump.pump.text()}"

    msgs = bad_messages()
    expected = {}
    for reason, *_ in msgs:
        expected[reason] = expected.get(reason, 0) + 1
    before = s2.stats()["drops"]

    pinger = bg(helpers.ping_cmd(ns1, "10.77.0.2", count=40, interval=0.1), name="ping")
    time.sleep(1)

    ws = connect(s2.ws_url)
    try:
        for _, payload, binary, alone in msgs:
            if alone:
                giant = connect(s2.ws_url)
                try:
                    giant.send(payload, binary=binary)
                    time.sleep(0.2)
                finally:
                    close_quietly(giant)
            else:
                ws.send(payload, binary=binary)
            time.sleep(0.02)
        # Positive control: one valid message through the same socket reaches the tap.
        good = encode([eth_frame(GOOD * 4)], random.getrandbits(32), time.time_ns())
        ws.send(good, binary=True)
        time.sleep(0.5)
        assert not ws.terminated, "server closed the raw client's socket"
    finally:
        close_quietly(ws)

    pinger.wait(120)
    loss = helpers.parse_loss(pinger.pump.text())
    assert loss == 0, f"pings lost {loss}% during the bad burst:\n{pinger.pump.text()}"

    assert s2.alive(), "server 2 died"
    assert s1.alive(), "server 1 died"

    def counted():
        drops = s2.stats()["drops"]
        return all(drops[r] - before[r] >= n for r, n in expected.items()) and drops

    try:
        after = helpers.wait_for(counted, 30, what="drop counters")
    except TimeoutError:
        after = s2.stats()["drops"]
    delta = {r: after[r] - before[r] for r in after}

    time.sleep(0.5)
    dump.send_signal(signal.SIGINT)
    dump.wait(30)
    captured = pcap.read_bytes()
    assert GOOD in captured, "the valid control message never reached the tap (capture broken?)"

    problems = []
    if BAD in captured:
        problems.append(f"bad input was written to the tap ({captured.count(BAD)} markers "
                        f"in the capture)")
    for reason in ("text", "empty", "oversize", "malformed"):
        if delta[reason] != expected[reason]:
            problems.append(f"drops[{reason}] rose by {delta[reason]}, sent {expected[reason]}")
    if delta["unknown_type"] < expected["unknown_type"]:
        problems.append(f"drops[unknown_type] rose by {delta['unknown_type']}, "
                        f"sent {expected['unknown_type']}")
    assert not problems, "; ".join(problems) + f"\ndrops delta {delta}"
    assert s2.alive() and s2.stats()["tap"]["written_frames"] > 0
