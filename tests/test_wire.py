"""The v1 wire format, checked against the worked example in docs/design.md."""

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


def doc_bytes(marker):
    """The bytes of the first code block after `marker` in docs/design.md: on each line, hex
    pairs, then (after three or more spaces) a comment."""
    doc = (Path(__file__).parent.parent / "docs" / "design.md").read_text()
    block = doc.split(marker, 1)[1].split("```")[1]
    return bytes.fromhex("".join(line.split("   ")[0] for line in block.strip().splitlines()).replace(" ", ""))


def test_design_doc_shows_the_same_bytes():
    assert doc_bytes("### Worked example") == EXAMPLE


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
    (EXAMPLE[:2] + b"\x01" + EXAMPLE[3:], "no_key"),                       # sealed, no key
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


KEY = bytes(range(16))


def test_sealed_round_trip_hides_the_payload():
    sealer = wire.Sealer(KEY)
    data = wire.encode([FRAME + b"secret-payload"], origin=0x0A0B0C0D, seq=1, sealer=sealer)
    assert data[:16] == bytes.fromhex("01000100" "0a0b0c0d" "0000000000000001")
    assert b"secret-payload" not in data and b"gelf" not in data
    assert len(data) == 16 + 4 + len(FRAME) + 14 + 16
    assert wire.decode(data, sealer=sealer).frames == [FRAME + b"secret-payload"]


def test_sealed_example_from_the_design_doc():
    """The sealed form of the worked example, as written in docs/design.md."""
    data = wire.encode([FRAME], origin=0x0A0B0C0D, seq=1, sealer=wire.Sealer(KEY))
    assert doc_bytes("The same message sealed") == data


@pytest.mark.parametrize("position", [0, 2, 5, 12, 16, 20, -1])
def test_any_flipped_byte_fails_authentication(position):
    sealer = wire.Sealer(KEY)
    data = bytearray(wire.encode([FRAME], origin=3, seq=9, sealer=sealer))
    data[position] ^= 0x01
    with pytest.raises(wire.WireError) as err:
        wire.decode(bytes(data), sealer=sealer)
    # Header bits can turn into a version/flag/type error first: still never delivered.
    assert err.value.reason in ("auth", "malformed", "not_sealed", "unknown_type")


def test_wrong_key_and_missing_encryption_are_refused():
    data = wire.encode([FRAME], origin=3, seq=9, sealer=wire.Sealer(KEY))
    with pytest.raises(wire.WireError, match="authentication") as err:
        wire.decode(data, sealer=wire.Sealer(bytes(16)))
    assert err.value.reason == "auth"
    with pytest.raises(wire.WireError) as err:
        wire.decode(EXAMPLE, sealer=wire.Sealer(KEY))
    assert err.value.reason == "not_sealed"


def test_256_bit_keys_work_and_odd_sizes_do_not():
    sealer = wire.Sealer(bytes(32))
    assert wire.decode(wire.encode([FRAME], 1, 2, sealer=sealer), sealer=sealer).frames == [FRAME]
    with pytest.raises(ValueError):
        wire.Sealer(bytes(24))


def test_sealing_interoperates_with_an_independent_aes_gcm():
    """pycryptodome, a second AES-GCM implementation, opens what gelf seals and seals what
    gelf opens: the wire format is plain AES-GCM with the header as nonce and AAD."""
    from Crypto.Cipher import AES

    sealer = wire.Sealer(KEY)
    data = wire.encode([FRAME], origin=0x0A0B0C0D, seq=77, sealer=sealer)
    header, body, tag = data[:16], data[16:-16], data[-16:]
    cipher = AES.new(KEY, AES.MODE_GCM, nonce=header[4:], mac_len=16)
    cipher.update(header)
    assert cipher.decrypt_and_verify(body, tag) == wire.pack_frames([FRAME])

    header = wire.pack_header(wire.TYPE_DATA, wire.FLAG_SEALED, 0x0A0B0C0D, 78)
    cipher = AES.new(KEY, AES.MODE_GCM, nonce=header[4:], mac_len=16)
    cipher.update(header)
    body, tag = cipher.encrypt_and_digest(wire.pack_frames([FRAME]))
    assert wire.decode(header + body + tag, sealer=sealer).frames == [FRAME]
