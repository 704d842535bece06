"""Signed peer records: who a peer is, where to reach it, and what partners need to know.

A record is made and signed by its own peer and relayed unchanged by everyone else, so a relay
can drop it but never forge or alter it. On the wire a record is one byte string:

    signature (64 bytes, Ed25519) || body (msgpack map, at most MAX_BODY_BYTES)

and the signature covers `RECORD_DOMAIN + body`. Because the signature is over the exact body
bytes, nobody has to re-encode a record canonically to check it (PROTOCOL.md, "Membership").

Body fields (all required):
    "v"     int    record format version (1)
    "pk"    bytes  the peer's Ed25519 public key (32 bytes); peer id = sha256(pk)
    "addrs" array  up to MAX_ADDRESSES strings: where to reach the peer. An empty array is a
                   *leave record*: the peer announces that it left (it supersedes older records
                   and is never put in a view).
    "seq"   int    sequence number, higher wins. Taken from the wall clock in microseconds (and
                   +1 on every change), so a peer restarted without its old state still wins.
    "exp"   int    expiry, unix seconds: after it the record is stale everywhere.
    "meta"  map    up to MAX_METADATA small scalars (training round, algorithm, model
                   fingerprint, load, ...): str keys, values int, float, bool, nil, str or bytes.

Decoding a record checks its bytes, its bounds and its signature, and is memoised by the exact
record bytes (`decode_record`): verification is a pure function of those bytes, so the cache
changes no outcome, and in the simulator 1,000 nodes in one process verify each record once.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import msgpack

from gossip.errors import RemoteProtocolError
from gossip.identity import Identity, peer_id_of, verify_signature

RECORD_VERSION = 1
RECORD_DOMAIN = b"murmur/v1 peer record\x00"  # signed prefix: a record signature signs nothing else
SIGNATURE_LEN = 64
MAX_BODY_BYTES = 1024  # an encoded body never exceeds this
MAX_RECORD_BYTES = SIGNATURE_LEN + MAX_BODY_BYTES
MAX_ADDRESSES = 8
MAX_ADDRESS_LEN = 128
MAX_METADATA = 16  # entries in "meta"
MAX_META_KEY_LEN = 32
MAX_META_VALUE_LEN = 64  # chars of a str value / bytes of a bytes value
MAX_SEQ = (1 << 63) - 1

_CACHE_SIZE = 1 << 14  # decoded records kept by their bytes (process-wide, LRU)
_cache: OrderedDict[bytes, PeerRecord] = OrderedDict()


class RecordError(RemoteProtocolError):
    """A record that is malformed, out of bounds or not signed by the key it names."""


@dataclass(frozen=True)
class PeerRecord:
    """One signed, immutable version of a peer's record. Equal iff the signed bytes are equal."""

    peer_id: bytes = field(compare=False)  # sha256(public_key), 32 bytes
    public_key: bytes = field(compare=False)  # Ed25519, 32 raw bytes
    addresses: tuple[str, ...] = field(compare=False)  # dialable addresses; () for a leave record
    seq: int = field(compare=False)  # higher supersedes lower for the same peer
    expires: int = field(compare=False)  # unix seconds
    metadata: Mapping[str, Any] = field(compare=False)  # read-only view of "meta"
    blob: bytes = field(repr=False)  # signature || body: the record as it travels

    @property
    def signature(self) -> bytes:
        return self.blob[:SIGNATURE_LEN]

    @property
    def left(self) -> bool:
        """A leave record: the peer announced it left the swarm."""
        return not self.addresses

    def expired(self, wall: float) -> bool:
        return self.expires <= wall


def check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Our own metadata must fit the bounds peers enforce; ValueError says what to change."""
    if len(metadata) > MAX_METADATA:
        raise ValueError(f"at most {MAX_METADATA} metadata fields, got {len(metadata)}")
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_META_KEY_LEN:
            raise ValueError(f"metadata keys are str of 1..{MAX_META_KEY_LEN} chars, got {key!r}")
        _check_meta_value(key, value, ValueError)
        out[key] = value
    return out


def _check_meta_value(key: str, value: Any, error: type[Exception]) -> None:
    kind = type(value)
    if value is None or kind is bool:
        return
    if kind is int:
        if not -(1 << 63) <= value < (1 << 64):
            raise error(f"metadata {key!r}: int {value} does not fit 64 bits")
        return
    if kind is float:
        if not math.isfinite(value):
            raise error(f"metadata {key!r}: float must be finite")
        return
    if kind in (str, bytes):
        if len(value) > MAX_META_VALUE_LEN:
            raise error(f"metadata {key!r}: at most {MAX_META_VALUE_LEN} chars/bytes")
        return
    raise error(f"metadata {key!r}: {kind.__name__} is not one of int, float, bool, None, str, bytes")


def sign_record(
    identity: Identity,
    addresses: Sequence[str],
    seq: int,
    expires: int,
    metadata: Mapping[str, Any] | None = None,
) -> PeerRecord:
    """Make and sign our own record. Bad arguments are ValueErrors (our bug, not a peer's)."""
    addresses = tuple(addresses)
    if len(addresses) > MAX_ADDRESSES or any(
        not isinstance(a, str) or not 1 <= len(a) <= MAX_ADDRESS_LEN for a in addresses
    ):
        raise ValueError(f"at most {MAX_ADDRESSES} addresses, each a str of 1..{MAX_ADDRESS_LEN} chars")
    if type(seq) is not int or not 0 < seq <= MAX_SEQ:
        raise ValueError(f"seq must be an int in [1, 2**63 - 1], got {seq!r}")
    if type(expires) is not int or expires < 0:
        raise ValueError(f"expires must be unix seconds as a non-negative int, got {expires!r}")
    meta = check_metadata(metadata or {})
    body = msgpack.packb(
        {
            "v": RECORD_VERSION,
            "pk": identity.public_key,
            "addrs": list(addresses),
            "seq": seq,
            "exp": expires,
            "meta": meta,
        },
        use_bin_type=True,
    )
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"record body of {len(body)} bytes exceeds {MAX_BODY_BYTES}: trim metadata")
    blob = identity.sign(RECORD_DOMAIN + body) + body
    record = _parse_body(blob, body)
    _remember(blob, record)
    return record


def decode_record(blob: Any) -> PeerRecord:
    """Check a record received from a peer: bounds, encoding and signature. RecordError if bad."""
    if type(blob) is not bytes:
        raise RecordError(f"a record is bytes, got {type(blob).__name__}")
    record = _cache.get(blob)
    if record is not None:
        _cache.move_to_end(blob)
        return record
    if not SIGNATURE_LEN < len(blob) <= MAX_RECORD_BYTES:
        raise RecordError(f"a record is {SIGNATURE_LEN + 1}..{MAX_RECORD_BYTES} bytes, got {len(blob)}")
    body = blob[SIGNATURE_LEN:]
    record = _parse_body(blob, body)
    if not verify_signature(record.public_key, blob[:SIGNATURE_LEN], RECORD_DOMAIN + body):
        raise RecordError("record signature does not verify")
    _remember(blob, record)
    return record


def _remember(blob: bytes, record: PeerRecord) -> None:
    _cache[blob] = record
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)


def _parse_body(blob: bytes, body: bytes) -> PeerRecord:
    try:
        fields = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=MAX_META_VALUE_LEN,
            max_str_len=MAX_ADDRESS_LEN,
            max_array_len=MAX_ADDRESSES,
            max_map_len=MAX_METADATA,
            max_ext_len=0,  # ext types are refused
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # all mean "malformed"
        why = f"{type(exc).__name__}: {exc}"[:120]
        raise RecordError(f"record body is not valid msgpack within the record bounds ({why})") from None
    if type(fields) is not dict or set(fields) != {"v", "pk", "addrs", "seq", "exp", "meta"}:
        raise RecordError("record body must be a map with exactly v, pk, addrs, seq, exp, meta")
    if fields["v"] != RECORD_VERSION or type(fields["v"]) is not int:
        raise RecordError(f"record version {fields['v']!r}, we speak {RECORD_VERSION}")
    pk, addrs, seq, exp, meta = (fields[k] for k in ("pk", "addrs", "seq", "exp", "meta"))
    if type(pk) is not bytes or len(pk) != 32:
        raise RecordError("record pk must be 32 bytes")
    if type(addrs) is not list or any(
        type(a) is not str or not 1 <= len(a) <= MAX_ADDRESS_LEN for a in addrs
    ):
        raise RecordError(f"record addrs must be an array of 1..{MAX_ADDRESS_LEN}-char strings")
    if type(seq) is not int or not 0 < seq <= MAX_SEQ:
        raise RecordError("record seq must be an int in [1, 2**63 - 1]")
    if type(exp) is not int or exp < 0:
        raise RecordError("record exp must be a non-negative int")
    if type(meta) is not dict:
        raise RecordError("record meta must be a map")
    for key, value in meta.items():
        if not 1 <= len(key) <= MAX_META_KEY_LEN:
            raise RecordError(f"record meta key {key[:40]!r} is not 1..{MAX_META_KEY_LEN} chars")
        _check_meta_value(key, value, RecordError)
    return PeerRecord(
        peer_id=peer_id_of(pk),
        public_key=pk,
        addresses=tuple(addrs),
        seq=seq,
        expires=exp,
        metadata=MappingProxyType(meta),
        blob=blob,
    )
