"""Super-frames end to end: TCP through a direct link with GSO/TSO offloads on both taps, and
between a server with offloads and one without (which splits what it receives itself)."""

import pytest

from helpers import ADDR, assert_pings, transfer

pytestmark = pytest.mark.usefixtures("need_root")


def direct_pair(gelf_server, ns_addr, first=(), second=()):
    s1 = gelf_server(extra=list(first))
    s2 = gelf_server(extra=list(second) + ["--connect", f"ws://127.0.0.1:{s1.port}/ws"])
    ns1, ns2 = ns_addr(s1, ADDR[0]), ns_addr(s2, ADDR[1])
    assert_pings(ns1, ADDR[1], count=5)
    return (s1, s2), (ns1, ns2)


def read_super_frames(server):
    """Did this server's tap hand over super-frames (frames larger than MTU + 18 on average)?"""
    tap = server.stats()["tap"]
    return tap["read_frames"] and tap["read_bytes"] / tap["read_frames"] > tap["mtu"] + 18


def test_transfer_with_offloads_on_both_sides(gelf_server, ns_addr, bg, tmp_path):
    (s1, s2), (ns1, ns2) = direct_pair(gelf_server, ns_addr)
    assert s1.stats()["tap"]["offload"] and s2.stats()["tap"]["offload"]
    transfer(bg, ns1, ns2, ADDR[1], tmp_path)
    assert read_super_frames(s1), s1.stats()["tap"]


@pytest.mark.parametrize("key", [[], ["--key", "000102030405060708090a0b0c0d0e0f"]], ids=["plain", "sealed"])
def test_offload_peer_and_plain_peer_interoperate(gelf_server, ns_addr, bg, tmp_path, key):
    (s1, s2), (ns1, ns2) = direct_pair(gelf_server, ns_addr, first=key, second=["--no-offload"] + key)
    assert s1.stats()["tap"]["offload"] and not s2.stats()["tap"]["offload"]
    # Frames that met a tap while the test was moving it (down: EIO) were counted; start after.
    before = [s.stats()["drops"] for s in (s1, s2)]
    transfer(bg, ns1, ns2, ADDR[1], tmp_path)  # super-frames from s1, split by s2
    assert read_super_frames(s1), s1.stats()["tap"]
    transfer(bg, ns2, ns1, ADDR[0], tmp_path)  # plain frames into an offload tap
    for s, old in zip((s1, s2), before):
        drops = s.stats()["drops"]
        assert drops["offload"] == 0 and drops["tap_write"] == old["tap_write"], (old, drops)
