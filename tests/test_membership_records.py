"""Signed peer records: exact round trip, and every kind of bad record refused with RecordError."""

import hashlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip import peer_records
from gossip.errors import RemoteProtocolError
from gossip.identity import Identity
from gossip.peer_records import (
    MAX_BODY_BYTES,
    RECORD_DOMAIN,
    RecordError,
    check_metadata,
    decode_record,
    sign_record,
)

ALICE = Identity.from_seed(b"a" * 32)
BOB = Identity.from_seed(b"b" * 32)
META = {"round": 7, "algorithm": "noloco", "fingerprint": b"\x01" * 8, "load": 0.25, "ready": True}


def make(identity=ALICE, addresses=("127.0.0.1:7000",), seq=5, expires=2_000_000_000, meta=META):
    return sign_record(identity, addresses, seq, expires, meta)


def resign(body_fields: dict, identity=ALICE) -> bytes:
    """A record with an arbitrary body, correctly signed: only the body's content is wrong."""
    body = msgpack.packb(body_fields, use_bin_type=True)
    return identity.sign(RECORD_DOMAIN + body) + body


GOOD_BODY = {"v": 1, "pk": ALICE.public_key, "addrs": ["h:1"], "seq": 1, "exp": 10, "meta": {}}


def test_round_trip_keeps_every_field_exactly():
    record = make()
    assert record.peer_id == hashlib.sha256(ALICE.public_key).digest() == ALICE.peer_id
    assert record.public_key == ALICE.public_key
    assert record.addresses == ("127.0.0.1:7000",)
    assert (record.seq, record.expires) == (5, 2_000_000_000)
    assert dict(record.metadata) == META
    assert len(record.signature) == 64 and record.blob[64:] == record.blob[len(record.signature):]
    peer_records._cache.clear()
    again = decode_record(bytes(record.blob))
    assert again == record
    assert (again.peer_id, again.addresses, again.seq, again.expires) == (
        record.peer_id, record.addresses, record.seq, record.expires)
    assert dict(again.metadata) == META
    assert not again.left and again.expired(2_000_000_000) and not again.expired(1_999_999_999)


def test_metadata_is_read_only():
    record = make()
    with pytest.raises(TypeError):
        record.metadata["round"] = 8  # type: ignore[index]


def test_leave_record_has_no_addresses():
    record = make(addresses=())
    assert record.left and decode_record(record.blob).left


def test_decoding_is_memoised_by_the_exact_bytes():
    record = make(seq=77)
    blob = bytes(record.blob)
    assert decode_record(blob) is decode_record(bytes(blob))


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "signature"),  # one body bit flipped
        (lambda b: bytes([b[0] ^ 1]) + b[1:], "signature"),  # one signature bit flipped
        (lambda b: b[:64], "bytes"),  # no body at all
        (lambda b: b[:80], "msgpack"),  # truncated body (signature checked after parsing)
        (lambda b: b + b"\x00", "msgpack"),  # trailing byte after the body
    ],
)
def test_tampered_records_are_refused(mutate, reason):
    blob = make(seq=9).blob
    with pytest.raises(RecordError, match=reason):
        decode_record(mutate(blob))


def test_record_signed_by_another_key_is_forged():
    body = msgpack.packb(GOOD_BODY, use_bin_type=True)
    blob = BOB.sign(RECORD_DOMAIN + body) + body  # Bob signs a record naming Alice's key
    with pytest.raises(RecordError, match="signature"):
        decode_record(blob)


def test_signature_without_the_domain_prefix_is_refused():
    body = msgpack.packb(GOOD_BODY, use_bin_type=True)
    with pytest.raises(RecordError, match="signature"):
        decode_record(ALICE.sign(body) + body)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"v": 2}, "version"),
        ({"v": True}, "version"),
        ({"pk": b"x" * 31}, "pk"),
        ({"addrs": "h:1"}, "addrs"),
        ({"addrs": [""]}, "addrs"),
        ({"addrs": ["h"] * 9}, "msgpack"),  # over MAX_ADDRESSES: the decoder refuses the array
        ({"seq": 0}, "seq"),
        ({"seq": 1.5}, "seq"),
        ({"exp": -1}, "exp"),
        ({"meta": []}, "meta"),
        ({"meta": {"k": [1]}}, "list is not one of"),
        ({"meta": {"k": 1e308 * 10}}, "finite"),
        ({"meta": {"": 1}}, "meta key"),
        ({"meta": {"k": "x" * 65}}, "at most 64"),
        ({"extra": 1}, "exactly"),
    ],
)
def test_bad_bodies_are_refused_even_when_signed(change, reason):
    with pytest.raises(RecordError, match=reason):
        decode_record(resign({**GOOD_BODY, **change}))


def test_missing_field_and_ext_types_are_refused():
    body = dict(GOOD_BODY)
    del body["meta"]
    with pytest.raises(RecordError, match="exactly"):
        decode_record(resign(body))
    ext = msgpack.packb({**GOOD_BODY, "meta": {"k": msgpack.ExtType(1, b"x")}}, use_bin_type=True)
    with pytest.raises(RecordError, match="msgpack"):
        decode_record(ALICE.sign(RECORD_DOMAIN + ext) + ext)


def test_non_bytes_and_oversized_blobs_are_refused():
    with pytest.raises(RecordError, match="bytes"):
        decode_record("not bytes")
    with pytest.raises(RecordError, match="bytes"):
        decode_record(b"\x00" * (64 + MAX_BODY_BYTES + 1))
    assert issubclass(RecordError, RemoteProtocolError)


def test_our_own_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="seq"):
        make(seq=0)
    with pytest.raises(ValueError, match="addresses"):
        make(addresses=("x" * 129,))
    with pytest.raises(ValueError, match="addresses"):
        make(addresses=tuple(f"h:{i}" for i in range(9)))
    with pytest.raises(ValueError, match="expires"):
        make(expires=-5)
    with pytest.raises(ValueError, match="metadata"):
        check_metadata({f"k{i}": i for i in range(17)})
    with pytest.raises(ValueError, match="not one of"):
        check_metadata({"k": [1, 2]})
    with pytest.raises(ValueError, match="64 bits"):
        check_metadata({"k": 1 << 64})
    # Sixteen 64-byte values fit the field limits but not the 1 KiB body: a clear error.
    with pytest.raises(ValueError, match="trim metadata"):
        make(meta={f"key{i:02d}": b"x" * 64 for i in range(16)})


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_records_only_raise_record_error(data):
    blob = bytearray(make(seq=123).blob)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        record = decode_record(bytes(blob[:cut]))
    except RecordError:
        return
    assert record.blob == bytes(blob[:cut])  # only an unchanged record decodes
    assert record.seq == 123 and record.peer_id == ALICE.peer_id


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1200))
def test_random_bytes_only_raise_record_error(blob):
    with pytest.raises(RecordError):
        decode_record(blob)
