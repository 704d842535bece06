"""Wire formats of the collectives: message schemas and the few conversions around them.

Every body is checked against these schemas by the transport before a handler or caller sees
it; the functions here check what a schema cannot (a group sorted and containing us, a user body
that is a map). PROTOCOL.md ("Collectives") quotes this file.

User bodies (pair_exchange) and codec headers (group_average) are arbitrary msgpack maps, so
they travel packed inside a bytes field and are unpacked here with ext types refused and sizes
bounded by the schema; nothing is ever unpickled.
"""

from __future__ import annotations

from typing import Any, Sequence

import msgpack

from gossip import messages
from gossip.matchmaking import GROUP, JOIN_REASONS, REDIRECT, REFUSE, JoinAnswer, Member
from gossip.averaging import PART_REASONS
from gossip.messages import Bool, Bytes, Float, Int, List, Map, Nullable, Str
from gossip.pairing import REASONS, Payload
from gossip.transport import Buffer

MAX_ROUND = (1 << 63) - 1
MAX_KEY = 128  # chars in a group_average key
MAX_GROUP = 256  # members in one group (bounds every list on the wire)
MAX_PEER_ID = 64  # bytes; peer ids are 32 (sha256 of the identity key)
MAX_ADDRESS = 262  # chars: "[" + IPv6 or 253-char host name + "]:65535"
MAX_USER_BODY = 1 << 19  # packed pair_exchange body (the whole message body is capped at 1 MiB)
MAX_PAIR_BUFFERS = 1024  # raw buffers after a pair_exchange body
MAX_HEADER = 1 << 16  # packed codec header
MAX_PART_BUFFERS = 64  # raw buffers after a shard (codecs use a handful)
MAX_PAYLOAD_BYTES = messages.MAX_BUFFER_BYTES  # raw bytes after one body (2 GiB)
MAX_SECONDS = 1e6  # time fields: finite, non-negative, and below eleven days

_round = Int(0, MAX_ROUND)
_peer = Bytes(max_len=MAX_PEER_ID, min_len=1)
_address = Str(max_len=MAX_ADDRESS)
_seconds = Float(0.0, MAX_SECONDS)
_key = Str(max_len=MAX_KEY)
_layout = Bytes(max_len=16, min_len=16)
_pair_answer = Map({"ok": Bool(), "reason": Str(max_len=16, choices=REASONS)})

PAIR_PROPOSE = messages.define("pair.propose", 1, Map({"round": _round}), _pair_answer)
PAIR_SWAP = messages.define(
    "pair.swap",
    1,
    Map({"round": _round, "body": Bytes(max_len=MAX_USER_BODY)}),
    Map({"ok": Bool(), "reason": Str(max_len=16, choices=REASONS), "body": Bytes(max_len=MAX_USER_BODY)}),
    max_request_buffers=MAX_PAIR_BUFFERS,
    max_response_buffers=MAX_PAIR_BUFFERS,
    max_buffer_bytes=MAX_PAYLOAD_BYTES,
)
PAIR_COMMIT = messages.define("pair.commit", 1, Map({"round": _round}), _pair_answer)

AVG_HELLO = messages.define(
    "avg.hello", 1, Map({"key": _key, "layout": _layout, "address": _address}), Map({"present": Bool()})
)
AVG_JOIN = messages.define(
    "avg.join",
    1,
    Map({
        "key": _key,
        "layout": _layout,
        "address": _address,  # where the group reaches the joiner
        "waited": _seconds,  # since the joiner entered the key: the leader's window starts then
        "patience": _seconds,  # how long the joiner waits for this answer
        "remaining": _seconds,  # until the joiner's deadline: bounds the group's time budget
    }),
    Map(
        {
            "kind": Str(max_len=16, choices=frozenset({GROUP, REDIRECT, REFUSE})),
            "reason": Str(max_len=16, choices=JOIN_REASONS | {""}),
            "leader": Nullable(_peer),
            "leader_address": Nullable(_address),
            "members": List(_peer, max_len=MAX_GROUP),
            "addresses": List(_address, max_len=MAX_GROUP),
            "group_id": Int(0, MAX_ROUND),
            "budget": _seconds,
        }
    ),
)
AVG_PART = messages.define(
    "avg.part",
    1,
    Map({
        "key": _key,
        "group_id": Int(0, MAX_ROUND),
        "shard": Int(0, MAX_GROUP - 1),  # which shard this slice belongs to (= the callee's index)
        "weight": Float(0.0, 1e300),  # the sender's weight; must be > 0 to count
        "header": Bytes(max_len=MAX_HEADER),  # the codec header, packed
    }),
    Map({
        "ok": Bool(),
        "reason": Str(max_len=16, choices=PART_REASONS),
        "contributors": List(_peer, max_len=MAX_GROUP),  # whose slices are in the mean
        "weight": Float(0.0, 1e300),  # their total weight
        "header": Bytes(max_len=MAX_HEADER),  # the codec header of the mean, packed
    }),
    max_request_buffers=MAX_PART_BUFFERS,
    max_response_buffers=MAX_PART_BUFFERS,
    max_buffer_bytes=MAX_PAYLOAD_BYTES,
)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack ext types are not allowed")


def _unpack_map(packed: bytes, strict_keys: bool) -> dict | None:
    try:
        value = msgpack.unpackb(packed, raw=False, strict_map_key=strict_keys, ext_hook=_refuse_ext)
    except Exception:  # noqa: BLE001 - msgpack raises several types on bad bytes; all mean "not a map"
        return None
    return value if type(value) is dict else None


def pack_user_body(body: dict) -> bytes:
    if type(body) is not dict:
        raise ValueError(f"body must be a dict (a msgpack map), got {type(body).__name__}")
    try:
        packed = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"body must be msgpack-able: {exc}") from None
    if len(packed) > MAX_USER_BODY:
        raise ValueError(f"body packs to {len(packed)} bytes; at most {MAX_USER_BODY} (put bulk data in buffers)")
    return packed


def unpack_user_body(packed: bytes, buffers: Sequence[Buffer]) -> Payload | None:
    """A peer's pair_exchange payload, or None if its body is not a msgpack map."""
    body = _unpack_map(packed, strict_keys=False)
    return None if body is None else Payload(packed, list(buffers), body)


def check_pair_buffers(buffers: Sequence[Buffer]) -> None:
    if len(buffers) > MAX_PAIR_BUFFERS:
        raise ValueError(f"at most {MAX_PAIR_BUFFERS} buffers per pair_exchange, got {len(buffers)}")
    if sum(memoryview(b).nbytes for b in buffers) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"at most {MAX_PAYLOAD_BYTES} buffer bytes per pair_exchange")


def pack_header(header: dict) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) > MAX_HEADER:
        raise ValueError(f"codec header packs to {len(packed)} bytes; at most {MAX_HEADER}")
    return packed


def unpack_header(packed: bytes) -> dict | None:
    return _unpack_map(packed, strict_keys=True)


def join_answer_to_wire(a: JoinAnswer) -> dict:
    return {
        "kind": a.kind,
        "reason": a.reason,
        "leader": a.leader.peer_id if a.leader else None,
        "leader_address": a.leader.address if a.leader else None,
        "members": [m.peer_id for m in a.group],
        "addresses": [m.address for m in a.group],
        "group_id": a.group_id,
        "budget": a.budget,
    }


def join_answer_from_wire(b: dict, max_group: int) -> JoinAnswer | None:
    """The leader's answer, or None if it makes no sense (then the leader is treated as failed)."""
    kind = b["kind"]
    if kind == REDIRECT:
        if b["leader"] is None or b["leader_address"] is None:
            return None
        return JoinAnswer(REDIRECT, leader=Member(b["leader"], b["leader_address"]))
    if kind == REFUSE:
        return JoinAnswer(REFUSE, b["reason"])
    members, addresses = b["members"], b["addresses"]
    if not (
        1 <= len(members) <= max_group
        and len(members) == len(addresses)
        and all(x < y for x, y in zip(members, members[1:]))  # sorted, hence distinct
    ):
        return None
    group = tuple(Member(p, a) for p, a in zip(members, addresses))
    return JoinAnswer(GROUP, group=group, group_id=b["group_id"], budget=b["budget"])
