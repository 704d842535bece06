"""Who a node is (its Ed25519 identity key) and which swarm it belongs to (the swarm key).

- A node's identity is an Ed25519 key pair. Its **peer id** is `sha256(public_key)` (32 bytes),
  printed as lowercase base32 without padding (52 characters). The identity key signs the
  per-connection Noise static key during the handshake and signs gossip records.
- A **swarm key** is the Noise PSK every member of a swarm shares, plus a public swarm id.
  Both are derived from a 32-byte swarm secret with domain-separated SHA-256 hashes, so the swarm
  id can be shown and compared freely without revealing the PSK. An *open* swarm derives its
  secret from the swarm name (anyone who knows the name can join; the PSK only keeps unrelated
  traffic out); a *private* swarm uses a random secret from `generate_swarm_secret()`.

Files: identities are stored as unencrypted PKCS#8 PEM (readable by openssl), swarm secrets as
one line of text; both are written with mode 0600 and never overwritten.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBLIC_KEY_LEN = 32  # raw Ed25519 public key
SIGNATURE_LEN = 64  # raw Ed25519 signature
PEER_ID_LEN = 32  # sha256 digest
SWARM_SECRET_LEN = 32

# Domain strings: one per derived value, so no hash of one kind can stand in for another.
_OPEN_SWARM_DOMAIN = b"murmur/v1 open swarm secret\x00"
_SWARM_ID_DOMAIN = b"murmur/v1 swarm id\x00"
_SWARM_PSK_DOMAIN = b"murmur/v1 swarm psk\x00"
_SWARM_SECRET_HEADER = "murmur-swarm-secret-v1:"
# A PEM identity is ~120 bytes; anything far larger is not one of ours (and not worth reading).
_MAX_KEY_FILE = 16 * 1024


def peer_id_of(public_key: bytes) -> bytes:
    """The peer id of an Ed25519 public key: its SHA-256 digest (32 bytes)."""
    if not isinstance(public_key, (bytes, bytearray)) or len(public_key) != PUBLIC_KEY_LEN:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_LEN} raw bytes")
    return hashlib.sha256(bytes(public_key)).digest()


def format_peer_id(peer_id: bytes) -> str:
    """Lowercase base32 without padding: 52 characters for a 32-byte peer id."""
    if not isinstance(peer_id, (bytes, bytearray)) or len(peer_id) != PEER_ID_LEN:
        raise ValueError(f"a peer id is {PEER_ID_LEN} bytes")
    return base64.b32encode(bytes(peer_id)).decode("ascii").rstrip("=").lower()


def parse_peer_id(text: str) -> bytes:
    """Inverse of `format_peer_id` (case-insensitive); ValueError on anything else."""
    if not isinstance(text, str):
        raise ValueError(f"a peer id must be a str, not {type(text).__name__}")
    want = len(format_peer_id(bytes(PEER_ID_LEN)))
    if len(text) != want or not text.isascii():
        raise ValueError(f"a peer id is {want} base32 characters, got {text!r}")
    try:
        raw = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except binascii.Error as exc:
        raise ValueError(f"not a base32 peer id: {text!r}") from exc
    # Non-canonical spellings (stray low bits in the last character) would give two texts for
    # one id; refuse them so ids compare equal exactly when their texts do.
    if format_peer_id(raw) != text.lower():
        raise ValueError(f"not a canonical peer id: {text!r}")
    return raw


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True iff `signature` is a valid Ed25519 signature of `data` by `public_key`.

    Malformed keys or signatures (wrong length, not a curve point) verify as False, never raise,
    so callers that check peer-supplied values have one branch to handle.
    """
    if not isinstance(public_key, (bytes, bytearray)) or len(public_key) != PUBLIC_KEY_LEN:
        return False
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIGNATURE_LEN:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(bytes(signature), bytes(data))
    except (InvalidSignature, ValueError):
        return False
    return True


def _write_new_file(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 and write `data`; FileExistsError if it exists.

    O_EXCL makes "does it exist" and "create it" one step, so two processes racing to create a
    key cannot both win, and an existing key is never clobbered.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        # A half-written key file would later fail to load with a confusing error: remove it.
        try:
            os.unlink(path)
        except OSError:
            pass
        raise


def _read_small_file(path: Path, what: str) -> bytes:
    with open(path, "rb") as f:  # FileNotFoundError propagates unchanged: its message is clear
        data = f.read(_MAX_KEY_FILE + 1)
    if len(data) > _MAX_KEY_FILE:
        raise ValueError(f"{path}: too large to be a murmur {what} file")
    return data


class Identity:
    """An Ed25519 identity key pair: the long-term name of a node."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ValueError("Identity wraps an Ed25519PrivateKey; use Identity.generate() or .load()")
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: bytes = peer_id_of(self.public_key)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "Identity":
        """A deterministic identity from a 32-byte seed (tests, simulations)."""
        if not isinstance(seed, (bytes, bytearray)) or len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Identity":
        """Read an identity written by `save`; ValueError if the file is not one."""
        path = Path(path)
        data = _read_small_file(path, "identity")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            # TypeError: an encrypted key (we never write those); ValueError: not a PEM key.
            raise ValueError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
        except Exception as exc:  # cryptography raises UnsupportedAlgorithm for odd keys
            raise ValueError(f"{path}: unreadable private key ({exc})") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: holds a {type(key).__name__}, murmur identities are Ed25519")
        return cls(key)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key as PKCS#8 PEM, mode 0600; FileExistsError if `path` exists."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_new_file(Path(path), pem)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(bytes(data))

    def __repr__(self) -> str:  # never print key material
        return f"Identity({format_peer_id(self.peer_id)})"


@dataclass(frozen=True)
class SwarmKey:
    """The secret every member of a swarm shares (the Noise PSK) and its public id."""

    swarm_id: bytes  # public: sha256(domain + secret), sent in every handshake and compared
    psk: bytes  # secret: the 32-byte Noise PSK, sha256(another domain + secret)

    def __post_init__(self) -> None:
        if not isinstance(self.swarm_id, bytes) or len(self.swarm_id) != 32:
            raise ValueError("SwarmKey.swarm_id must be 32 bytes; use SwarmKey.open() or .private()")
        if not isinstance(self.psk, bytes) or len(self.psk) != 32:
            raise ValueError("SwarmKey.psk must be 32 bytes; use SwarmKey.open() or .private()")

    @classmethod
    def private(cls, secret: bytes) -> "SwarmKey":
        """The key of a private swarm from its 32-byte secret (see `generate_swarm_secret`)."""
        if not isinstance(secret, (bytes, bytearray)) or len(secret) != SWARM_SECRET_LEN:
            raise ValueError(f"a swarm secret is {SWARM_SECRET_LEN} bytes (generate_swarm_secret())")
        secret = bytes(secret)
        return cls(
            swarm_id=hashlib.sha256(_SWARM_ID_DOMAIN + secret).digest(),
            psk=hashlib.sha256(_SWARM_PSK_DOMAIN + secret).digest(),
        )

    @classmethod
    def open(cls, name: str) -> "SwarmKey":
        """The key of an open swarm, derived from its name (UTF-8, 1 to 256 bytes)."""
        if not isinstance(name, str):
            raise ValueError("an open swarm's name is a str")
        raw = name.encode("utf-8")
        if not 1 <= len(raw) <= 256:
            raise ValueError("an open swarm's name is 1 to 256 bytes of UTF-8")
        return cls.private(hashlib.sha256(_OPEN_SWARM_DOMAIN + raw).digest())

    def __repr__(self) -> str:  # the psk stays out of logs
        return f"SwarmKey(swarm_id={self.swarm_id.hex()[:16]}...)"


def generate_swarm_secret() -> bytes:
    """32 random bytes from the OS CSPRNG: the secret of a new private swarm."""
    return secrets.token_bytes(SWARM_SECRET_LEN)


def save_swarm_secret(secret: bytes, path: str | os.PathLike[str]) -> None:
    """Write `secret` as one line `murmur-swarm-secret-v1:<64 hex>`; mode 0600, never overwrites."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SWARM_SECRET_LEN:
        raise ValueError(f"a swarm secret is {SWARM_SECRET_LEN} bytes (generate_swarm_secret())")
    _write_new_file(Path(path), f"{_SWARM_SECRET_HEADER}{bytes(secret).hex()}\n".encode("ascii"))


def load_swarm_secret(path: str | os.PathLike[str]) -> bytes:
    """Read a file written by `save_swarm_secret`; ValueError if it is malformed."""
    path = Path(path)
    data = _read_small_file(path, "swarm secret")
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: a swarm secret file is ASCII text") from exc
    if not text.startswith(_SWARM_SECRET_HEADER):
        raise ValueError(f"{path}: expected a line starting with {_SWARM_SECRET_HEADER!r}")
    hexpart = text[len(_SWARM_SECRET_HEADER) :]
    if len(hexpart) != 2 * SWARM_SECRET_LEN or any(c not in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"{path}: expected {2 * SWARM_SECRET_LEN} lowercase hex digits after the header")
    return bytes.fromhex(hexpart)
