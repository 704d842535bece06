"""Identity keys, peer ids, swarm keys and their files."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gossip.identity import (
    Identity,
    SwarmKey,
    format_peer_id,
    generate_swarm_secret,
    load_swarm_secret,
    parse_peer_id,
    peer_id_of,
    save_swarm_secret,
    verify_signature,
)


def test_identity_keys_and_peer_id() -> None:
    ident = Identity.generate()
    assert len(ident.public_key) == 32
    assert ident.peer_id == hashlib.sha256(ident.public_key).digest()
    assert peer_id_of(ident.public_key) == ident.peer_id
    assert Identity.generate().peer_id != ident.peer_id


def test_from_seed_is_deterministic_rfc8032() -> None:
    # RFC 8032 section 7.1, TEST 1: secret key 9d61...7f60 has public key d75a...511a.
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    ident = Identity.from_seed(seed)
    assert ident.public_key.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert ident.sign(b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )


def test_sign_and_verify() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"data")
    assert len(sig) == 64
    assert verify_signature(ident.public_key, sig, b"data") is True
    assert verify_signature(ident.public_key, sig, b"datA") is False
    assert verify_signature(Identity.generate().public_key, sig, b"data") is False
    bad = bytearray(sig)
    bad[0] ^= 1
    assert verify_signature(ident.public_key, bytes(bad), b"data") is False
    assert verify_signature(ident.public_key[:31], sig, b"data") is False
    assert verify_signature(ident.public_key, sig[:63], b"data") is False
    assert verify_signature("not bytes", sig, b"data") is False  # type: ignore[arg-type]


def test_format_peer_id_known_values() -> None:
    assert format_peer_id(bytes(32)) == "a" * 52
    # 256 one-bits: 51 full groups "7", then one bit padded with zeros: 0b10000 = "q".
    assert format_peer_id(b"\xff" * 32) == "7" * 51 + "q"
    with pytest.raises(ValueError, match="32 bytes"):
        format_peer_id(b"\x00" * 31)


def test_parse_peer_id_roundtrip_and_garbage() -> None:
    pid = Identity.generate().peer_id
    text = format_peer_id(pid)
    assert len(text) == 52 and text == text.lower() and "=" not in text
    assert parse_peer_id(text) == pid
    assert parse_peer_id(text.upper()) == pid
    for bad in ["", "a" * 51, "a" * 53, "a" * 51 + "1", "a" * 51 + "b", "é" * 52, "a" * 50 + "==", 42]:
        with pytest.raises(ValueError):
            parse_peer_id(bad)  # type: ignore[arg-type]


def test_identity_save_load(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "id.pem"
    ident.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = Identity.load(path)
    assert loaded.public_key == ident.public_key
    assert verify_signature(ident.public_key, loaded.sign(b"x"), b"x")
    with pytest.raises(FileExistsError):
        Identity.generate().save(path)
    assert Identity.load(path).public_key == ident.public_key  # not clobbered
    assert "PRIVATE" not in repr(ident) and format_peer_id(ident.peer_id) in repr(ident)


def test_identity_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Identity.load(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"hello\n")
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        Identity.load(garbage)
    other = tmp_path / "x25519.pem"
    other.write_bytes(
        X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ValueError, match="murmur identities are Ed25519"):
        Identity.load(other)
    huge = tmp_path / "huge.pem"
    huge.write_bytes(b"x" * 20000)
    with pytest.raises(ValueError, match="too large"):
        Identity.load(huge)


def test_swarm_keys_derivation() -> None:
    # The documented derivation (PROTOCOL.md), written out independently of the code.
    secret = hashlib.sha256(b"murmur/v1 open swarm secret\x00" + b"demo").digest()
    key = SwarmKey.open("demo")
    assert key.psk == hashlib.sha256(b"murmur/v1 swarm psk\x00" + secret).digest()
    assert key.swarm_id == hashlib.sha256(b"murmur/v1 swarm id\x00" + secret).digest()
    assert key == SwarmKey.private(secret)
    assert SwarmKey.open("demo") == key
    assert SwarmKey.open("demo2") != key
    assert key.psk.hex() not in repr(key)
    with pytest.raises(ValueError, match="1 to 256 bytes"):
        SwarmKey.open("")
    with pytest.raises(ValueError, match="32 bytes"):
        SwarmKey.private(b"short")
    with pytest.raises(ValueError, match="psk must be 32 bytes"):
        SwarmKey(swarm_id=bytes(32), psk=b"")


def test_swarm_secret_files(tmp_path: Path) -> None:
    secret = generate_swarm_secret()
    assert len(secret) == 32 and generate_swarm_secret() != secret
    path = tmp_path / "swarm.key"
    save_swarm_secret(secret, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text() == f"murmur-swarm-secret-v1:{secret.hex()}\n"
    assert load_swarm_secret(path) == secret
    with pytest.raises(FileExistsError):
        save_swarm_secret(generate_swarm_secret(), path)
    assert load_swarm_secret(path) == secret
    with pytest.raises(ValueError, match="32 bytes"):
        save_swarm_secret(b"x", tmp_path / "other.key")
    assert not (tmp_path / "other.key").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "expected a line starting with"),
        (b"murmur-swarm-secret-v1:abcd\n", "64 lowercase hex digits"),
        (b"murmur-swarm-secret-v1:" + b"G" * 64 + b"\n", "64 lowercase hex digits"),
        (b"murmur-swarm-secret-v2:" + b"0" * 64 + b"\n", "expected a line starting with"),
        (b"\xff\xfe", "ASCII text"),
    ],
)
def test_load_swarm_secret_malformed(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_swarm_secret(path)
