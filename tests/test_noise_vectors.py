"""gossip.noise against the public cacophony test vectors, byte for byte.

For each of the 8 vectors: every handshake message's ciphertext, the handshake hash on both
sides, and every transport message after split() must match exactly, and each receiver must
recover each payload.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gossip.errors import LocalProtocolError, RemoteProtocolError
from gossip.noise import CipherState, HandshakeState, hkdf, public_key_of

_LOCAL = Path(__file__).resolve().parent / "vectors" / "noise_vectors.json"
_SHARED = Path(__file__).resolve().parents[2] / "shared/vectors/noise_vectors.json"
VECTORS_PATH = _LOCAL if _LOCAL.exists() else _SHARED
VECTORS = json.loads(VECTORS_PATH.read_text())["vectors"]


def _hex(v: dict, key: str) -> bytes | None:
    return bytes.fromhex(v[key]) if key in v else None


def _states(v: dict) -> tuple[HandshakeState, HandshakeState]:
    init = HandshakeState(
        v["protocol_name"],
        initiator=True,
        prologue=bytes.fromhex(v["init_prologue"]),
        s=_hex(v, "init_static"),
        e=_hex(v, "init_ephemeral"),
        rs=_hex(v, "init_remote_static"),
        psks=[bytes.fromhex(p) for p in v.get("init_psks", [])],
    )
    resp = HandshakeState(
        v["protocol_name"],
        initiator=False,
        prologue=bytes.fromhex(v["resp_prologue"]),
        s=_hex(v, "resp_static"),
        e=_hex(v, "resp_ephemeral"),
        rs=_hex(v, "resp_remote_static"),
        psks=[bytes.fromhex(p) for p in v.get("resp_psks", [])],
    )
    return init, resp


def test_all_eight_vectors_present() -> None:
    names = sorted(v["protocol_name"] for v in VECTORS)
    assert names == sorted(
        f"Noise_{p}_25519_{c}_SHA256" for p in ("NN", "XX", "IK", "XXpsk3") for c in ("AESGCM", "ChaChaPoly")
    )


@pytest.mark.parametrize("vector", VECTORS, ids=[v["protocol_name"] for v in VECTORS])
def test_vector(vector: dict) -> None:
    init, resp = _states(vector)
    messages = vector["messages"]
    transports: tuple[tuple[CipherState, CipherState], tuple[CipherState, CipherState]] | None = None
    for i, msg in enumerate(messages):
        payload, expected = bytes.fromhex(msg["payload"]), bytes.fromhex(msg["ciphertext"])
        sender_is_init = i % 2 == 0
        if transports is None:
            sender, receiver = (init, resp) if sender_is_init else (resp, init)
            assert sender.write_message(payload) == expected, f"message {i}"
            assert receiver.read_message(expected) == payload, f"message {i}"
            if init.complete:
                assert resp.complete
                assert init.handshake_hash() == bytes.fromhex(vector["handshake_hash"])
                assert resp.handshake_hash() == bytes.fromhex(vector["handshake_hash"])
                i1, i2 = init.split()
                r1, r2 = resp.split()
                # The initiator sends with c1, the responder with c2.
                transports = ((i1, r1), (r2, i2))
        else:
            send_cs, recv_cs = transports[0] if sender_is_init else transports[1]
            assert send_cs.encrypt_with_ad(b"", payload) == expected, f"transport message {i}"
            assert recv_cs.decrypt_with_ad(b"", expected) == payload, f"transport message {i}"
    assert transports is not None, "the vector never completed its handshake"


def test_hkdf_matches_rfc5869_shape() -> None:
    # With HMAC-SHA256, Noise's HKDF output 1 is HMAC(HMAC(ck, ikm), 0x01): check by hand.
    import hashlib
    import hmac

    ck, ikm = bytes(range(32)), b"input"
    temp = hmac.new(ck, ikm, hashlib.sha256).digest()
    o1 = hmac.new(temp, b"\x01", hashlib.sha256).digest()
    o2 = hmac.new(temp, o1 + b"\x02", hashlib.sha256).digest()
    o3 = hmac.new(temp, o2 + b"\x03", hashlib.sha256).digest()
    assert hkdf(ck, ikm, 2) == (o1, o2)
    assert hkdf(ck, ikm, 3) == (o1, o2, o3)


def test_tampered_message_fails_and_poisons_state() -> None:
    v = next(v for v in VECTORS if v["protocol_name"] == "Noise_XXpsk3_25519_AESGCM_SHA256")
    init, resp = _states(v)
    m1 = init.write_message(b"")
    bad = bytearray(m1)
    bad[-1] ^= 1
    with pytest.raises(RemoteProtocolError, match="bad authentication tag"):
        resp.read_message(bytes(bad))
    with pytest.raises(LocalProtocolError, match="already failed"):
        resp.read_message(m1)


def test_wrong_psk_fails_at_message_three() -> None:
    v = next(v for v in VECTORS if v["protocol_name"] == "Noise_XXpsk3_25519_AESGCM_SHA256")
    init, _ = _states(v)
    resp = HandshakeState(
        v["protocol_name"], initiator=False, prologue=bytes.fromhex(v["resp_prologue"]),
        s=_hex(v, "resp_static"), psks=[b"\x01" * 32],
    )
    resp.read_message(init.write_message(b""))
    init.read_message(resp.write_message(b""))
    with pytest.raises(RemoteProtocolError, match="bad authentication tag"):
        resp.read_message(init.write_message(b""))


def test_out_of_turn_and_truncated_messages() -> None:
    init = HandshakeState("Noise_NN_25519_AESGCM_SHA256", initiator=True)
    resp = HandshakeState("Noise_NN_25519_AESGCM_SHA256", initiator=False)
    with pytest.raises(LocalProtocolError, match="not the peer's turn"):
        init.read_message(b"x" * 32)
    with pytest.raises(LocalProtocolError, match="not our turn"):
        resp.write_message(b"")
    with pytest.raises(RemoteProtocolError, match="too short for an ephemeral key"):
        resp.read_message(b"x" * 31)
    with pytest.raises(LocalProtocolError, match="split"):
        init.split()


def test_low_order_point_refused() -> None:
    init = HandshakeState("Noise_NN_25519_AESGCM_SHA256", initiator=True)
    resp = HandshakeState("Noise_NN_25519_AESGCM_SHA256", initiator=False)
    resp.read_message(init.write_message(b""))
    reply = bytearray(resp.write_message(b""))
    reply[:32] = bytes(32)  # the all-zero point: DH with it yields all zeros
    with pytest.raises(RemoteProtocolError, match="low-order"):
        init.read_message(bytes(reply))


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="unsupported Noise protocol"):
        HandshakeState("Noise_KK_25519_AESGCM_SHA256", initiator=True)
    with pytest.raises(ValueError, match="unsupported Noise protocol"):
        HandshakeState("Noise_XX_448_AESGCM_SHA256", initiator=True)
    with pytest.raises(ValueError, match="needs 1 PSKs, got 0"):
        HandshakeState("Noise_XXpsk3_25519_AESGCM_SHA256", initiator=True, s=bytes(32))
    with pytest.raises(ValueError, match="needs a static key"):
        HandshakeState("Noise_XX_25519_AESGCM_SHA256", initiator=True)
    with pytest.raises(ValueError, match="must know the peer's static key"):
        HandshakeState("Noise_IK_25519_AESGCM_SHA256", initiator=True, s=bytes(32))
    assert len(public_key_of(bytes(32))) == 32
