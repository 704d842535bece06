"""The Noise Protocol Framework, revision 34, without I/O.

Implements section 5 of the spec (CipherState, SymmetricState, HandshakeState) for the
handshake patterns NN, XX and IK with the `pskN` modifier (section 9), DH function 25519,
ciphers AESGCM and ChaChaPoly, and hash SHA256. `HandshakeState.write_message(payload)` returns
the bytes to send; `read_message(message)` returns the peer's payload. Nothing here does I/O or
knows what carries the messages.

Errors: a message that fails authentication or is malformed raises `RemoteProtocolError`;
using the state machine out of turn raises `LocalProtocolError`. cryptography's exceptions are
translated here, at the one place that calls it.

Ephemeral (and static) keys can be injected as raw private bytes, which is how
`tests/test_noise_vectors.py` reproduces the published test vectors byte for byte.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from gossip.errors import LocalProtocolError, RemoteProtocolError

DHLEN = 32  # 25519 public keys and shared secrets
HASHLEN = 32  # SHA256
TAGLEN = 16  # both AEADs
MAX_MESSAGE_LEN = 65535  # spec section 3: every Noise message fits in 65535 bytes
MAX_NONCE = 2**64 - 1  # reserved by the spec (used only by rekey), never used for a message
PSK_LEN = 32

# Handshake patterns (spec section 7): (initiator pre-message, responder pre-message, messages).
# Message i is sent by the initiator when i is even.
_PATTERNS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]] = {
    "NN": ((), (), (("e",), ("e", "ee"))),
    "XX": ((), (), (("e",), ("e", "ee", "s", "es"), ("s", "se"))),
    "IK": ((), ("s",), (("e", "es", "s", "ss"), ("e", "ee", "se"))),
}
_NAME_RE = re.compile(r"^Noise_([A-Z]+)((?:psk[0-9]+)(?:\+psk[0-9]+)*)?_25519_(AESGCM|ChaChaPoly)_SHA256$")


def _nonce_bytes(cipher: str, n: int) -> bytes:
    # Spec section 12.3 (ChaChaPoly: 32 zero bits + little-endian n) and 12.4 (AESGCM: 32 zero
    # bits + big-endian n).
    if cipher == "AESGCM":
        return b"\x00\x00\x00\x00" + n.to_bytes(8, "big")
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


def _aead(cipher: str, key: bytes) -> AESGCM | ChaCha20Poly1305:
    return AESGCM(key) if cipher == "AESGCM" else ChaCha20Poly1305(key)


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def hkdf(chaining_key: bytes, input_key_material: bytes, num_outputs: int) -> tuple[bytes, ...]:
    """Spec section 4.3: HMAC-based HKDF returning 2 or 3 outputs of HASHLEN bytes."""
    temp_key = _hmac(chaining_key, input_key_material)
    out1 = _hmac(temp_key, b"\x01")
    out2 = _hmac(temp_key, out1 + b"\x02")
    if num_outputs == 2:
        return out1, out2
    return out1, out2, _hmac(temp_key, out2 + b"\x03")


class CipherState:
    """Spec section 5.1: a key (or none) and a 64-bit counter nonce."""

    def __init__(self, cipher: str) -> None:
        if cipher not in ("AESGCM", "ChaChaPoly"):
            raise ValueError(f"cipher must be 'AESGCM' or 'ChaChaPoly', not {cipher!r}")
        self.cipher = cipher
        self.k: bytes | None = None
        self.n = 0
        self._aead: AESGCM | ChaCha20Poly1305 | None = None

    def initialize_key(self, key: bytes | None) -> None:
        self.k = key
        self.n = 0
        self._aead = None if key is None else _aead(self.cipher, key)

    def has_key(self) -> bool:
        return self.k is not None

    def set_nonce(self, nonce: int) -> None:
        self.n = nonce

    def _next_nonce(self) -> bytes:
        if self.n >= MAX_NONCE:
            raise LocalProtocolError("Noise nonce exhausted: this cipher state must not be used again")
        nonce = _nonce_bytes(self.cipher, self.n)
        self.n += 1
        return nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return bytes(plaintext)
        return self._aead.encrypt(self._next_nonce(), bytes(plaintext), ad)

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return bytes(ciphertext)
        if self.n >= MAX_NONCE:
            raise LocalProtocolError("Noise nonce exhausted: this cipher state must not be used again")
        try:
            plaintext = self._aead.decrypt(_nonce_bytes(self.cipher, self.n), bytes(ciphertext), ad)
        except InvalidTag:
            # The spec: a failed decryption leaves n unchanged (the caller may abort or retry).
            raise RemoteProtocolError("Noise decryption failed: bad authentication tag") from None
        self.n += 1
        return plaintext


class SymmetricState:
    """Spec section 5.2: the chaining key, handshake hash and current CipherState."""

    def __init__(self, protocol_name: str, cipher: str) -> None:
        name = protocol_name.encode("ascii")
        self.h = name + bytes(HASHLEN - len(name)) if len(name) <= HASHLEN else hashlib.sha256(name).digest()
        self.ck = self.h
        self.cipher_state = CipherState(cipher)

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, input_key_material, 2)
        self.cipher_state.initialize_key(temp_k)  # HASHLEN is 32: no truncation needed

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        self.ck, temp_h, temp_k = hkdf(self.ck, input_key_material, 3)
        self.mix_hash(temp_h)
        self.cipher_state.initialize_key(temp_k)

    def get_handshake_hash(self) -> bytes:
        return self.h

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher_state.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher_state.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = hkdf(self.ck, b"", 2)
        c1, c2 = CipherState(self.cipher_state.cipher), CipherState(self.cipher_state.cipher)
        c1.initialize_key(temp_k1)
        c2.initialize_key(temp_k2)
        return c1, c2


def _private_key(raw: bytes | None, what: str) -> X25519PrivateKey | None:
    if raw is None:
        return None
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != DHLEN:
        raise ValueError(f"{what} must be {DHLEN} raw X25519 private key bytes")
    return X25519PrivateKey.from_private_bytes(bytes(raw))


def public_key_of(private_key: bytes) -> bytes:
    """The raw X25519 public key of raw private key bytes."""
    key = _private_key(private_key, "private_key")
    assert key is not None
    return _public_bytes(key)


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        # cryptography refuses low-order points (an all-zero shared secret): a hostile key.
        raise RemoteProtocolError("Noise DH failed: the peer's public key is a low-order point") from None


class HandshakeState:
    """Spec section 5.3: runs one handshake pattern, then `split()`s into transport ciphers.

    `s`, `e`: our static and ephemeral private keys (raw 32 bytes); `e` is generated when
    needed unless given. `rs`, `re`: the peer's public keys when known in advance (IK's
    responder static). `psks`: one 32-byte PSK per `psk` modifier, in the order they are used.
    """

    def __init__(
        self,
        protocol_name: str,
        *,
        initiator: bool,
        prologue: bytes = b"",
        s: bytes | None = None,
        e: bytes | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
    ) -> None:
        match = _NAME_RE.match(protocol_name)
        if match is None or match.group(1) not in _PATTERNS:
            raise ValueError(
                f"unsupported Noise protocol {protocol_name!r}: patterns NN, XX, IK (+pskN), "
                "DH 25519, ciphers AESGCM or ChaChaPoly, hash SHA256"
            )
        base, modifiers, cipher = match.group(1), match.group(2), match.group(3)
        pre_i, pre_r, messages = _PATTERNS[base]
        patterns = [list(m) for m in messages]
        psk_positions = [int(m[3:]) for m in modifiers.split("+")] if modifiers else []
        for pos in psk_positions:
            # Spec section 9.2: psk0 goes first in message 1, pskN (N>=1) last in message N.
            if pos > len(patterns):
                raise ValueError(f"{protocol_name}: psk{pos} names a message the pattern lacks")
            if pos == 0:
                patterns[0].insert(0, "psk")
            else:
                patterns[pos - 1].append("psk")
        if len(psks) != len(psk_positions):
            raise ValueError(f"{protocol_name} needs {len(psk_positions)} PSKs, got {len(psks)}")
        for psk in psks:
            if not isinstance(psk, (bytes, bytearray)) or len(psk) != PSK_LEN:
                raise ValueError(f"each PSK must be {PSK_LEN} bytes")

        self.protocol_name = protocol_name
        self.initiator = initiator
        self.psk_mode = bool(psk_positions)
        self._psks = [bytes(p) for p in psks]
        self._s = _private_key(s, "s")
        self._e = _private_key(e, "e")
        self.rs = None if rs is None else bytes(rs)
        self.re = None if re is None else bytes(re)
        self._patterns = patterns
        self._index = 0  # next message in the pattern
        self._split: tuple[CipherState, CipherState] | None = None
        self._failed = False  # a failed message leaves the state half-updated: refuse reuse

        needs_s = any("s" in p for p in (pre_i if initiator else pre_r)) or any(
            "s" in pattern for i, pattern in enumerate(patterns) if (i % 2 == 0) == initiator
        )
        if needs_s and self._s is None:
            raise ValueError(f"{protocol_name}: this side needs a static key `s`")
        peer_pre = pre_r if initiator else pre_i
        if "s" in peer_pre and self.rs is None:
            raise ValueError(f"{protocol_name}: this side must know the peer's static key `rs`")

        self.symmetric = SymmetricState(protocol_name, cipher)
        self.symmetric.mix_hash(bytes(prologue))
        # Pre-messages (spec 5.3 Initialize): initiator's keys first, then the responder's.
        for owner_is_initiator, tokens in ((True, pre_i), (False, pre_r)):
            for token in tokens:
                mine = owner_is_initiator == initiator
                if token == "s":
                    self.symmetric.mix_hash(_public_bytes(self._s) if mine else self.rs)  # type: ignore[arg-type]
                else:  # pragma: no cover - no supported pattern has a pre-message "e"
                    raise ValueError(f"unsupported pre-message token {token!r}")

    # -- state ----------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self._index >= len(self._patterns)

    def my_turn_to_write(self) -> bool:
        return not self.complete and (self._index % 2 == 0) == self.initiator

    def handshake_hash(self) -> bytes:
        return self.symmetric.get_handshake_hash()

    def split(self) -> tuple[CipherState, CipherState]:
        """(c1, c2): the initiator sends with c1, the responder with c2. Once complete."""
        if not self.complete:
            raise LocalProtocolError("split() before the handshake is complete")
        if self._split is None:
            self._split = self.symmetric.split()
        return self._split

    # -- DH bookkeeping ---------------------------------------------------------------------

    def _dh_token(self, token: str) -> bytes:
        # "es": initiator's ephemeral with responder's static; "se" the other way round.
        first, second = token[0], token[1]
        if not self.initiator:
            first, second = second, first
        local = self._e if first == "e" else self._s
        remote = self.re if second == "e" else self.rs
        if local is None or remote is None:  # pragma: no cover - patterns make this unreachable
            raise LocalProtocolError(f"token {token!r} before its keys are known")
        return _dh(local, remote)

    def _mix_psk(self) -> None:
        self.symmetric.mix_key_and_hash(self._psks.pop(0))

    # -- messages ---------------------------------------------------------------------------

    def write_message(self, payload: bytes = b"") -> bytes:
        self._check_usable()
        if not self.my_turn_to_write():
            raise LocalProtocolError("write_message() when it is not our turn to write")
        out = bytearray()
        sym = self.symmetric
        for token in self._patterns[self._index]:
            if token == "e":
                if self._e is None:
                    self._e = X25519PrivateKey.generate()
                pub = _public_bytes(self._e)
                out += pub
                sym.mix_hash(pub)
                if self.psk_mode:
                    sym.mix_key(pub)
            elif token == "s":
                out += sym.encrypt_and_hash(_public_bytes(self._s))  # type: ignore[arg-type]
            elif token == "psk":
                self._mix_psk()
            else:
                sym.mix_key(self._dh_token(token))
        out += sym.encrypt_and_hash(payload)
        if len(out) > MAX_MESSAGE_LEN:
            raise LocalProtocolError(f"Noise message of {len(out)} bytes exceeds {MAX_MESSAGE_LEN}")
        self._index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        self._check_usable()
        if self.complete or self.my_turn_to_write():
            raise LocalProtocolError("read_message() when it is not the peer's turn to write")
        try:
            return self._read_message(bytes(message))
        except RemoteProtocolError:
            self._failed = True
            raise

    def _check_usable(self) -> None:
        if self._failed:
            raise LocalProtocolError("this handshake already failed; start a new one")

    def _read_message(self, message: bytes) -> bytes:
        if len(message) > MAX_MESSAGE_LEN:
            raise RemoteProtocolError(f"Noise message of {len(message)} bytes exceeds {MAX_MESSAGE_LEN}")
        sym = self.symmetric
        pos = 0
        for token in self._patterns[self._index]:
            if token == "e":
                if len(message) - pos < DHLEN:
                    raise RemoteProtocolError("Noise message too short for an ephemeral key")
                self.re = message[pos : pos + DHLEN]
                pos += DHLEN
                sym.mix_hash(self.re)
                if self.psk_mode:
                    sym.mix_key(self.re)
            elif token == "s":
                size = DHLEN + TAGLEN if sym.cipher_state.has_key() else DHLEN
                if len(message) - pos < size:
                    raise RemoteProtocolError("Noise message too short for a static key")
                self.rs = sym.decrypt_and_hash(message[pos : pos + size])
                pos += size
            elif token == "psk":
                self._mix_psk()
            else:
                sym.mix_key(self._dh_token(token))
        if sym.cipher_state.has_key() and len(message) - pos < TAGLEN:
            raise RemoteProtocolError("Noise message too short for its authentication tag")
        payload = sym.decrypt_and_hash(message[pos:])
        self._index += 1
        return payload
