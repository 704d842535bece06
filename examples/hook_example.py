"""Two swarm members in one script, each training with an ordinary, unchanged PyTorch loop.

    python examples/hook_example.py [--algorithm noloco|diloco|streaming-diloco] [--steps 60]

Member A starts a swarm on loopback; member B joins it through A's address. Each wraps its own
model and optimizer with `swarm.wrap(...)`; from then on `opt.step()` also keeps the two models
in step with each other, every `sync_every` inner steps, over the real, encrypted wire.
In real use each member is a different machine: `murmur.join(bootstrap=["HOST:PORT"])`.
"""

from __future__ import annotations

import argparse
import threading

import torch
import torch.nn.functional as F

import murmur


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # every member starts from the same weights
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def train(swarm: murmur.Swarm, rank: int, args: argparse.Namespace, results: dict) -> None:
    model = make_model()
    options = {"sync_every": args.sync_every, "timeout": 20.0}
    if args.algorithm == "streaming-diloco":
        options.update(fragments=1, delay=0)  # this toy model has no transformer blocks to split
    opt = swarm.wrap(model, torch.optim.Adam(model.parameters(), lr=1e-2), algorithm=args.algorithm, **options)
    gen = torch.Generator().manual_seed(rank + 1)  # each member sees its own data
    w_true = torch.linspace(-1.0, 1.0, 8)  # ... of the same task
    losses = []
    for _ in range(args.steps):  # the user's loop, unchanged
        x = torch.randn(32, 8, generator=gen)
        y = (x @ w_true).unsqueeze(1)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    opt.detach()
    results[rank] = (sum(losses[:5]) / 5, sum(losses[-5:]) / 5, opt.stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", default="noloco", choices=["noloco", "diloco", "streaming-diloco"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sync-every", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict = {}
    with murmur.join(listen=["127.0.0.1:0"]) as a:
        with murmur.join(bootstrap=list(a.addresses), listen=["127.0.0.1:0"]) as b:
            print(f"member 0 {a.peer_id[:12]} on {a.addresses[0]}; member 1 {b.peer_id[:12]} joined it")
            threads = [threading.Thread(target=train, args=(s, r, args, results)) for r, s in enumerate((a, b))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            sent = (a.traffic.bytes_sent, b.traffic.bytes_sent)
    for rank in sorted(results):
        start, end, stats = results[rank]
        print(
            f"member {rank}: loss {start:.4f} -> {end:.4f}, syncs done {stats.syncs_done}, "
            f"missed {stats.syncs_missed}, bytes sent {sent[rank]}"
        )


if __name__ == "__main__":
    main()
