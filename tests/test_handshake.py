"""The sans-IO murmur handshake: success, every refusal reason, parsing three ways, bounds."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from gossip.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from gossip.frames import FrameDecoder, FrameEncoder
from gossip.handshake import (
    MAX_ADDRESSES,
    MAX_HANDSHAKE_MESSAGE,
    PROTOCOL_VERSION,
    SIGNATURE_DOMAIN,
    Handshake,
    PeerHello,
    check_hello,
    check_listen_address,
)
from gossip.identity import Identity, SwarmKey, format_peer_id
from gossip.noise import public_key_of

IA = Identity.from_seed(b"A" * 32)
IB = Identity.from_seed(b"B" * 32)
SWARM = SwarmKey.open("handshake-tests")
DELETE = object()


class CustomHello(Handshake):
    """A handshake whose hello fields can be overridden: a peer that speaks another dialect."""

    def __init__(self, *, fields: dict[str, Any], **kwargs: Any) -> None:
        self._fields = fields
        super().__init__(**kwargs)

    def _hello(self) -> bytes:
        hello: dict[str, Any] = {
            "version": PROTOCOL_VERSION,
            "swarm_id": self._swarm.swarm_id,
            "identity_key": self._identity.public_key,
            "signature": self._identity.sign(SIGNATURE_DOMAIN + self._static_public),
            "addresses": [],
        }
        hello.update(self._fields)
        return msgpack.packb({k: v for k, v in hello.items() if v is not DELETE}, use_bin_type=True)


def pair(**resp_kwargs: Any) -> tuple[Handshake, Handshake]:
    init = Handshake(initiator=True, identity=IA, swarm=SWARM, static_key=b"\x01" * 32, ephemeral_key=b"\x02" * 32)
    resp = Handshake(
        initiator=False, identity=IB, swarm=SWARM, listen_addrs=["10.0.0.1:4000"],
        static_key=b"\x03" * 32, ephemeral_key=b"\x04" * 32, **resp_kwargs,
    )
    return init, resp


def shuttle(init: Handshake, resp: Handshake) -> list[bytes]:
    """Pass messages back and forth until both are done; returns the transcript."""
    transcript = []
    sender, receiver = init, resp
    while not (init.done and resp.done):
        out = sender.data_to_send()
        assert out, "stalled"
        transcript.append(out)
        receiver.receive_data(out)
        sender, receiver = receiver, sender
    return transcript


def test_handshake_success_and_keys() -> None:
    init, resp = pair()
    transcript = shuttle(init, resp)
    assert [len(m) for m in transcript[:1]] == [2 + 32 + 16]  # e + tag of the empty payload
    assert len(transcript) == 4
    assert transcript[3][:3] == b"\x00\x11\x00"  # verdict: 17 bytes, accept
    a, b = init.result, resp.result
    assert a is not None and b is not None
    assert a.peer == PeerHello(
        peer_id=IB.peer_id, identity_key=IB.public_key, version=1, swarm_id=SWARM.swarm_id, addresses=("10.0.0.1:4000",)
    )
    assert b.peer == PeerHello(peer_id=IA.peer_id, identity_key=IA.public_key, version=1, swarm_id=SWARM.swarm_id, addresses=())
    assert a.handshake_hash == b.handshake_hash
    assert a.send_key == b.recv_key and a.recv_key == b.send_key and a.send_key != a.recv_key
    assert (a.send_counter, a.recv_counter, b.send_counter, b.recv_counter) == (0, 1, 1, 0)
    assert a.leftover == b.leftover == b""
    # The keys and counters work with the frame layer in both directions.
    dec = FrameDecoder(a.recv_key, first_counter=a.recv_counter)
    dec.receive_data(bytes(FrameEncoder(b.send_key, first_counter=b.send_counter).encode(b"hi")))
    assert dec.next_frame() == b"hi"


def test_handshake_is_deterministic_given_keys() -> None:
    t1 = shuttle(*pair())
    t2 = shuttle(*pair())
    assert t1 == t2


def test_responder_fed_one_byte_at_a_time() -> None:
    init, resp = pair()
    msg1 = init.data_to_send()
    for i, byte in enumerate(msg1):
        assert resp.bytes_wanted() == (2 - i if i < 2 else len(msg1) - i)
        resp.receive_data(bytes([byte]))
        out = resp.data_to_send()
        assert (out != b"") == (i == len(msg1) - 1)  # message 2 only after the last byte
    init.receive_data(out)
    msg3 = init.data_to_send()
    for i in range(len(msg3) - 1):
        resp.receive_data(msg3[i : i + 1])
        assert not resp.done and resp.data_to_send() == b""
    resp.receive_data(msg3[-1:])
    assert resp.done
    verdict = resp.data_to_send()
    for i in range(len(verdict)):
        assert not init.done
        init.receive_data(verdict[i : i + 1])
    assert init.done and init.result is not None and resp.result is not None
    assert init.result.handshake_hash == resp.result.handshake_hash


def test_trailing_bytes_become_leftover() -> None:
    init, resp = pair()
    resp.receive_data(init.data_to_send())
    init.receive_data(resp.data_to_send())
    resp.receive_data(init.data_to_send())
    first_frame = bytes(FrameEncoder(resp.result.send_key, first_counter=1).encode(b"early"))  # type: ignore[union-attr]
    init.receive_data(resp.data_to_send() + first_frame)
    assert init.done and init.result is not None
    assert init.result.leftover == first_frame
    with pytest.raises(LocalProtocolError, match="feed later bytes to the frame decoder"):
        init.receive_data(b"x")


def test_wrong_psk_refused_on_both_sides() -> None:
    init, _ = pair()
    resp = Handshake(initiator=False, identity=IB, swarm=SwarmKey(swarm_id=SWARM.swarm_id, psk=b"\x09" * 32))
    resp.receive_data(init.data_to_send())
    init.receive_data(resp.data_to_send())  # message 2 does not depend on the PSK
    with pytest.raises(AuthenticationError, match=r"^wrong swarm key \(PSK mismatch\)$"):
        resp.receive_data(init.data_to_send())
    reject = resp.data_to_send()
    assert reject == b"\x00\x1f\x01wrong swarm key (PSK mismatch)"
    with pytest.raises(AuthenticationError, match=r"^peer refused the handshake: wrong swarm key \(PSK mismatch\)$"):
        init.receive_data(reject)
    assert init.result is None and resp.result is None
    with pytest.raises(LocalProtocolError, match="already failed"):
        resp.receive_data(b"\x00")


def test_different_swarm_refused_by_initiator_at_message_two() -> None:
    init, _ = pair()
    other = SwarmKey.open("another swarm")
    resp = Handshake(initiator=False, identity=IB, swarm=other)
    resp.receive_data(init.data_to_send())
    with pytest.raises(AuthenticationError, match=f"swarm id mismatch: peer is in swarm {other.swarm_id.hex()[:16]}"):
        init.receive_data(resp.data_to_send())
    assert init.data_to_send() == b""  # our identity never went out


def test_swarm_id_mismatch_with_same_psk_refused_by_responder() -> None:
    init, resp = pair()
    liar = CustomHello(initiator=True, identity=IA, swarm=SWARM, fields={"swarm_id": b"\x07" * 32})
    resp.receive_data(liar.data_to_send())
    liar.receive_data(resp.data_to_send())
    with pytest.raises(AuthenticationError, match="swarm id mismatch: peer is in swarm 0707070707070707"):
        resp.receive_data(liar.data_to_send())
    with pytest.raises(AuthenticationError, match="peer refused the handshake: swarm id mismatch"):
        liar.receive_data(resp.data_to_send())


@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_wrong_version_refused(side: str) -> None:
    if side == "initiator":  # the responder speaks version 2; the initiator refuses it
        init, _ = pair()
        resp = CustomHello(initiator=False, identity=IB, swarm=SWARM, fields={"version": 2, "future": [1, 2]})
        resp.receive_data(init.data_to_send())
        with pytest.raises(AuthenticationError, match="^wrong protocol version: peer speaks 2, we speak 1$"):
            init.receive_data(resp.data_to_send())
    else:  # the initiator speaks version 2; the responder refuses and says why
        _, resp = pair()
        init = CustomHello(initiator=True, identity=IA, swarm=SWARM, fields={"version": 2})
        resp.receive_data(init.data_to_send())
        init.receive_data(resp.data_to_send())
        with pytest.raises(AuthenticationError, match="^wrong protocol version: peer speaks 2, we speak 1$"):
            resp.receive_data(init.data_to_send())
        with pytest.raises(AuthenticationError, match="peer refused the handshake: wrong protocol version"):
            init.receive_data(resp.data_to_send())


@pytest.mark.parametrize("field", ["signature", "identity_key"])
def test_bad_signature_refused(field: str) -> None:
    # A signature by another key, or our key claimed with someone else's signature.
    forged = IB.sign(SIGNATURE_DOMAIN + b"\x00" * 32) if field == "signature" else IB.public_key
    init, _ = pair()
    resp = CustomHello(initiator=False, identity=IA, swarm=SWARM, fields={field: forged})
    resp.receive_data(init.data_to_send())
    with pytest.raises(AuthenticationError, match="^bad signature: the identity key did not sign"):
        init.receive_data(resp.data_to_send())


def test_unexpected_peer_id_refused() -> None:
    init = Handshake(initiator=True, identity=IA, swarm=SWARM, expected_peer_id=IA.peer_id)
    resp = Handshake(initiator=False, identity=IB, swarm=SWARM)
    resp.receive_data(init.data_to_send())
    with pytest.raises(
        AuthenticationError,
        match=f"unexpected peer id: expected {format_peer_id(IA.peer_id)}, got {format_peer_id(IB.peer_id)}",
    ):
        init.receive_data(resp.data_to_send())
    init = Handshake(initiator=True, identity=IA, swarm=SWARM, expected_peer_id=IB.peer_id)
    resp = Handshake(initiator=False, identity=IB, swarm=SWARM)
    shuttle(init, resp)
    assert init.result is not None and init.result.peer.peer_id == IB.peer_id


def test_tampered_message_two_is_a_protocol_error() -> None:
    init, resp = pair()
    resp.receive_data(init.data_to_send())
    msg2 = bytearray(resp.data_to_send())
    msg2[40] ^= 1
    with pytest.raises(RemoteProtocolError, match="handshake message 2 failed: Noise decryption failed"):
        init.receive_data(bytes(msg2))


def test_forged_accept_verdict_refused() -> None:
    init, resp = pair()
    resp.receive_data(init.data_to_send())
    init.receive_data(resp.data_to_send())
    resp.receive_data(init.data_to_send())
    verdict = bytearray(resp.data_to_send())
    verdict[-1] ^= 1
    with pytest.raises(AuthenticationError, match="accept verdict failed authentication"):
        init.receive_data(bytes(verdict))


def test_malformed_verdict() -> None:
    init, resp = pair()
    resp.receive_data(init.data_to_send())
    init.receive_data(resp.data_to_send())
    with pytest.raises(RemoteProtocolError, match=r"malformed handshake verdict \(3 bytes, kind 7\)"):
        init.receive_data(b"\x00\x03\x07ab")


def test_message_length_bounds_checked_from_prefix() -> None:
    _, resp = pair()
    with pytest.raises(RemoteProtocolError, match=f"handshake message of 65535 bytes .*allowed 1..{MAX_HANDSHAKE_MESSAGE}"):
        resp.receive_data(b"\xff\xff")
    _, resp = pair()
    with pytest.raises(RemoteProtocolError, match="handshake message of 0 bytes"):
        resp.receive_data(b"\x00\x00")
    init, resp = pair()
    resp.receive_data(init.data_to_send())
    init.receive_data(resp.data_to_send())
    with pytest.raises(RemoteProtocolError, match=r"handshake message of 202 bytes while in state 'await verdict'"):
        init.receive_data(b"\x00\xca")


def test_short_message_one() -> None:
    _, resp = pair()
    with pytest.raises(RemoteProtocolError, match="handshake message 1 failed: Noise message too short"):
        resp.receive_data(b"\x00\x05hello")


def test_overfeeding_is_a_local_error() -> None:
    _, resp = pair()
    with pytest.raises(LocalProtocolError, match="read at most bytes_wanted"):
        resp.receive_data(b"\x00\x30" + b"x" * 100_000)


# ---- check_hello, the pure decision -----------------------------------------------------------

STATIC = public_key_of(b"\x05" * 32)


def hello(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "version": 1,
        "swarm_id": SWARM.swarm_id,
        "identity_key": IA.public_key,
        "signature": IA.sign(SIGNATURE_DOMAIN + STATIC),
        "addresses": ["127.0.0.1:1"],
    }
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not DELETE}, use_bin_type=True)


def test_check_hello_accepts_and_ignores_unknown_keys() -> None:
    got = check_hello(hello(extra={"x": 1}), remote_static=STATIC, swarm=SWARM, expected_peer_id=None)
    assert got == PeerHello(IA.peer_id, IA.public_key, 1, SWARM.swarm_id, ("127.0.0.1:1",))


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\xc1", "not a bounded msgpack map"),
        (msgpack.packb([1, 2]), "expected a map, got list"),
        (hello(version=True), "'version' must be int, got bool"),
        (hello(version=DELETE), "'version' must be int, got NoneType"),
        (hello(swarm_id=b"short"), "'swarm_id' must be 32 bytes"),
        (hello(identity_key="text"), "'identity_key' must be bytes, got str"),
        (hello(signature=b"\x00" * 63), "'signature' must be 64 bytes"),
        (hello(addresses="127.0.0.1:1"), "'addresses' must be list, got str"),
        (hello(addresses=["127.0.0.1:1"] * (MAX_ADDRESSES + 1)), "not a bounded msgpack map"),
        (hello(addresses=["nope"]), "needs a port"),
        (hello(addresses=[7]), "listen address must be"),
        (hello(addresses=["x" * 300 + ":1"]), "not a bounded msgpack map"),
        (msgpack.packb({1: 2}), "not a bounded msgpack map"),
    ],
)
def test_check_hello_malformed(payload: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message) as info:
        check_hello(payload, remote_static=STATIC, swarm=SWARM, expected_peer_id=None)
    assert type(info.value) is RemoteProtocolError  # malformed, not an authentication verdict


def test_check_hello_signature_is_over_this_static_key() -> None:
    with pytest.raises(AuthenticationError, match="bad signature"):
        check_hello(hello(), remote_static=public_key_of(b"\x06" * 32), swarm=SWARM, expected_peer_id=None)


@pytest.mark.parametrize("text", ["127.0.0.1:4000", "[::1]:1", "[2001:db8::7]:65535", "node-1.example.org:80", "a:1"])
def test_listen_address_valid(text: str) -> None:
    assert check_listen_address(text) == text


@pytest.mark.parametrize(
    "text",
    ["", "host", "host:", "host:0", "host:65536", "host:+80", "host:080", ":80", "::1:80", "[::1]", "[nope]:80",
     "[::1:80", "-bad-.org:80", "sp ace:80", "é:80", "h" * 300 + ":80", None, b"127.0.0.1:80"],
)
def test_listen_address_invalid(text: object) -> None:
    with pytest.raises(ValueError):
        check_listen_address(text)


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="at most 8 listen addresses"):
        Handshake(initiator=True, identity=IA, swarm=SWARM, listen_addrs=["127.0.0.1:1"] * 9)
    with pytest.raises(ValueError, match="not one string"):
        Handshake(initiator=True, identity=IA, swarm=SWARM, listen_addrs="127.0.0.1:1")
    with pytest.raises(ValueError, match="needs a port"):
        Handshake(initiator=True, identity=IA, swarm=SWARM, listen_addrs=["127.0.0.1"])
    with pytest.raises(ValueError, match="32-byte peer id"):
        Handshake(initiator=True, identity=IA, swarm=SWARM, expected_peer_id=b"x")
    with pytest.raises(ValueError, match="SwarmKey"):
        Handshake(initiator=True, identity=IA, swarm="swarm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Identity"):
        Handshake(initiator=True, identity=None, swarm=SWARM)  # type: ignore[arg-type]
