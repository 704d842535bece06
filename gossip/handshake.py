"""The murmur handshake, without I/O: Noise_XXpsk3_25519_AESGCM_SHA256 plus a verdict.

Four messages, each sent as a u16 big-endian length followed by that many bytes:

    1. initiator -> responder   Noise XX message 1 (e), empty payload
    2. responder -> initiator   Noise XX message 2 (e, ee, s, es), payload = responder's hello
    3. initiator -> responder   Noise XX message 3 (s, se, psk), payload = initiator's hello
    4. responder -> initiator   verdict: 0x00 + AEAD tag (accept) or 0x01 + UTF-8 reason (reject)

The PSK (the swarm key) enters only at the end of message 3, so a responder learns of a wrong
swarm key when message 3's payload fails to decrypt. The verdict tells the initiator, which
otherwise would believe the connection open until its first read. The accept tag is AES-GCM
under the responder's sending key with nonce 0 over an empty plaintext and the handshake hash as
associated data, so it proves the responder derived the same keys; its frames start at nonce 1.

A hello is a msgpack map (PROTOCOL.md lists every field). It binds the node's long-term Ed25519
identity to this connection's Noise static key by a signature over SIGNATURE_DOMAIN + that key.
Deciding whether a hello is acceptable is the plain function `check_hello`; `Handshake` is the
state machine, fed bytes, returning bytes, in the h11 style.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Sequence

import msgpack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gossip.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from gossip.identity import Identity, SwarmKey, format_peer_id, peer_id_of, verify_signature
from gossip.noise import HandshakeState, public_key_of

PROTOCOL_VERSION = 1  # bumped on any incompatible change to the handshake, frames or messages
PROTOCOL_NAME = "Noise_XXpsk3_25519_AESGCM_SHA256"
# Independent of PROTOCOL_VERSION on purpose: peers of different versions still complete the
# Noise messages and learn each other's version, so they fail with "wrong protocol version"
# rather than an opaque decryption error.
PROLOGUE = b"murmur/noise"
SIGNATURE_DOMAIN = b"murmur/v1 noise static key\x00"
LENGTH_PREFIX = 2  # u16 big-endian before every handshake message
MAX_HANDSHAKE_MESSAGE = 4096  # Noise message 2 or 3 with a maximal hello is ~2.3 KiB
MAX_ADDRESSES = 8  # listen addresses a hello may carry
MAX_ADDRESS_LEN = 262  # "[" + 45-char IPv6 or 253-char host name + "]:65535"
MAX_REJECT_REASON = 200  # UTF-8 bytes of a reject reason
VERDICT_ACCEPT = 0x00
VERDICT_REJECT = 0x01
REASON_PSK_MISMATCH = "wrong swarm key (PSK mismatch)"
# Bytes the state machine may hold before it has to be drained (guards a pump that overfeeds).
_MAX_BUFFER = LENGTH_PREFIX + MAX_HANDSHAKE_MESSAGE + (1 << 16)
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class PeerHello:
    """What the handshake proved about the peer."""

    peer_id: bytes  # sha256 of identity_key
    identity_key: bytes  # Ed25519 public key; it signed this connection's Noise static key
    version: int  # the peer's PROTOCOL_VERSION (equal to ours, or the handshake fails)
    swarm_id: bytes  # the swarm the peer is in (equal to ours, or the handshake fails)
    addresses: tuple[str, ...]  # listen addresses the peer announced: "host:port" / "[v6]:port"


@dataclass(frozen=True)
class HandshakeResult:
    """Everything the secure channel needs once the handshake has succeeded."""

    peer: PeerHello
    handshake_hash: bytes  # Noise h: unique to this connection, both sides agree on it
    send_key: bytes  # AES-256-GCM key for frames we send
    recv_key: bytes  # AES-256-GCM key for frames we receive
    send_counter: int  # counter of our first frame (1 for the responder: the verdict used 0)
    recv_counter: int  # counter of the peer's first frame
    leftover: bytes  # bytes received after the last handshake message: the first frames


# ---- addresses ----------------------------------------------------------------------------


def check_listen_address(text: object) -> str:
    """Return `text` if it is "host:port" or "[ipv6]:port" (port 1..65535); ValueError if not."""
    if not isinstance(text, str) or not text.isascii() or not 3 <= len(text) <= MAX_ADDRESS_LEN:
        raise ValueError(f"listen address must be 'host:port' or '[v6]:port' of at most {MAX_ADDRESS_LEN} ASCII chars: {text!r}")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or len(port) > 5 or not 1 <= int(port) <= 65535 or port != str(int(port)):
        raise ValueError(f"listen address needs a port 1..65535 after the last ':': {text!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"IPv6 listen address must be '[addr]:port': {text!r}")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"not an IPv6 address inside the brackets: {text!r}") from None
    elif not _HOST_RE.match(host):
        raise ValueError(f"listen address host must be an IPv4 address or DNS name: {text!r}")
    return text


# ---- hellos -------------------------------------------------------------------------------


def make_hello(identity: Identity, static_public_key: bytes, swarm: SwarmKey, addresses: Sequence[str]) -> bytes:
    """Our hello: msgpack map signed over the Noise static key of this connection."""
    return msgpack.packb(
        {
            "version": PROTOCOL_VERSION,
            "swarm_id": swarm.swarm_id,
            "identity_key": identity.public_key,
            "signature": identity.sign(SIGNATURE_DOMAIN + static_public_key),
            "addresses": list(addresses),
        },
        use_bin_type=True,
    )


def _field(hello: dict, key: str, kind: type, size: int | None = None) -> object:
    value = hello.get(key)
    # `type(...) is` and not isinstance: msgpack's True must not pass as the integer 1.
    if type(value) is not kind:
        raise RemoteProtocolError(f"malformed hello: {key!r} must be {kind.__name__}, got {type(value).__name__}")
    if size is not None and len(value) != size:  # type: ignore[arg-type]
        raise RemoteProtocolError(f"malformed hello: {key!r} must be {size} bytes")
    return value


def check_hello(
    payload: bytes, *, remote_static: bytes, swarm: SwarmKey, expected_peer_id: bytes | None
) -> PeerHello:
    """Decide whether a peer's hello is acceptable. Raises AuthenticationError or RemoteProtocolError.

    Checks, in order: a msgpack map; version (first, so a newer peer whose fields changed is
    told "wrong protocol version"); swarm id; identity key and signature over the Noise static
    key; the expected peer id; listen addresses. Unknown keys are ignored (compatible additions).
    """
    try:
        hello = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, max_str_len=MAX_ADDRESS_LEN, max_bin_len=64,
            max_array_len=MAX_ADDRESSES, max_map_len=32, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types for garbage: all mean "malformed"
        raise RemoteProtocolError(f"malformed hello: not a bounded msgpack map ({exc})") from None
    if type(hello) is not dict:
        raise RemoteProtocolError(f"malformed hello: expected a map, got {type(hello).__name__}")
    version = _field(hello, "version", int)
    if version != PROTOCOL_VERSION:
        raise AuthenticationError(f"wrong protocol version: peer speaks {version}, we speak {PROTOCOL_VERSION}")
    swarm_id = _field(hello, "swarm_id", bytes, 32)
    if swarm_id != swarm.swarm_id:
        raise AuthenticationError(
            f"swarm id mismatch: peer is in swarm {swarm_id.hex()[:16]}..., we are in {swarm.swarm_id.hex()[:16]}..."  # type: ignore[union-attr]
        )
    identity_key = _field(hello, "identity_key", bytes, 32)
    signature = _field(hello, "signature", bytes, 64)
    if not verify_signature(identity_key, signature, SIGNATURE_DOMAIN + remote_static):  # type: ignore[arg-type]
        raise AuthenticationError("bad signature: the identity key did not sign this connection's Noise static key")
    peer_id = peer_id_of(identity_key)  # type: ignore[arg-type]
    if expected_peer_id is not None and peer_id != expected_peer_id:
        raise AuthenticationError(
            f"unexpected peer id: expected {format_peer_id(expected_peer_id)}, got {format_peer_id(peer_id)}"
        )
    addresses = _field(hello, "addresses", list)
    try:
        checked = tuple(check_listen_address(a) for a in addresses)  # type: ignore[union-attr]
    except ValueError as exc:
        raise RemoteProtocolError(f"malformed hello: {exc}") from None
    return PeerHello(
        peer_id=peer_id, identity_key=identity_key, version=version, swarm_id=swarm_id, addresses=checked  # type: ignore[arg-type]
    )


# ---- the state machine --------------------------------------------------------------------

# state -> (what we wait for next, largest body accepted). All transitions live in Handshake.
_AWAIT_MSG1, _AWAIT_MSG2, _AWAIT_MSG3, _AWAIT_VERDICT, _DONE, _FAILED = (
    "await message 1", "await message 2", "await message 3", "await verdict", "done", "failed",
)
_MAX_BODY = {
    _AWAIT_MSG1: MAX_HANDSHAKE_MESSAGE,
    _AWAIT_MSG2: MAX_HANDSHAKE_MESSAGE,
    _AWAIT_MSG3: MAX_HANDSHAKE_MESSAGE,
    _AWAIT_VERDICT: 1 + MAX_REJECT_REASON,
}


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(LENGTH_PREFIX, "big") + body


class Handshake:
    """One side of a murmur handshake. Feed `receive_data`, send `data_to_send()`, until `done`.

    `receive_data` raises AuthenticationError / RemoteProtocolError when the peer fails; a
    responder then has a reject verdict in `data_to_send()` that the pump should try to send
    before closing. `static_key`/`ephemeral_key` (raw X25519 private bytes) are for tests; by
    default each connection gets fresh ones.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        identity: Identity,
        swarm: SwarmKey,
        listen_addrs: Sequence[str] = (),
        expected_peer_id: bytes | None = None,
        static_key: bytes | None = None,
        ephemeral_key: bytes | None = None,
    ) -> None:
        if not isinstance(identity, Identity):
            raise ValueError("identity must be a gossip.identity.Identity")
        if not isinstance(swarm, SwarmKey):
            raise ValueError("swarm must be a gossip.identity.SwarmKey (SwarmKey.open(name) or .private(secret))")
        if isinstance(listen_addrs, str):
            raise ValueError("listen_addrs is a sequence of 'host:port' strings, not one string")
        if len(listen_addrs) > MAX_ADDRESSES:
            raise ValueError(f"at most {MAX_ADDRESSES} listen addresses fit in a hello")
        self._addresses = tuple(check_listen_address(a) for a in listen_addrs)
        if expected_peer_id is not None and (not isinstance(expected_peer_id, bytes) or len(expected_peer_id) != 32):
            raise ValueError("expected_peer_id is a 32-byte peer id (gossip.identity.parse_peer_id)")
        if static_key is None:
            static_key = X25519PrivateKey.generate().private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
        self.initiator = initiator
        self._identity = identity
        self._swarm = swarm
        self._expected = expected_peer_id
        self._static_public = public_key_of(static_key)
        self._noise = HandshakeState(
            PROTOCOL_NAME, initiator=initiator, prologue=PROLOGUE, s=static_key, e=ephemeral_key, psks=[swarm.psk]
        )
        self._out = bytearray()
        self._buf = bytearray()
        self._peer: PeerHello | None = None
        self.result: HandshakeResult | None = None  # set once `done`
        if initiator:
            self._out += _frame(self._noise.write_message(b""))
            self.state = _AWAIT_MSG2
        else:
            self.state = _AWAIT_MSG1

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def bytes_wanted(self) -> int:
        """Bytes still missing from the message we are waiting for (read at most this many)."""
        if self.state not in _MAX_BODY:
            return 0
        if len(self._buf) < LENGTH_PREFIX:
            return LENGTH_PREFIX - len(self._buf)
        return LENGTH_PREFIX + int.from_bytes(self._buf[:LENGTH_PREFIX], "big") - len(self._buf)

    def receive_data(self, data: bytes) -> None:
        if self.state == _FAILED:
            raise LocalProtocolError("this handshake already failed")
        if self.state == _DONE:
            raise LocalProtocolError("the handshake is done: feed later bytes to the frame decoder")
        if len(self._buf) + len(data) > _MAX_BUFFER:
            raise LocalProtocolError("receive_data() far beyond bytes_wanted(): read at most bytes_wanted()")
        self._buf += data
        try:
            while self.state in _MAX_BODY and len(self._buf) >= LENGTH_PREFIX:
                length = int.from_bytes(self._buf[:LENGTH_PREFIX], "big")
                if not 1 <= length <= _MAX_BODY[self.state]:
                    raise RemoteProtocolError(
                        f"handshake message of {length} bytes while in state {self.state!r} "
                        f"(allowed 1..{_MAX_BODY[self.state]})"
                    )
                if len(self._buf) < LENGTH_PREFIX + length:
                    return
                body = bytes(self._buf[LENGTH_PREFIX : LENGTH_PREFIX + length])
                del self._buf[: LENGTH_PREFIX + length]
                self._on_message(body)
        except RemoteProtocolError:
            self.state = _FAILED
            self._buf.clear()
            raise
        if self.state == _DONE:
            self._finish()

    # -- transitions ------------------------------------------------------------------------

    def _hello(self) -> bytes:
        return make_hello(self._identity, self._static_public, self._swarm, self._addresses)

    def _check(self, payload: bytes) -> PeerHello:
        assert self._noise.rs is not None
        return check_hello(payload, remote_static=self._noise.rs, swarm=self._swarm, expected_peer_id=self._expected)

    def _on_message(self, body: bytes) -> None:
        if self.state == _AWAIT_MSG1:
            # Message 1's payload is reserved: v1 sends it empty and ignores its contents.
            self._read(body, "message 1")
            self._out += _frame(self._noise.write_message(self._hello()))
            self.state = _AWAIT_MSG3
        elif self.state == _AWAIT_MSG2:
            self._peer = self._check(self._read(body, "message 2"))
            self._out += _frame(self._noise.write_message(self._hello()))
            self.state = _AWAIT_VERDICT
        elif self.state == _AWAIT_MSG3:
            self._on_message3(body)
        elif self.state == _AWAIT_VERDICT:
            self._on_verdict(body)

    def _read(self, body: bytes, what: str) -> bytes:
        try:
            return self._noise.read_message(body)
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"handshake {what} failed: {exc}") from None

    def _reject(self, reason: str) -> None:
        self._out += _frame(bytes([VERDICT_REJECT]) + reason.encode("utf-8")[:MAX_REJECT_REASON])

    def _on_message3(self, body: bytes) -> None:
        try:
            payload = self._noise.read_message(body)
        except RemoteProtocolError:
            # The payload is the first thing encrypted under a key that mixes in the PSK.
            self._reject(REASON_PSK_MISMATCH)
            raise AuthenticationError(REASON_PSK_MISMATCH) from None
        try:
            self._peer = self._check(payload)
        except RemoteProtocolError as exc:
            self._reject(str(exc))
            raise
        _, c2 = self._noise.split()
        self._out += _frame(bytes([VERDICT_ACCEPT]) + c2.encrypt_with_ad(self._noise.handshake_hash(), b""))
        self.state = _DONE

    def _on_verdict(self, body: bytes) -> None:
        if body[0] == VERDICT_REJECT:
            reason = body[1:].decode("utf-8", errors="replace")
            raise AuthenticationError(f"peer refused the handshake: {reason}")
        if body[0] != VERDICT_ACCEPT or len(body) != 17:
            raise RemoteProtocolError(f"malformed handshake verdict ({len(body)} bytes, kind {body[0]})")
        _, c2 = self._noise.split()
        try:
            c2.decrypt_with_ad(self._noise.handshake_hash(), body[1:])
        except RemoteProtocolError:
            raise AuthenticationError("the peer's accept verdict failed authentication") from None
        self.state = _DONE

    def _finish(self) -> None:
        c1, c2 = self._noise.split()
        assert c1.k is not None and c2.k is not None and self._peer is not None
        mine, theirs = (c1, c2) if self.initiator else (c2, c1)
        self.result = HandshakeResult(
            peer=self._peer,
            handshake_hash=self._noise.handshake_hash(),
            send_key=mine.k,  # type: ignore[arg-type]
            recv_key=theirs.k,  # type: ignore[arg-type]
            send_counter=0 if self.initiator else 1,
            recv_counter=1 if self.initiator else 0,
            leftover=bytes(self._buf),
        )
        self._buf.clear()
