"""LocalGroup (in-process collectives) and TrioComm (the bridge into a node's trio loop)."""

from __future__ import annotations

import threading

import msgpack
import numpy as np
import pytest
import trio

from compression.base import get_codec
from gossip.collective_types import AverageResult, PairResult
from gossip.errors import LocalProtocolError, PeerTimeout
from optimizers.comm import LocalGroup, TrioComm
from optimizers.pairing import pair_matching

FP32 = get_codec("fp32")


def pid(rank: int) -> bytes:
    return b"rank" + rank.to_bytes(4, "big")


def arr(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float32)


# ---- group_average --------------------------------------------------------------------------


def test_round_robin_resolves_when_all_ranks_submitted() -> None:
    g = LocalGroup(3)
    c = [g.comm(r) for r in range(3)]
    f0 = c[0].group_average("k", [arr(1, 2), arr(4)], FP32, weight=1.0)
    f1 = c[1].group_average("k", [arr(3, 6), arr(0)], FP32, weight=2.0)
    assert not f0.done() and not f1.done()
    f2 = c[2].group_average("k", [arr(5, -2), arr(8)], FP32, weight=1.0)
    # weighted mean: ([1,2] + 2·[3,6] + [5,−2]) / 4 = [12, 12]/4 = [3, 3];  (4 + 0 + 8)/4 = 3
    for f in (f0, f1, f2):
        res = f.result(timeout=0)
        assert isinstance(res, AverageResult)
        assert [t.tolist() for t in res.tensors] == [[3.0, 3.0], [3.0]]
        assert res.group == res.contributors == (pid(0), pid(1), pid(2))
        assert res.complete and not res.alone and res.fractions == (1.0, 1.0)
    # each rank sends (n−1)/n of each encoded tensor twice: 2·2·8 // 3 + 2·2·4 // 3 = 10 + 5 bytes
    assert g.bytes_sent == [15, 15, 15] and g.bytes_received == [15, 15, 15]


def test_results_are_independent_copies() -> None:
    g = LocalGroup(2)
    f0 = g.comm(0).group_average("k", [arr(1)], FP32)
    f1 = g.comm(1).group_average("k", [arr(3)], FP32)
    f0.result(0).tensors[0][0] = 99.0
    assert f1.result(0).tensors[0].tolist() == [2.0]


def test_threads_get_the_same_mean() -> None:
    g = LocalGroup(4)
    out: dict[int, list] = {}

    def worker(r: int) -> None:
        out[r] = g.comm(r).group_average("k", [arr(r, 2 * r)], FP32, timeout=30).result(timeout=30).tensors[0].tolist()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == {r: [1.5, 3.0] for r in range(4)}  # mean of 0..3 = 1.5, of 0,2,4,6 = 3


def test_each_contribution_goes_through_the_codec() -> None:
    bf16 = get_codec("bf16")
    g = LocalGroup(2)
    x0, x1 = arr(1.001, -3.3), arr(2.0002, 7.77)
    f0 = g.comm(0).group_average("k", [x0], bf16)
    g.comm(1).group_average("k", [x1], bf16)
    d0 = bf16.decode(*bf16.encode(x0), expected_shape=(2,)).numpy()
    d1 = bf16.decode(*bf16.encode(x1), expected_shape=(2,)).numpy()
    expected = (d0 + d1) / np.float32(2)
    assert f0.result(0).tensors[0].tolist() == expected.tolist()
    assert expected.tolist() != ((x0 + x1) / 2).tolist()  # the codec really rounded


def test_leave_releases_waiters() -> None:
    g = LocalGroup(3)
    f0 = g.comm(0).group_average("k", [arr(2)], FP32)
    f1 = g.comm(1).group_average("k", [arr(4)], FP32)
    assert not f0.done()
    g.leave(2)
    res = f1.result(0)
    assert res.tensors[0].tolist() == [3.0] and res.contributors == (pid(0), pid(1)) and res.complete
    assert g.live == frozenset({0, 1})
    with pytest.raises(LocalProtocolError, match="has left"):
        g.comm(2).group_average("k2", [arr(1)], FP32).result(0)


def test_deadline_gives_a_partial_result_and_late_comers_are_alone() -> None:
    g = LocalGroup(3)
    f0 = g.comm(0).group_average("k", [arr(2)], FP32, timeout=0.05)
    f1 = g.comm(1).group_average("k", [arr(4)], FP32, timeout=0.05)
    res = f0.result(timeout=10)
    assert res.tensors[0].tolist() == [3.0]
    assert res.contributors == (pid(0), pid(1)) and res.group == (pid(0), pid(1), pid(2))
    assert not res.complete and not res.alone and f1.result(0).contributors == res.contributors
    late = g.comm(2).group_average("k", [arr(7)], FP32).result(0)
    assert late.alone and late.tensors[0].tolist() == [7.0]


def test_mismatched_or_unencodable_contributions_are_excluded() -> None:
    g = LocalGroup(3)
    f0 = g.comm(0).group_average("k", [arr(2, 2)], FP32)
    f1 = g.comm(1).group_average("k", [arr(1, 2, 3)], FP32)  # wrong shape
    with pytest.raises(LocalProtocolError, match="differ from the group's"):
        f1.result(0)
    f2 = g.comm(2).group_average("k", [arr(4, np.nan)], FP32)  # codecs refuse to send NaN
    with pytest.raises(ValueError):
        f2.result(0)
    res = f0.result(0)  # nobody waits for the excluded ranks
    assert res.alone and res.group == (pid(0), pid(1), pid(2)) and not res.complete
    g.comm(0).group_average("k2", [arr(1)], FP32)
    with pytest.raises(LocalProtocolError, match="already joined"):
        g.comm(0).group_average("k2", [arr(1)], FP32).result(0)


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        LocalGroup(0)
    g = LocalGroup(2)
    with pytest.raises(ValueError, match="rank must be an int in"):
        g.comm(2)
    with pytest.raises(ValueError, match="weight must be"):
        g.comm(0).group_average("k", [arr(1)], FP32, weight=0.0)
    with pytest.raises(ValueError, match="timeout must be"):
        g.comm(0).group_average("k", [arr(1)], FP32, timeout=float("inf"))
    with pytest.raises(ValueError, match="msgpack-able"):
        g.comm(0).pair_exchange(0, {"x": object()}, [])


# ---- pair_exchange --------------------------------------------------------------------------


@pytest.mark.parametrize("w", [4, 5])
def test_pair_exchange_follows_the_shared_seed_matching(w: int) -> None:
    g = LocalGroup(w, seed=7)
    for rnd in (0, 1, 2):
        futs = [g.comm(r).pair_exchange(rnd, {"from": r, "round": rnd}, [bytes([r]) * (r + 1)]) for r in range(w)]
        pairs, unpaired = pair_matching(rnd, list(range(w)), seed=7)
        partner = {a: b for a, b in pairs} | {b: a for a, b in pairs}
        for r, f in enumerate(futs):
            res = f.result(0)
            if r == unpaired:
                assert res is None
                continue
            assert isinstance(res, PairResult)
            j = partner[r]
            assert res.peer_id == pid(j) and res.body == {"from": j, "round": rnd}
            assert [bytes(b) for b in res.buffers] == [bytes([j]) * (j + 1)]
    # bytes: body + buffers, each way, for every paired exchange
    assert sum(g.bytes_sent) == sum(g.bytes_received) > 0


def test_pair_exchange_bytes_exact() -> None:
    g = LocalGroup(2)
    body0, body1 = {"a": 1}, {"bb": [1, 2]}
    f0 = g.comm(0).pair_exchange(0, body0, [b"xyz"])
    f1 = g.comm(1).pair_exchange(0, body1, [b"12345", b"6"])
    assert f0.result(0).body == body1 and f1.result(0).body == body0
    n0 = len(msgpack.packb(body0)) + 3
    n1 = len(msgpack.packb(body1)) + 6
    assert g.bytes_sent == [n0, n1] and g.bytes_received == [n1, n0]


def test_pair_exchange_deadline_and_late_round() -> None:
    g = LocalGroup(3)
    f0 = g.comm(0).pair_exchange(4, {"r": 0}, [], timeout=0.05)
    f1 = g.comm(1).pair_exchange(4, {"r": 1}, [], timeout=0.05)
    assert f0.result(timeout=10).body == {"r": 1} and f1.result(0).body == {"r": 0}
    assert g.comm(2).pair_exchange(4, {"r": 2}, []).result(0) is None  # round already over


# ---- TrioComm -------------------------------------------------------------------------------


class FakeCollectives:
    """Async collectives in a trio loop, recording calls (a test double for gossip.collectives)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def group_average(self, key, tensors, codec, *, weight, timeout):
        await trio.sleep(0.01)  # only completes if the loop keeps running while the caller waits
        self.calls.append(("avg", key, weight, timeout, trio.lowlevel.current_task().name))
        me = (b"me",)
        return AverageResult(tensors=[t * 2 for t in tensors], group=me + (b"you",), contributors=me + (b"you",),
                             fractions=(1.0,) * len(tensors))

    async def pair_exchange(self, round, body, buffers, *, timeout):
        self.calls.append(("pair", round, body, timeout))
        if round == 13:
            raise trio.TooSlowError
        if round == 14:
            await trio.sleep_forever()
        return None if round == 0 else PairResult(peer_id=b"p", body={"echo": body}, buffers=list(buffers))


@pytest.mark.parametrize("use_nursery", [True, False])
async def test_trio_comm_runs_collectives_in_the_loop(use_nursery: bool) -> None:
    fake = FakeCollectives()
    async with trio.open_nursery() as nursery:
        comm = TrioComm(fake, trio.lowlevel.current_trio_token(), nursery if use_nursery else None)

        def training_thread() -> tuple:
            avg = comm.group_average("k", [arr(1, 2)], FP32, weight=2.0, timeout=3.0).result(timeout=10)
            none = comm.pair_exchange(0, {"a": 1}, [], timeout=1.0).result(timeout=10)
            pair = comm.pair_exchange(1, {"a": 1}, [b"x"], timeout=1.0).result(timeout=10)
            with pytest.raises(PeerTimeout):
                comm.pair_exchange(13, {}, [], timeout=1.0).result(timeout=10)
            return avg, none, pair

        avg, none, pair = await trio.to_thread.run_sync(training_thread)
    assert avg.tensors[0].tolist() == [2.0, 4.0]
    assert none is None and pair.body == {"echo": {"a": 1}} and list(pair.buffers) == [b"x"]
    assert fake.calls[0][:4] == ("avg", "k", 2.0, 3.0)
    assert fake.calls[1:] == [("pair", 0, {"a": 1}, 1.0), ("pair", 1, {"a": 1}, 1.0), ("pair", 13, {}, 1.0)]


async def test_trio_comm_fails_futures_when_the_loop_cancels_them() -> None:
    fake = FakeCollectives()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            comm = TrioComm(fake, trio.lowlevel.current_trio_token(), nursery)
            fut = await trio.to_thread.run_sync(lambda: comm.pair_exchange(14, {}, [], timeout=1.0))
            await trio.sleep(0.01)
            scope.cancel()
    with pytest.raises(LocalProtocolError, match="cancelled"):
        fut.result(timeout=0)
    # The nursery is closed now: a new call fails its future instead of raising or hanging.
    late = await trio.to_thread.run_sync(lambda: comm.group_average("k", [arr(1)], FP32))
    with pytest.raises(LocalProtocolError, match="cannot reach"):
        late.result(timeout=0)


def test_trio_comm_after_the_loop_is_gone() -> None:
    box: dict = {}

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()

    trio.run(main)
    comm = TrioComm(FakeCollectives(), box["token"])
    with pytest.raises(LocalProtocolError, match="cannot reach"):
        comm.group_average("k", [arr(1)], FP32).result(timeout=0)
    with pytest.raises(ValueError, match="trio_token"):
        TrioComm(FakeCollectives(), object())
    with pytest.raises(ValueError, match="async group_average"):
        TrioComm(object(), box["token"])
