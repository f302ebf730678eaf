"""Keys and tokens from the command line and from files."""

import os

import pytest

from gelf import keys


def test_parse_128_and_256_bit_keys():
    assert keys.parse_key("b04c96f0e62fd14424e7e58e3d8ba957") == bytes.fromhex("b04c96f0e62fd14424e7e58e3d8ba957")
    assert len(keys.parse_key("ab" * 32)) == 32


@pytest.mark.parametrize("text, words", [("abc", "32 or 64 hex digits"), ("zz" * 16, "not hexadecimal"),
                                         ("ab" * 24, "32 or 64 hex digits")])
def test_bad_keys_are_explained(text, words):
    with pytest.raises(keys.SecretError, match=words):
        keys.parse_key(text)


def test_generated_keys_are_random_128_bit():
    a, b = keys.generate_key(), keys.generate_key()
    assert len(a) == 16 and a != b


def test_world_readable_secret_file_is_refused(tmp_path):
    path = tmp_path / "key"
    path.write_text("ab" * 16 + "\n")
    os.chmod(path, 0o644)
    with pytest.raises(keys.SecretError, match="chmod 600"):
        keys.read_secret_file(str(path), "key")
    os.chmod(path, 0o600)
    assert keys.read_secret_file(str(path), "key") == "ab" * 16


def test_missing_and_empty_files_are_explained(tmp_path):
    with pytest.raises(keys.SecretError, match="cannot read key file"):
        keys.read_secret_file(str(tmp_path / "nope"), "key")
    empty = tmp_path / "empty"
    empty.write_text("")
    os.chmod(empty, 0o600)
    with pytest.raises(keys.SecretError, match="is empty"):
        keys.read_secret_file(str(empty), "token")
