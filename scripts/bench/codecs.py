"""Codec throughput, size and error on a large float32 tensor, against memcpy in the same run.

For each codec: encode and decode GB/s (GB = 1e9 bytes of float32 input), the round trip
(input bytes / (encode + decode time)), bits per value including scales and the msgpack header,
and the relative L2 error on Gaussian data and on heavy-tailed data (Student-t, df = 2). memcpy
is a copy of the same tensor into a preallocated one. A naive torch blockwise int8 (whole-tensor
ops, fresh temporaries) is measured too, as the reference the issue quotes.

Every time is the best of ``--trials`` runs, with the codecs interleaved within each trial: on a
shared machine other work only slows a run down, so the best run is the least disturbed one.
``--threads`` sets torch.set_num_threads (default 1: on two shared cores, intra-op threads stall
whenever the other core is busy; the codecs run over cache-sized chunks and need no threads).

    python scripts/bench/codecs.py [--mib 64] [--trials 5] [--threads 1] [--codecs int8,e3m0]
                                   [--json PATH]

JSON: {"memcpy_gbps", "threads", "mib", "naive_int8": {...}, "codecs": [{"name", "encode_gbps",
"decode_gbps", "roundtrip_gbps", "bits_per_value", "rel_l2_gauss", "rel_l2_heavy"}, ...]}.
Targets: roundtrip_gbps >= 1.0 for every codec; bits_per_value <= 4.3 for 4-bit codecs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without install

import msgpack  # noqa: E402
import torch  # noqa: E402

from compression.base import codec_names, get_codec  # noqa: E402

FOUR_BIT = ("uint4", "e3m0")


def best_time(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def naive_int8(x: torch.Tensor, block: int = 64) -> tuple[float, float]:
    """The reference: whole-tensor torch ops, a fresh temporary per step (encode s, decode s)."""
    t0 = time.perf_counter()
    v = x.view(-1, block)
    scale = v.abs().amax(dim=1, keepdim=True) / 127
    q = torch.round(v / scale).to(torch.int8)
    t1 = time.perf_counter()
    y = q.to(torch.float32) * scale
    t2 = time.perf_counter()
    del y
    return t1 - t0, t2 - t1


def rel_l2(codec, x: torch.Tensor) -> float:
    y = codec.decode(*codec.encode(x))
    return float((y - x).norm() / x.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB of float32 input (default 64)")
    parser.add_argument("--trials", type=int, default=5, help="runs per figure; the best is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--codecs", default=",".join(codec_names()), help="comma-separated codec names")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.mib < 1 or args.trials < 1 or args.threads < 1:
        parser.error("--mib, --trials and --threads must be >= 1")
    torch.set_num_threads(args.threads)

    n = args.mib * (1 << 20) // 4
    nbytes = 4 * n
    gen = torch.Generator().manual_seed(0)
    gauss = torch.randn(n, generator=gen)
    heavy = torch.randn(n, generator=gen) / torch.empty(n).exponential_(generator=gen).sqrt()  # t, df = 2
    names = [s for s in args.codecs.split(",") if s]
    codecs = {name: get_codec(name) for name in names}

    dst = torch.empty_like(gauss)
    enc = {name: float("inf") for name in names}
    dec = dict(enc)
    memcpy, naive_enc, naive_dec = float("inf"), float("inf"), float("inf")
    sizes: dict[str, int] = {}
    for _ in range(args.trials):
        memcpy = min(memcpy, best_time(lambda: dst.copy_(gauss))[0])
        ne, nd = naive_int8(gauss)
        naive_enc, naive_dec = min(naive_enc, ne), min(naive_dec, nd)
        for name, codec in codecs.items():
            te, (header, buffers) = best_time(lambda: codec.encode(gauss))
            td, _ = best_time(lambda: codec.decode(header, buffers))
            enc[name], dec[name] = min(enc[name], te), min(dec[name], td)
            sizes[name] = sum(len(b) for b in buffers) + len(msgpack.packb(header))
            del header, buffers

    gbps = lambda seconds: nbytes / seconds / 1e9  # noqa: E731
    rows = []
    for name, codec in codecs.items():
        rows.append({
            "name": name,
            "encode_gbps": round(gbps(enc[name]), 3),
            "decode_gbps": round(gbps(dec[name]), 3),
            "roundtrip_gbps": round(gbps(enc[name] + dec[name]), 3),
            "bits_per_value": round(8 * sizes[name] / n, 4),
            "rel_l2_gauss": round(rel_l2(codec, gauss), 6),
            "rel_l2_heavy": round(rel_l2(codec, heavy), 6),
        })
    results = {
        "mib": args.mib, "threads": args.threads, "trials": args.trials,
        "memcpy_gbps": round(gbps(memcpy), 3),
        "naive_int8": {"encode_gbps": round(gbps(naive_enc), 3), "decode_gbps": round(gbps(naive_dec), 3)},
        "codecs": rows,
    }

    print(f"{args.mib} MiB float32, {args.threads} thread(s), best of {args.trials}; "
          f"memcpy {results['memcpy_gbps']:.2f} GB/s; naive int8 encode "
          f"{results['naive_int8']['encode_gbps']:.2f}, decode {results['naive_int8']['decode_gbps']:.2f} GB/s")
    print(f"{'codec':<10}{'enc GB/s':>10}{'dec GB/s':>10}{'rt GB/s':>10}{'rt/memcpy':>11}"
          f"{'bits/val':>10}{'relL2 gauss':>13}{'relL2 t2':>10}  targets")
    for r in rows:
        ok = r["roundtrip_gbps"] >= 1.0 and (r["name"] not in FOUR_BIT or r["bits_per_value"] <= 4.3)
        print(f"{r['name']:<10}{r['encode_gbps']:>10.2f}{r['decode_gbps']:>10.2f}{r['roundtrip_gbps']:>10.2f}"
              f"{r['roundtrip_gbps'] / results['memcpy_gbps']:>11.3f}{r['bits_per_value']:>10.3f}"
              f"{r['rel_l2_gauss']:>13.4f}{r['rel_l2_heavy']:>10.4f}  {'ok' if ok else 'MISSED'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
