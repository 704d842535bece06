"""Message types and their schemas: what a peer may send us, checked before anything uses it.

Every RPC method has one `MessageType`: a name (the type tag on the wire), a version, a schema for
the request body and one for the response body, and bounds on the raw buffers that may follow.
Modules that speak a protocol define their types at import time with `define(...)`; the
transports check every received body with `check_request` / `check_response` before a handler or
a caller sees it. An unknown type, an unknown or missing field, a wrong type or a value out of
bounds is a `RemoteProtocolError` that names the field.

Schemas are small literal objects (`Map`, `List`, `Int`, ...) rather than classes with
annotations, so the whole contract of a message reads in one place and PROTOCOL.md can quote it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from gossip.errors import LocalProtocolError, RemoteProtocolError

# Bounds that hold for every message, whatever its schema says.
MAX_BODY_BYTES = 1 << 20  # an encoded body (msgpack) never exceeds 1 MiB
MAX_BUFFERS = 4096  # raw buffers following one body
MAX_BUFFER_BYTES = 1 << 31  # total raw bytes following one body (2 GiB)


class Schema:
    """A check on one decoded msgpack value. `check` returns the value or raises."""

    def check(self, value: Any, where: str) -> Any:
        raise LocalProtocolError(f"{type(self).__name__} does not implement check")  # pragma: no cover

    def describe(self) -> str:
        return type(self).__name__.lower()


def _fail(where: str, why: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"{where}: {why}")


@dataclass(frozen=True)
class Int(Schema):
    lo: int = -(1 << 63)
    hi: int = (1 << 64) - 1

    def check(self, value: Any, where: str) -> int:
        # bool is an int subclass in Python; on the wire they are different types.
        if type(value) is not int:
            raise _fail(where, f"expected int, got {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise _fail(where, f"{value} outside [{self.lo}, {self.hi}]")
        return value

    def describe(self) -> str:
        return f"int in [{self.lo}, {self.hi}]"


@dataclass(frozen=True)
class Float(Schema):
    lo: float = -math.inf
    hi: float = math.inf

    def check(self, value: Any, where: str) -> float:
        if type(value) is int:  # msgpack may carry a whole number as an int
            value = float(value)
        if type(value) is not float:
            raise _fail(where, f"expected float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise _fail(where, "not finite")
        if not self.lo <= value <= self.hi:
            raise _fail(where, f"{value} outside [{self.lo}, {self.hi}]")
        return value

    def describe(self) -> str:
        return f"finite float in [{self.lo}, {self.hi}]"


@dataclass(frozen=True)
class Bool(Schema):
    def check(self, value: Any, where: str) -> bool:
        if type(value) is not bool:
            raise _fail(where, f"expected bool, got {type(value).__name__}")
        return value


@dataclass(frozen=True)
class Str(Schema):
    max_len: int = 256
    choices: frozenset[str] | None = None

    def check(self, value: Any, where: str) -> str:
        if type(value) is not str:
            raise _fail(where, f"expected str, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise _fail(where, f"string of {len(value)} chars exceeds {self.max_len}")
        if self.choices is not None and value not in self.choices:
            raise _fail(where, f"{value!r} is not one of {sorted(self.choices)}")
        return value

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(sorted(self.choices))
        return f"str (<= {self.max_len} chars)"


@dataclass(frozen=True)
class Bytes(Schema):
    max_len: int = 256
    min_len: int = 0

    def check(self, value: Any, where: str) -> bytes:
        if type(value) is not bytes:
            raise _fail(where, f"expected bytes, got {type(value).__name__}")
        if not self.min_len <= len(value) <= self.max_len:
            raise _fail(where, f"{len(value)} bytes outside [{self.min_len}, {self.max_len}]")
        return value

    def describe(self) -> str:
        if self.min_len == self.max_len:
            return f"bytes[{self.max_len}]"
        return f"bytes ({self.min_len}..{self.max_len})"


@dataclass(frozen=True)
class Nullable(Schema):
    inner: Schema

    def check(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.check(value, where)

    def describe(self) -> str:
        return f"nil or {self.inner.describe()}"


@dataclass(frozen=True)
class List(Schema):
    item: Schema
    max_len: int = 64

    def check(self, value: Any, where: str) -> list:
        if type(value) is not list:
            raise _fail(where, f"expected array, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise _fail(where, f"array of {len(value)} items exceeds {self.max_len}")
        return [self.item.check(v, f"{where}[{i}]") for i, v in enumerate(value)]

    def describe(self) -> str:
        return f"array (<= {self.max_len}) of {self.item.describe()}"


@dataclass(frozen=True)
class Map(Schema):
    """A map with known str keys. Keys not in `fields` are refused; `optional` ones may be absent."""

    fields: Mapping[str, Schema]
    optional: frozenset[str] = field(default_factory=frozenset)

    def check(self, value: Any, where: str) -> dict:
        if type(value) is not dict:
            raise _fail(where, f"expected map, got {type(value).__name__}")
        for key in value:
            if key not in self.fields:
                raise _fail(where, f"unknown field {key!r}")
        out = {}
        for key, schema in self.fields.items():
            if key in value:
                out[key] = schema.check(value[key], f"{where}.{key}")
            elif key not in self.optional:
                raise _fail(where, f"missing field {key!r}")
        return out

    def describe(self) -> str:
        return "map"


@dataclass(frozen=True)
class MessageType:
    """One RPC method: its tag, version, body schemas and bounds on trailing buffers."""

    name: str  # the type tag on the wire, "<area>.<verb>"
    version: int  # bumped on any incompatible change of either schema
    request: Map  # schema of the request body
    response: Map  # schema of the response body
    max_request_buffers: int = 0  # raw buffers that may follow a request
    max_response_buffers: int = 0  # raw buffers that may follow a response
    max_buffer_bytes: int = 0  # total raw bytes allowed after either body


_REGISTRY: dict[str, MessageType] = {}


def define(
    name: str,
    version: int,
    request: Map,
    response: Map,
    *,
    max_request_buffers: int = 0,
    max_response_buffers: int = 0,
    max_buffer_bytes: int = 0,
) -> MessageType:
    """Register a message type. Defining the same name twice with a different shape is a bug."""
    if max(max_request_buffers, max_response_buffers) > MAX_BUFFERS:
        raise LocalProtocolError(f"{name}: at most {MAX_BUFFERS} buffers per message")
    if max_buffer_bytes > MAX_BUFFER_BYTES:
        raise LocalProtocolError(f"{name}: at most {MAX_BUFFER_BYTES} buffer bytes per message")
    mt = MessageType(
        name, version, request, response, max_request_buffers, max_response_buffers, max_buffer_bytes
    )
    old = _REGISTRY.get(name)
    if old is not None and old != mt:
        raise LocalProtocolError(f"message type {name!r} defined twice with different schemas")
    _REGISTRY[name] = mt
    return mt


def lookup(name: Any) -> MessageType:
    """The type registered under `name`; an unknown one is the peer's fault."""
    mt = _REGISTRY.get(name) if type(name) is str else None
    if mt is None:
        raise RemoteProtocolError(f"unknown message type {str(name)[:64]!r}")
    return mt


def registered() -> list[MessageType]:
    return sorted(_REGISTRY.values(), key=lambda m: m.name)


def _check_buffers(mt: MessageType, buffers: list, limit: int, what: str) -> None:
    if len(buffers) > limit:
        raise RemoteProtocolError(f"{mt.name} {what}: {len(buffers)} buffers, at most {limit} allowed")
    total = sum(len(b) for b in buffers)
    if total > mt.max_buffer_bytes:
        raise RemoteProtocolError(
            f"{mt.name} {what}: {total} buffer bytes, at most {mt.max_buffer_bytes} allowed"
        )


def check_request(name: Any, version: Any, body: Any, buffers: list) -> tuple[MessageType, dict]:
    """Validate a received request; returns its type and the checked body."""
    mt = lookup(name)
    if version != mt.version:
        raise RemoteProtocolError(f"{mt.name}: version {version!r}, we speak {mt.version}")
    _check_buffers(mt, buffers, mt.max_request_buffers, "request")
    return mt, mt.request.check(body, f"{mt.name} request")


def check_response(mt: MessageType, body: Any, buffers: list) -> dict:
    """Validate a received response to a request of type `mt`."""
    _check_buffers(mt, buffers, mt.max_response_buffers, "response")
    return mt.response.check(body, f"{mt.name} response")


def check_outgoing(mt: MessageType, body: dict, buffers: list, response: bool) -> None:
    """Our own message must satisfy our own schema: a failure is a LocalProtocolError."""
    try:
        if response:
            check_response(mt, body, buffers)
        else:
            _check_buffers(mt, buffers, mt.max_request_buffers, "request")
            mt.request.check(body, f"{mt.name} request")
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"we tried to send an invalid message: {exc}") from None


# The one message every transport answers: liveness and round-trip time.
PING = define("wire.ping", 1, Map({"nonce": Int(0, (1 << 64) - 1)}), Map({"nonce": Int(0, (1 << 64) - 1)}))
