"""`make_outer(algorithm, model, inner_opt, comm, **options)`: build an outer optimizer by name.

Options are the fields of the algorithm's config (`DiLoCoConfig`, `StreamingConfig`,
`NoLoCoConfig`); Streaming DiLoCo also takes `blocks=` (a list of modules, one per block). The
result is not attached yet: use it as a context manager or call `.attach()`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

import torch

from optimizers.base import OuterOptimizer
from optimizers.diloco import DiLoCo, DiLoCoConfig
from optimizers.noloco import NoLoCo, NoLoCoConfig
from optimizers.streaming import StreamingConfig, StreamingDiLoCo

if TYPE_CHECKING:
    from optimizers.comm import Comm

ALGORITHMS: dict[str, tuple[type[OuterOptimizer], type]] = {
    "diloco": (DiLoCo, DiLoCoConfig),
    "streaming-diloco": (StreamingDiLoCo, StreamingConfig),
    "noloco": (NoLoCo, NoLoCoConfig),
}


def make_outer(
    algorithm: str, model: torch.nn.Module, inner_opt: torch.optim.Optimizer, comm: "Comm", **options: Any
) -> OuterOptimizer:
    """E.g. `make_outer("noloco", model, opt, comm, sync_every=50, codec="bf16")`.

    Unknown algorithm or option names raise ValueError listing the valid ones.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    cls, config_cls = ALGORITHMS[algorithm]
    names = {f.name for f in fields(config_cls)}
    extra = {"blocks"} if cls is StreamingDiLoCo else set()
    unknown = sorted(set(options) - names - extra)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {algorithm}; valid: {sorted(names | extra)}")
    config = config_cls(**{k: v for k, v in options.items() if k in names})
    if cls is StreamingDiLoCo:
        return cls(model, inner_opt, comm, config, blocks=options.get("blocks"))
    return cls(model, inner_opt, comm, config)
