"""The membership wire format: message types, their schemas, and the entries codec.

Entries (peer records with their pointer ages) travel as two parallel arrays: signed record
bytes and ages in milliseconds. PROTOCOL.md, "Membership", describes every field; the state
machine that uses them is `gossip.membership`.
"""

from __future__ import annotations

from collections.abc import Sequence

from gossip import messages
from gossip.errors import RemoteProtocolError
from gossip.membership_config import MAX_ENTRIES, MembershipStats
from gossip.messages import Bool, Bytes, Int, List, Map, Nullable, Str
from gossip.peer_records import MAX_ADDRESS_LEN, MAX_RECORD_BYTES, SIGNATURE_LEN, PeerRecord, RecordError, decode_record

MAX_GONE = 16  # peer ids a shuffle reports as recently removed
MAX_AGE_MS = (1 << 32) - 1

_RECORD = Bytes(min_len=SIGNATURE_LEN + 1, max_len=MAX_RECORD_BYTES)
_ENTRIES = {"records": List(_RECORD, MAX_ENTRIES), "ages": List(Int(0, MAX_AGE_MS), MAX_ENTRIES)}
_SHUFFLE = Map({**_ENTRIES, "gone": List(Bytes(min_len=32, max_len=32), MAX_GONE)})

# Message types (PROTOCOL.md, "Membership"). Entries travel as two parallel arrays: signed record
# bytes and their ages in milliseconds; the first record of a shuffle request is the caller's own.
# "gone" lists peers the sender removed or heard were removed lately: the receiver only doubts
# them and probes them itself, so a lying sender costs a few pings, never a live peer.
SHUFFLE = messages.define("membership.shuffle", 1, _SHUFFLE, _SHUFFLE)
JOIN = messages.define("membership.join", 1, Map({"record": _RECORD}), Map(_ENTRIES))
PING = messages.define(
    "membership.ping",
    1,
    Map({"known": Int(0, (1 << 63) - 1)}),  # the callee's seq the caller holds (0: none)
    Map({"record": Nullable(_RECORD)}),  # the callee's record if newer than `known`
)
PROBE = messages.define(
    "membership.probe",
    1,
    Map({"target": Bytes(min_len=32, max_len=32), "address": Str(MAX_ADDRESS_LEN)}),
    Map({"alive": Bool()}),
)
LEAVE = messages.define("membership.leave", 1, Map({"record": _RECORD}), Map({}))


def encode_entries(entries: Sequence[tuple[PeerRecord, float]]) -> dict:
    """The wire body of a list of (record, age seconds)."""
    return {
        "records": [r.blob for r, _ in entries],
        "ages": [min(MAX_AGE_MS, max(0, int(age * 1000))) for _, age in entries],
    }


def decode_entries(body: dict, limit: int, stats: MembershipStats) -> list[tuple[PeerRecord, float]]:
    """Records and ages from a checked body. Forged records are skipped and counted; more
    than `limit` entries is an oversized message: counted and refused whole."""
    blobs, ages = body["records"], body["ages"]
    if len(blobs) != len(ages):
        raise RemoteProtocolError(f"{len(blobs)} records but {len(ages)} ages")
    if len(blobs) > limit:
        stats.oversized += 1
        raise RemoteProtocolError(f"{len(blobs)} records, at most {limit} allowed")
    out = []
    for blob, age in zip(blobs, ages):
        try:
            out.append((decode_record(blob), age / 1000.0))
        except RecordError:
            stats.forged += 1
    return out
