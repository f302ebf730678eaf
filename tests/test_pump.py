"""Validation on the receive path: only valid frames reach the tap; every drop is counted."""

import os

from gelf import wire
from gelf.links import LinkSet
from gelf.pump import Pump
from gelf.stats import Drops
from fakes import FakeTap

FRAME = bytes.fromhex("ffffffffffff02000000000188b5") + b"payload!"


def make_pump():
    tap = FakeTap()
    drops = Drops()
    return Pump(tap, LinkSet(), drops, origin=0x11111111), tap, drops


def test_valid_batch_is_written_frame_by_frame():
    pump, tap, drops = make_pump()
    pump.deliver(wire.encode([FRAME, FRAME[::-1]], origin=0x22, seq=5))
    assert tap.written == [FRAME, FRAME[::-1]]
    assert pump.written.count == 2
    assert set(drops.snapshot().values()) == {0}


def test_each_kind_of_bad_input_is_dropped_and_counted():
    pump, tap, drops = make_pump()
    pump.deliver(b"")
    pump.deliver(os.urandom(3))
    pump.deliver(b"\x09" + os.urandom(40))
    pump.deliver(wire.encode([b"z" * 2000], origin=0x22, seq=6))
    pump.deliver(b"\x01" + b"\x00" * (pump.max_message + 1))
    pump.deliver(wire.encode([FRAME], origin=0x22, seq=7, type=9))
    assert tap.written == []
    counts = drops.snapshot()
    assert (counts["empty"], counts["malformed"], counts["oversize"], counts["unknown_type"]) == (1, 2, 2, 1)


def test_own_messages_are_not_written_back():
    pump, tap, _ = make_pump()
    pump.deliver(wire.encode([FRAME], origin=pump.origin, seq=1))
    assert tap.written == []
