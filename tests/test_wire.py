"""The v1 wire format, checked against the worked example in docs/design.md."""

import re
from pathlib import Path

import pytest

from gelf import wire

FRAME = bytes.fromhex("ffffffffffff" "020000000001" "88b5") + b"gelf"
EXAMPLE = bytes.fromhex(
    "01000000" "0a0b0c0d" "0000000000000001"
    "00000012"
    "ffffffffffff" "020000000001" "88b5"
    "67656c66"
)


def test_encode_matches_the_written_example():
    assert wire.encode([FRAME], origin=0x0A0B0C0D, seq=1) == EXAMPLE
    assert len(EXAMPLE) == 38


def test_design_doc_shows_the_same_bytes():
    doc = (Path(__file__).parent.parent / "docs" / "design.md").read_text()
    block = doc.split("### Worked example", 1)[1].split("```")[1]
    # Each line is hex pairs, then (after three or more spaces) a comment.
    hex_part = " ".join(line.split("   ")[0] for line in block.strip().splitlines())
    hex_bytes = "".join(hex_part.split())
    assert bytes.fromhex(hex_bytes) == EXAMPLE


def test_decode_example():
    msg = wire.decode(EXAMPLE)
    assert (msg.version, msg.type, msg.flags, msg.origin, msg.seq) == (1, 0, 0, 0x0A0B0C0D, 1)
    assert msg.frames == [FRAME]


def test_batch_round_trip():
    # The largest batch a sender makes: 64 KiB of frames, then one more maximal frame.
    frames = [bytes([i]) * 1040 for i in range(63)] + [b"\xee" * 1518]
    assert sum(map(len, frames[:-1])) < wire.BATCH_BYTES
    msg = wire.decode(wire.encode(frames, origin=7, seq=2**64 - 1), mtu=1500)
    assert msg.frames == frames and msg.seq == 2**64 - 1


@pytest.mark.parametrize("data, reason", [
    (b"\x01\x00\x00", "malformed"),                                        # shorter than the header
    (bytes([2]) + EXAMPLE[1:], "malformed"),                               # unknown version
    (EXAMPLE[:2] + b"\x80" + EXAMPLE[3:], "malformed"),                    # unknown flag
    (EXAMPLE[:2] + b"\x01" + EXAMPLE[3:], "malformed"),                    # sealed, no key
    (EXAMPLE[:1] + b"\x05" + EXAMPLE[2:], "unknown_type"),
    (EXAMPLE[:16], "malformed"),                                           # no record
    (EXAMPLE[:-1], "malformed"),                                           # record past the end
    (EXAMPLE + b"\x00\x00", "malformed"),                                  # truncated length
    (wire.encode([b"x" * 13], 1, 1), "malformed"),                         # runt frame
    (wire.encode([b"x" * 1519], 1, 1), "oversize"),                        # MTU 1500 + 18 + 1
])
def test_invalid_messages_are_named(data, reason):
    with pytest.raises(wire.WireError) as err:
        wire.decode(data, mtu=1500)
    assert err.value.reason == reason


def test_message_limit_depends_on_the_flags():
    many_small = wire.encode([b"s" * 100] * 700, 1, 1)  # 72 KiB of valid frames: over the limit
    with pytest.raises(wire.WireError) as err:
        wire.decode(many_small, mtu=1500)
    assert err.value.reason == "oversize"
    batch = wire.encode([b"b" * 1000] * 65, 1, 1)  # a full batch plus one frame is fine
    assert len(wire.decode(batch, mtu=1500).frames) == 65


def test_largest_regular_frame_is_accepted():
    assert wire.decode(wire.encode([b"y" * 1518], 1, 1), mtu=1500).frames == [b"y" * 1518]
