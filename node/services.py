"""A node's network services: transport, membership, collectives, state serving, `node.status`.

`open_services` is the one place that wires the gossip layer together for a node (the runtime
and the embedded hook both use it): a TCP transport under our identity and swarm key, membership
running in the background, collectives on top of membership's peer view, a `StateServer` for
late joiners and a handler answering `node.status`. On exit it announces our leave (bounded by
membership's `leave_timeout_s`) and closes every connection.
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncContextManager, AsyncIterator, Callable, Sequence

import trio

from gossip import messages
from gossip.collectives import Collectives
from gossip.errors import AuthenticationError, MurmurError, PeerTimeout, PeerUnreachable
from gossip.identity import Identity, SwarmKey, load_swarm_secret
from gossip.membership import MembershipConfig
from gossip.membership_driver import Membership
from gossip.messages import Float, Int, Map, Nullable, Str
from gossip.transport import Request, Response, Transport
from node.metrics import NodeStatus
from node.state_transfer import StateServer

_COUNT = Int(0, (1 << 63) - 1)
_MAYBE = Nullable(Float())

STATUS = messages.define(
    "node.status",
    1,
    Map({}),
    Map(
        {
            "peer_id": Str(max_len=64),
            "algorithm": Str(max_len=32),
            "step": _COUNT,
            "loss_bpb": _MAYBE,
            "eval_bpb": _MAYBE,
            "eval_bpb_start": _MAYBE,
            "tokens": _COUNT,
            "tokens_per_s": Float(0.0),
            "peers": _COUNT,
            "last_sync_s": _MAYBE,
            "bytes_sent": _COUNT,
            "bytes_received": _COUNT,
            "send_rate": Float(0.0),
            "recv_rate": Float(0.0),
            "syncs_done": _COUNT,
            "syncs_missed": _COUNT,
            "elapsed_s": Float(0.0),
        }
    ),
)


def collapse(exc: BaseException) -> BaseException:
    """The real error inside the exception groups trio wraps around errors raised in nurseries."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)] or list(exc.exceptions)
        exc = inner[0]
    return exc


def swarm_key_from(swarm: str, swarm_key: str | None) -> SwarmKey:
    """The private swarm's key if a secret file is given, else the open swarm named `swarm`."""
    if swarm_key is not None:
        return SwarmKey.private(load_swarm_secret(swarm_key))
    return SwarmKey.open(swarm)


def status_body(st: NodeStatus) -> dict:
    body = st.to_dict()
    for key, value in body.items():
        if isinstance(value, float) and not math.isfinite(value):
            body[key] = None if key in ("loss_bpb", "eval_bpb", "eval_bpb_start", "last_sync_s") else 0.0
    return body


class NodeCollectives:
    """The collectives as a node uses them: a pair exchange with nobody in our membership view
    returns None at once (a solo update) instead of polling an empty view until its deadline, so
    a node alone, e.g. the first of a swarm, trains at full speed. group_average already returns
    an `alone` result at once when it has no candidates."""

    def __init__(self, collectives: Collectives, membership: Membership) -> None:
        self.inner = collectives
        self._membership = membership

    async def pair_exchange(self, round: int, body: dict, buffers: Sequence = (), *, timeout: float):
        if not self._membership.live_peers():
            return None
        return await self.inner.pair_exchange(round, body, buffers, timeout=timeout)

    async def group_average(self, key: str, tensors: Sequence, codec, weight: float = 1.0, *, timeout: float, **kw):
        return await self.inner.group_average(key, tensors, codec, weight, timeout=timeout, **kw)


@dataclass
class Services:
    transport: Transport
    membership: Membership
    collectives: NodeCollectives
    state_server: StateServer

    def peer_refs(self) -> list[tuple[bytes, str]]:
        """(peer id, address) of every live peer in our view."""
        return [(r.peer_id, r.addresses[0]) for r in self.membership.live_peers() if r.addresses]


@asynccontextmanager
async def open_services(
    identity: Identity,
    swarm: SwarmKey,
    listen: Sequence[str],
    bootstrap: Sequence[str],
    *,
    status: Callable[[], NodeStatus] | None = None,
    membership_config: MembershipConfig | None = None,
    metadata: dict | None = None,
    announce: Sequence[str] = (),
    open_transport: Callable[[Identity, SwarmKey, list[str]], AsyncContextManager[Transport]] | None = None,
) -> AsyncIterator[Services]:
    """`announce`: the addresses peers should dial (default: the bound ones).
    `open_transport(identity, swarm, listen)` defaults to the TCP transport; tests pass one that
    runs a host on a `gossip.sim.SimNetwork` instead."""
    if open_transport is None:
        from gossip.tcp import open_tcp_transport

        def open_transport(identity: Identity, swarm: SwarmKey, listen: list[str]) -> AsyncContextManager[Transport]:
            return open_tcp_transport(identity, swarm, listen=listen, announce=list(announce) or None)

    async with open_transport(identity, swarm, list(listen)) as transport:
        membership = Membership(
            transport, identity, membership_config or MembershipConfig(), bootstrap=list(bootstrap), metadata=metadata
        )
        collectives = NodeCollectives(Collectives(transport, membership), membership)
        server = StateServer(transport)
        if status is not None:

            async def on_status(req: Request) -> Response:
                return Response(status_body(status()))

            transport.route(STATUS.name, on_status)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(membership.run)
            try:
                yield Services(transport, membership, collectives, server)
            finally:
                with trio.CancelScope(shield=True):
                    await membership.leave()
                nursery.cancel_scope.cancel()


async def wait_for_peers(services: Services, bootstrap: Sequence[str], timeout: float) -> int:
    """Wait until membership knows a peer; if none shows up in time, say why bootstrap failed.

    Returns the number of live peers. Raises PeerUnreachable (or AuthenticationError: a wrong
    swarm key) naming each bootstrap address and what went wrong with it.
    """
    deadline = trio.current_time() + timeout
    while trio.current_time() < deadline:
        n = len(services.membership.live_peers())
        if n:
            return n
        await trio.sleep(0.1)
    reasons = []
    for address in bootstrap:
        try:
            await services.transport.call(address, messages.PING.name, {"nonce": 1}, timeout=3.0)
            reasons.append(f"{address} answers but did not let us join")
        except AuthenticationError as exc:
            raise AuthenticationError(f"bootstrap {address}: handshake refused ({exc}); is the swarm name/key the same?") from None
        except PeerTimeout:
            reasons.append(f"{address}: no answer (timed out)")
        except (PeerUnreachable, MurmurError, OSError) as exc:
            reasons.append(f"{address}: {exc}")
    raise PeerUnreachable(f"cannot join the swarm within {timeout:g}s: " + "; ".join(reasons))


def query_status(address: str, *, swarm: str, swarm_key: str | None, timeout: float) -> dict:
    """`murmur status`: ask the node at `address` for its status over the secure wire."""
    from node.config import check_address

    check_address(address, what="status")  # a malformed address fails before any socket opens
    key = swarm_key_from(swarm, swarm_key)
    from gossip.tcp import open_tcp_transport

    async def ask() -> dict:
        async with open_tcp_transport(Identity.generate(), key, listen=["127.0.0.1:0"]) as transport:
            reply = await transport.call(address, STATUS.name, {}, timeout=timeout)
            return dict(reply.body)

    return trio.run(ask)
