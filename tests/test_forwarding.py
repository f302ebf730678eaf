"""Forwarding between links (hub and --learn switch), the relay's dedup, and URL handling."""

import ssl

import pytest

from gelf import wire
from gelf.client import check_url, explain, public_url, tls_context
from gelf.links import Link, LinkSet
from gelf.pump import Pump
from gelf.relay import Relay
from gelf.stats import Drops
from gelf.switch import LOCAL, MacTable
from gelf.tap import Tap, TapError
from fakes import FakeTap

MAC_A = bytes.fromhex("02000000000a")
MAC_B = bytes.fromhex("02000000000b")
MAC_C = bytes.fromhex("02000000000c")
BROADCAST = b"\xff" * 6


def frame(dst, src, payload=b"x" * 46):
    return dst + src + b"\x08\x00" + payload


class FakeLink(Link):
    """A link that records what it is offered (no sender thread needed)."""

    def __init__(self, name, drops=None):
        super().__init__(name, drops or Drops())
        self.offered = []

    def offer(self, message):
        self.offered.append(message)


def setup(learn=False, n=3):
    links = LinkSet()
    drops = Drops()
    peers = [FakeLink("peer%d" % i, drops) for i in range(n)]
    for link in peers:
        links.add(link)
    tap = FakeTap()
    pump = Pump(tap, links, drops, origin=0x1, switch=MacTable() if learn else None)
    return pump, tap, peers


def test_hub_forwards_to_every_other_link_once():
    pump, tap, (a, b, c) = setup()
    message = wire.encode([frame(MAC_B, MAC_A)], origin=0x2, seq=10)
    pump.deliver(message, a)
    pump.deliver(message, b)  # the same message by another path
    assert a.offered == [] and b.offered == [message] and c.offered == [message]
    assert len(tap.written) == 1 and pump.drops.snapshot()["replay"] == 1
    assert b.drops.snapshot()["replay"] == 1 and a.drops.snapshot()["replay"] == 0  # counted per link too


def test_own_messages_are_neither_written_nor_forwarded():
    pump, tap, (a, b, c) = setup()
    pump.deliver(wire.encode([frame(MAC_B, MAC_A)], origin=pump.origin, seq=10), a)
    assert tap.written == [] and b.offered == [] and pump.drops.snapshot()["loop"] == 1


def test_invalid_messages_are_not_forwarded():
    pump, _, (a, b, c) = setup()
    pump.deliver(b"\x01garbage" * 3, a)
    assert b.offered == [] and c.offered == []


def test_learning_switch_sends_unicast_only_where_the_destination_is():
    pump, tap, (a, b, c) = setup(learn=True)
    pump.deliver(wire.encode([frame(BROADCAST, MAC_B)], origin=0xB, seq=1), b)  # B announces itself
    assert a.offered and c.offered and tap.written  # unknown or broadcast: flood
    for link in (a, b, c):
        link.offered.clear()
    tap.written.clear()
    pump.deliver(wire.encode([frame(MAC_B, MAC_C)], origin=0xC, seq=1), c)  # C -> B, B is known
    assert b.offered and not a.offered and tap.written == []
    pump.deliver(wire.encode([frame(MAC_C, MAC_B)], origin=0xB, seq=2), b)  # B -> C
    assert c.offered and len(a.offered) == 0


def test_hub_floods_known_unicast_too():
    pump, tap, (a, b, c) = setup(learn=False)
    pump.deliver(wire.encode([frame(BROADCAST, MAC_B)], origin=0xB, seq=1), b)
    pump.deliver(wire.encode([frame(MAC_B, MAC_C)], origin=0xC, seq=1), c)
    assert len(a.offered) == 2 and len(tap.written) == 2


def test_mac_table_expires_and_never_learns_multicast_sources():
    table = MacTable(ttl=-1)
    table.learn([frame(BROADCAST, MAC_A)], LOCAL)
    assert table.destinations([frame(MAC_A, MAC_B)]) is None  # expired at once
    table = MacTable()
    table.learn([frame(MAC_A, b"\x01\x00\x5e\x00\x00\x01")], "x")
    assert table.destinations([frame(b"\x01\x00\x5e\x00\x00\x01", MAC_A)]) is None
    table.learn([frame(BROADCAST, MAC_A)], "x")
    table.learn([frame(BROADCAST, MAC_B)], "y")
    assert table.destinations([frame(MAC_A, MAC_C), frame(MAC_B, MAC_C)]) == {"x", "y"}


def test_mac_table_is_bounded():
    table = MacTable(max_entries=10)
    for i in range(50):
        table.learn([frame(BROADCAST, bytes([2, 0, 0, 0, 0, i]))], "x")
    assert len(table._table) == 10


def test_relay_forwards_each_message_id_once_and_never_back():
    relay = Relay([], tls_context())
    a, b, c = FakeLink("a", relay.drops), FakeLink("b", relay.drops), FakeLink("c", relay.drops)
    for link in (a, b, c):
        relay.links.add(link)
    message = wire.encode([frame(BROADCAST, MAC_A)], origin=0xA, seq=5)
    relay.deliver(message, a)
    relay.deliver(message, b)
    relay.deliver(b"\x09" * 20, a)
    assert a.offered == [] and b.offered == [message] and c.offered == [message]
    assert relay.drops.snapshot()["replay"] == 1 and relay.drops.snapshot()["malformed"] == 1


def test_urls():
    assert check_url("wss://h:1/ws") == "wss://h:1/ws"
    for bad in ("http://h/ws", "h:7001", "ws:///ws"):
        with pytest.raises(ValueError):
            check_url(bad)
    assert public_url("ws://h:1/ws?token=s3cret&x=1") == "ws://h:1/ws?x=1"
    assert "s3cret" not in public_url("ws://h:1/ws?token=s3cret")


def test_dial_errors_are_explained():
    assert "connection refused" == explain(ConnectionRefusedError())
    err = ssl.SSLCertVerificationError(1, "x")
    err.verify_message = "unable to get local issuer certificate"
    assert "--cacert" in explain(err)


def test_tls_context_verifies_unless_insecure(tmp_path):
    assert tls_context().verify_mode == ssl.CERT_REQUIRED
    assert tls_context(insecure=True).verify_mode == ssl.CERT_NONE
    with pytest.raises(ValueError, match="cannot load CA file"):
        tls_context(cacert=str(tmp_path / "missing.pem"))


def test_bad_address_and_missing_bridge_are_refused_clearly():
    tap = Tap.__new__(Tap)  # only the checks that run before touching the tap
    tap.name = "none0"
    with pytest.raises(TapError, match="invalid address"):
        tap.add_address("10.0.0.300/24")
    with pytest.raises(TapError, match="not an existing bridge"):
        tap.join_bridge("no-such-bridge")
