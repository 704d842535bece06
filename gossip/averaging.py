"""Group averaging without I/O: shards, the reducer's bookkeeping, and what the result says.

`group_average` runs reduce-scatter then all-gather (the bandwidth-optimal all-reduce): the
members' tensors are flattened and concatenated into one vector of `numel` values, split into
one contiguous shard per member (`shard_bounds`), and member i reduces shard i. Every member
sends its slice of shard i to member i, which waits for all slices (or its deadline), computes
the weighted mean over those it received intact, and sends the mean back to every member that
contributed. Each member sends and receives (n-1)/n of the vector twice, whatever n is.

Who contributed is stated per shard (`ShardReport`), because members can fail between shards: a
member that dies after sending its slices is in every shard but its own, and its own shard is
not averaged at all. `summarize` turns the shard reports into the result's exact claims
(`contributors`, `fractions`): nothing is called averaged that was not.

Numbers: slices are summed as float64 (so the mean of up to thousands of members loses nothing
to accumulation order), the mean is stored as float32.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from gossip.collective_types import ShardReport

# Why a contribution was refused (the `reason` field on the wire, and in logs).
OK = "ok"
NOT_MEMBER = "not_member"  # the sender is not in the sealed group
DUPLICATE = "duplicate"  # the sender already contributed to this shard
LATE = "late"  # the shard was already reduced without it
INVALID = "invalid"  # it did not decode, or had the wrong size, or was not finite
UNKNOWN = "unknown"  # no such key/round here (expired, never joined): dropped
WRONG_SHARD = "wrong_shard"  # sent to a member that does not reduce that shard
PART_REASONS = frozenset({OK, NOT_MEMBER, DUPLICATE, LATE, INVALID, UNKNOWN, WRONG_SHARD})


def shard_bounds(numel: int, n: int) -> list[tuple[int, int]]:
    """Split [0, numel) into n contiguous shards whose sizes differ by at most one.

    Shard i is [i*numel//n, (i+1)*numel//n): the larger shards come last, and every member
    computes the same bounds from (numel, n) alone.
    """
    if numel < 0 or n < 1:
        raise ValueError(f"need numel >= 0 and n >= 1, got numel={numel}, n={n}")
    return [(i * numel // n, (i + 1) * numel // n) for i in range(n)]


def layout_fingerprint(shapes: Sequence[Sequence[int]]) -> bytes:
    """16 bytes naming the tensor layout: only members with equal layouts average together."""
    text = ";".join(",".join(str(int(d)) for d in s) for s in shapes)
    return hashlib.sha256(b"murmur.avg.layout\0" + text.encode()).digest()[:16]


_FINITE_BLOCK = 1 << 16  # values per isfinite() call: the temporary mask stays in cache


def all_finite(values: np.ndarray) -> bool:
    """True if no value is NaN or infinite (1-D input; in cache-sized blocks, no big temporary)."""
    n = values.shape[0]
    if n <= _FINITE_BLOCK:
        return bool(np.isfinite(values).all())
    mask = np.empty(_FINITE_BLOCK, dtype=bool)
    for start in range(0, n, _FINITE_BLOCK):
        block = values[start : start + _FINITE_BLOCK]
        m = mask[: block.shape[0]]
        np.isfinite(block, out=m)
        if not m.all():
            return False
    return True


def check_values(values: np.ndarray, expected: int) -> str | None:
    """Why a decoded slice is unusable (None if it is fine): wrong size or not finite."""
    if values.ndim != 1 or values.shape[0] != expected:
        return f"shape {tuple(values.shape)}, expected ({expected},)"
    if values.dtype != np.float32:
        return f"dtype {values.dtype}, expected float32"
    if not all_finite(values):
        return "non-finite values"
    return None


@dataclass
class ShardReduction:
    """A reducer's state for its own shard: the running weighted sum and who is in it.

    `offer` is called once per incoming slice, in arrival order; `finalize` computes the mean
    (at the latest when the all-reduce deadline comes), after which every offer is LATE.
    """

    me: bytes
    members: tuple[bytes, ...]  # the sealed group
    own: np.ndarray  # our own slice of this shard, float32 (n_shard,); read, never written
    weight: float  # our own weight
    acc: np.ndarray = field(init=False)  # sum of weight * slice, float64 (n_shard,)
    total_weight: float = field(init=False)
    contributors: set[bytes] = field(init=False)
    rejected: dict[bytes, str] = field(default_factory=dict)  # peer -> why its slice was refused
    failed: dict[bytes, str] = field(default_factory=dict)  # peer -> why we stopped waiting for it
    mean: np.ndarray | None = None  # float32 (n_shard,), once finalized

    def __post_init__(self) -> None:
        if self.me not in self.members:
            raise ValueError("the reducer must be a member of its group")
        self.acc = self.own.astype(np.float64)
        if self.weight != 1.0:
            self.acc *= self.weight
        self.total_weight = float(self.weight)
        self.contributors = {self.me}

    @property
    def size(self) -> int:
        return int(self.own.shape[0])

    @property
    def waiting_for(self) -> set[bytes]:
        return set(self.members) - self.contributors - set(self.rejected) - set(self.failed)

    @property
    def complete(self) -> bool:
        """Every member has either contributed or been refused: nothing left to wait for."""
        return not self.waiting_for

    def offer(
        self, peer: bytes, weight: float, values: np.ndarray | None, problem: str | None, *, checked: bool = False
    ) -> str:
        """Add `peer`'s slice (already decoded; `problem` says why it could not be). Returns a reason.

        `checked`: the caller already ran `check_values(values, self.size)` (skips a second pass).
        """
        if self.mean is not None:
            return LATE
        if peer not in self.members:
            return NOT_MEMBER
        if peer in self.contributors or peer in self.rejected:
            return DUPLICATE
        if peer in self.failed:
            return LATE  # we stopped waiting for it (it looked dead); the shard goes on without it
        if problem is None and values is not None and not checked:
            problem = check_values(values, self.size)
        if problem is None and not (math.isfinite(weight) and weight > 0):
            problem = f"weight {weight!r} is not a finite number > 0"
        if problem is not None:
            self.rejected[peer] = problem
            return INVALID
        assert values is not None
        if weight == 1.0:  # the common case, in one pass without a temporary
            np.add(self.acc, values, out=self.acc)
        else:
            self.acc += values.astype(np.float64) * weight
        self.total_weight += weight
        self.contributors.add(peer)
        return OK

    def give_up_on(self, peer: bytes, why: str) -> None:
        """Stop waiting for `peer` (it is unreachable): the shard need not wait for the deadline."""
        if peer in self.waiting_for:
            self.failed[peer] = why

    def finalize(self) -> np.ndarray:
        """The weighted mean over the contributors so far (idempotent)."""
        if self.mean is None:
            np.divide(self.acc, self.total_weight, out=self.acc)
            self.mean = self.acc.astype(np.float32)
        return self.mean


def summarize(
    me: bytes, shards: Sequence[ShardReport], sizes: Sequence[int]
) -> tuple[tuple[bytes, ...], tuple[float, ...]]:
    """The result's claims from the shard reports: (contributors, fractions per tensor).

    `contributors` are the peers whose data is in *every* averaged shard (self always is); a
    member missing from any averaged shard is not listed, so `complete` can never be claimed for
    a mean that lacks someone. `fractions[i]` is the share of tensor i's elements that lie in
    averaged shards (an empty tensor counts as fully averaged).
    """
    averaged = [s for s in shards if s.averaged and s.stop > s.start]
    common = {me}
    if averaged:
        common = set(averaged[0].contributors)
        for s in averaged[1:]:
            common &= set(s.contributors)
        common.add(me)
    fractions = []
    offset = 0
    for size in sizes:
        lo, hi = offset, offset + size
        covered = sum(max(0, min(hi, s.stop) - max(lo, s.start)) for s in averaged)
        fractions.append(1.0 if size == 0 else covered / size)
        offset = hi
    return tuple(sorted(common)), tuple(fractions)


def split_flat(flat: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Cut the concatenated vector back into tensors of the given shapes (views of `flat`)."""
    out, offset = [], 0
    for shape in shapes:
        n = int(np.prod(shape, dtype=np.int64))
        out.append(flat[offset : offset + n].reshape(shape))
        offset += n
    return out
