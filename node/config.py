"""One node's configuration: a frozen dataclass, filled from defaults, a TOML file, then flags.

`murmur join` and `murmur local` take the same keys on the command line (`--sync-every 50`) and in
a TOML file (`sync_every = 50` or `sync-every = 50`); flags override the file, the file overrides
the defaults. Every value is checked at once in `NodeConfig.__post_init__`, so a bad value is one
clear `ValueError` that says how to fix it, before any socket opens or any model is built.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

ALGORITHMS = ("noloco", "diloco", "streaming-diloco")
# H when --sync-every is not given. NoLoCo's is the authors' 50. DiLoCo's paper uses 500 on
# 88k-step runs and Streaming DiLoCo 100; 100 for both keeps several syncs in a run of a few
# hundred steps (streaming syncs one of its 4 fragments every 25 steps).
DEFAULT_SYNC_EVERY = {"noloco": 50, "diloco": 100, "streaming-diloco": 100}
TASKS = ("lm",)


@dataclass(frozen=True)
class NodeConfig:
    """Everything one node needs. Paths are strings; None means "not given"."""

    # -- network --
    listen: tuple[str, ...] = ("127.0.0.1:0",)  # where peers reach us; port 0 = any free port
    announce: tuple[str, ...] = ()  # addresses peers should dial, e.g. PUBLIC_IP:PORT when listening
    #                                 on 0.0.0.0 or behind a port forward; () = the bound addresses
    bootstrap: tuple[str, ...] = ()  # addresses of nodes already in the swarm ("host:port")
    swarm: str = "murmur"  # open swarm name; its key is derived from the name (ignored with swarm_key)
    swarm_key: str | None = None  # file from `murmur swarm-key`: a private swarm, only holders can join
    identity: str | None = None  # key file from `murmur keygen`; default <checkpoint_dir>/identity.key
    join_timeout: float = 20.0  # seconds to reach a first peer through the bootstrap addresses
    min_peers: int = 0  # before training, wait (up to join_timeout) until this many peers are known
    #                    and each of them knows this many too (a start barrier: nodes start together)
    # -- algorithm --
    algorithm: str = "noloco"  # noloco | diloco | streaming-diloco
    sync_every: int | None = None  # H: inner steps between outer syncs; None = DEFAULT_SYNC_EVERY
    outer_lr: float | None = None  # outer learning rate; None = the algorithm's default
    outer_momentum: float | None = None  # outer momentum; None = the algorithm's default
    codec: str | None = None  # payload codec (fp32, bf16, e3m0, ...); None = the algorithm's default
    fragments: int | None = None  # streaming-diloco: number of fragments; None = its default
    delay: int | None = None  # streaming-diloco: τ, inner steps a fragment's sync overlaps; None = default
    merge_alpha: float | None = None  # streaming-diloco: α, weight of the local weights in the merge
    sync_timeout: float = 30.0  # seconds an outer sync may take before it is counted as missed
    # -- task --
    task: str = "lm"  # the built-in byte-level language model (node/lm_task.py)
    data: str | None = None  # text file or folder; None = the Python standard library's .py files
    seed: int = 0  # model-init seed: every node of one swarm must use the same one
    d_model: int = 128  # transformer width
    n_layer: int = 6  # transformer blocks (6 x 128 = 1.23M parameters, node/lm_task.LMConfig's default)
    n_head: int = 4  # attention heads (must divide d_model)
    context: int = 128  # bytes per training sequence
    batch_size: int = 8  # sequences per inner step
    lr: float = 1e-3  # inner AdamW peak learning rate
    warmup: int = 20  # inner steps of linear learning-rate warm-up
    weight_decay: float = 0.0  # inner AdamW weight decay
    threads: int = 1  # torch intra-op threads; 1 lets several nodes share a small machine fairly
    # -- budget --
    steps: int | None = None  # stop after this many inner steps (None = no step limit)
    duration: float | None = None  # stop after this many seconds of training (None = no time limit)
    eval_every: int = 100  # inner steps between evaluations of the held-out loss
    eval_seqs: int = 32  # held-out windows per evaluation (more = less noise, slower)
    # -- state --
    checkpoint_dir: str | None = None  # where checkpoints go; required by `murmur join`
    checkpoint_every: int = 200  # inner steps between checkpoints (and one at exit)
    keep_checkpoints: int = 2  # checkpoints kept on disk; older ones are deleted
    state_sync: bool = True  # with no checkpoint, fetch the model from a peer that has trained
    metrics: str | None = None  # JSONL metrics file; default <checkpoint_dir>/metrics.jsonl
    log_every: float = 2.0  # seconds between progress lines / metrics records
    quiet: bool = False  # no progress output at all (metrics are still written)

    def __post_init__(self) -> None:
        _check(self)

    # -- derived --------------------------------------------------------------------------------

    def identity_path(self) -> Path:
        if self.identity is not None:
            return Path(self.identity).expanduser()
        return self._ckpt_dir() / "identity.key"

    def metrics_path(self) -> Path:
        if self.metrics is not None:
            return Path(self.metrics).expanduser()
        return self._ckpt_dir() / "metrics.jsonl"

    def checkpoint_path(self) -> Path:
        return self._ckpt_dir()

    def _ckpt_dir(self) -> Path:
        if self.checkpoint_dir is None:
            raise ValueError("no --checkpoint-dir given; pass --checkpoint-dir DIR")
        return Path(self.checkpoint_dir).expanduser()

    @property
    def h(self) -> int:
        """The sync period in effect (the flag, else the algorithm's default)."""
        return self.sync_every if self.sync_every is not None else DEFAULT_SYNC_EVERY[self.algorithm]

    def algorithm_options(self) -> dict[str, Any]:
        """The algorithm options that were set (None = leave the algorithm's own default)."""
        keys = ["outer_lr", "outer_momentum", "codec"]
        if self.algorithm == "streaming-diloco":
            keys += ["fragments", "delay", "merge_alpha"]
        out: dict[str, Any] = {"sync_every": self.h, "timeout": self.sync_timeout}
        out.update({k: getattr(self, k) for k in keys if getattr(self, k) is not None})
        return out


def _positive(cfg: NodeConfig, name: str, allow_none: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name.replace('_', '-')} must be a positive number, got {value!r}")


def _check(cfg: NodeConfig) -> None:
    if cfg.algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {cfg.algorithm!r}")
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {cfg.task!r}")
    if not cfg.listen:
        raise ValueError("listen needs at least one HOST:PORT address")
    for name in ("listen", "announce", "bootstrap"):
        for addr in getattr(cfg, name):
            check_address(addr, what=name)
    if not cfg.swarm or len(cfg.swarm) > 128:
        raise ValueError(f"swarm name must be 1..128 characters, got {cfg.swarm!r}")
    if cfg.sync_every is not None and (isinstance(cfg.sync_every, bool) or not isinstance(cfg.sync_every, int) or cfg.sync_every < 1):
        raise ValueError(f"sync-every must be an integer >= 1, got {cfg.sync_every!r}")
    for name in ("d_model", "n_layer", "n_head", "context", "batch_size", "eval_every",
                 "eval_seqs", "checkpoint_every", "keep_checkpoints", "threads"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    for name in ("lr", "sync_timeout", "log_every", "join_timeout"):
        _positive(cfg, name)
    for name in ("outer_lr", "duration"):
        _positive(cfg, name, allow_none=True)
    if cfg.steps is not None and (isinstance(cfg.steps, bool) or not isinstance(cfg.steps, int) or cfg.steps < 1):
        raise ValueError(f"steps must be an integer >= 1, got {cfg.steps!r}")
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"d-model ({cfg.d_model}) must be a multiple of n-head ({cfg.n_head})")
    if isinstance(cfg.min_peers, bool) or not isinstance(cfg.min_peers, int) or cfg.min_peers < 0:
        raise ValueError(f"min-peers must be an integer >= 0, got {cfg.min_peers!r}")
    if cfg.warmup < 0 or cfg.seed < 0:
        raise ValueError("warmup and seed must be >= 0")
    if not 0.0 <= cfg.weight_decay < 1.0:
        raise ValueError(f"weight-decay must be in [0, 1), got {cfg.weight_decay}")
    if cfg.outer_momentum is not None and not 0.0 <= cfg.outer_momentum < 1.0:
        raise ValueError(f"outer-momentum must be in [0, 1), got {cfg.outer_momentum}")
    if cfg.merge_alpha is not None and not 0.0 <= cfg.merge_alpha <= 1.0:
        raise ValueError(f"merge-alpha must be in [0, 1], got {cfg.merge_alpha}")
    for name in ("fragments", "delay"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < (1 if name == "fragments" else 0)):
            raise ValueError(f"{name} must be a whole number (fragments >= 1, delay >= 0), got {value!r}")


def check_address(addr: str, what: str = "address") -> tuple[str, int]:
    """Split "host:port" or "[v6]:port"; a malformed one is a ValueError naming it."""
    if not isinstance(addr, str) or not addr:
        raise ValueError(f"{what}: empty address; expected HOST:PORT")
    if addr.startswith("["):
        host, sep, rest = addr[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{what}: malformed address {addr!r}; expected [IPv6]:PORT")
        port_s = rest[1:]
    else:
        host, sep, port_s = addr.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{what}: malformed address {addr!r}; expected HOST:PORT (IPv6 as [::1]:PORT)")
    if not host:
        raise ValueError(f"{what}: address {addr!r} has no host; expected HOST:PORT")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"{what}: address {addr!r} has a bad port; expected a number 0..65535")
    return host, int(port_s)


# ---------------------------------------------------------------------------------------------
# Building a config from layers
# ---------------------------------------------------------------------------------------------

FIELD_NAMES = tuple(f.name for f in fields(NodeConfig))
_TUPLE_FIELDS = {"listen", "announce", "bootstrap"}


def _field_type(name: str) -> str:
    return str(next(f.type for f in fields(NodeConfig) if f.name == name))


def _coerce(name: str, value: Any, where: str) -> Any:
    """A TOML value into the field's type, with an error that names the key and the file."""
    kind = _field_type(name)
    if name in _TUPLE_FIELDS:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: {name} must be a string or a list of strings")
        return tuple(value)
    if value is None:
        return None
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
        return value
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: {name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name} must be a string, got {value!r}")
    return value


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file into {field: value}; unknown keys and bad values are ValueErrors."""
    p = Path(path).expanduser()
    try:
        with open(p, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {str(p)!r} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"config file {str(p)!r} cannot be read: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELD_NAMES:
            raise ValueError(f"config file {str(p)!r}: unknown key {key!r}")
        out[name] = _coerce(name, value, f"config file {str(p)!r}")
    return out


def build_config(overrides: Mapping[str, Any], toml_path: str | None = None, **fixed: Any) -> NodeConfig:
    """Defaults < TOML file < `overrides` (flags that were given) < `fixed` (set by the caller)."""
    values: dict[str, Any] = {}
    if toml_path is not None:
        values.update(load_toml(toml_path))
    for key, value in overrides.items():
        if key not in FIELD_NAMES:
            raise ValueError(f"unknown option {key!r}")
        values[key] = tuple(value) if key in _TUPLE_FIELDS else value
    values.update(fixed)
    return NodeConfig(**values)


def config_to_dict(cfg: NodeConfig) -> dict[str, Any]:
    """Plain JSON-able values, e.g. for the metrics file's first record."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def to_toml(cfg: NodeConfig, skip: tuple[str, ...] = ()) -> str:
    """A TOML text that `load_toml` reads back to `cfg` (None values are left out)."""
    lines = []
    for f in fields(cfg):
        if f.name in skip:
            continue
        value = getattr(cfg, f.name)
        if value is None:
            continue
        if isinstance(value, tuple):
            lines.append(f"{f.name} = [{', '.join(_toml_str(v) for v in value)}]")
        elif isinstance(value, bool):
            lines.append(f"{f.name} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{f.name} = {value!r}")
        else:
            lines.append(f"{f.name} = {_toml_str(value)}")
    return "\n".join(lines) + "\n"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


