"""Error feedback around a lossy codec: EF21 with EControl's eta (default), or classic EF.

One ``ErrorFeedback`` object is one stream of messages from one sender (same shape each time);
a receiver keeps one ``ErrorFeedbackReceiver`` per sender stream. ALGORITHMS.md §6.

mode "ef21" (default): EF21 (Richtarik, Sokolov, Fatkhullin 2021) with the error term of EControl
(Gao, Islamov, Stich, ICLR 2024). Sender and receivers hold h, the receivers' estimate of the
input; the sender also holds e. For input g and lossy codec C:

    delta = C(eta * e + g - h)        # the message
    e    <- e + (g - h) - delta
    h    <- h + delta                 # receivers do the same with the decoded delta

Message 0 of a stream (``first_full=True``, the §6 default) is g itself in fp32, so h = g, e = 0.
Then e = sum_t (g_t - h_t): the sum of the receivers' estimates tracks the sum of the inputs,
off by exactly the residual e. eta = 0 is plain EF21 (h tracks g; e is not fed back and may
drift); eta > 0 feeds e back, which keeps it bounded. §6 proposes eta in {0.05, 0.1, 0.5, 1}.

Stability limit: with p = eta * e + g - h, the next message's input is roughly
(1 + eta) * (p - C(p)) - eta**2 * e, so e stays bounded only while (1 + eta) * sqrt(1 - delta) < 1,
i.e. eta below about delta / 2, where delta is the codec's contraction
(||x - C(x)||**2 <= (1 - delta) ||x||**2). int8, uint4 and e3m0 (delta > 0.9) and sign1 (0.64 on
Gaussian data) are stable for eta up to 1 in tests; top-k has delta ~ ratio, so top-k 10% needs
eta <= 0.05 and diverges at eta = 0.5 (tests/test_error_feedback.py shows both).

mode "ef": classic error feedback (Seide et al. 2014; the worker side of 1-bit Adam):

    p = g + e;  c = C(p);  e <- p - c;  the message is c

A receiver needs no state (it decodes c with the codec), which suits groups whose members
change between rounds; sum_t c_t = sum_t g_t - e.

Wire: "ef" messages are plain codec messages. "ef21" messages are codec messages whose header
also holds "ef21_seq": the index of the message in the stream (0 starts or restarts it). A
receiver that misses a message cannot continue (its h would be wrong): it raises CodecError and
waits for the sender's next restart (``ErrorFeedback.reset()`` makes the next message 0).

Not thread-safe: one stream is encoded by one task at a time.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from compression.base import DEFAULT_MAX_NUMEL, Codec, CodecError, Header, decode_any
from compression.floats import Fp32Codec
from compression.layout import as_flat_input

MODES = ("ef21", "ef")
SEQ_KEY = "ef21_seq"
# Largest sequence number accepted from a peer (any int64 would do; this one fits msgpack uint32).
MAX_SEQ = (1 << 32) - 1


class ErrorFeedback:
    """Stateful error feedback for one stream of same-shaped messages (see the module docstring)."""

    def __init__(self, codec: Codec, eta: float = 0.0, *, mode: str = "ef21", first_full: bool = True) -> None:
        if not isinstance(codec, Codec):
            raise ValueError(f"codec must be a Codec (use compression.base.get_codec), got {codec!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a float in [0, 1] (ALGORITHMS.md §6 tunes 0.05..1), got {eta!r}")
        if mode == "ef" and eta != 0.0:
            raise ValueError("eta applies to mode='ef21' only; classic EF always feeds back the whole error")
        self.codec = codec
        self.eta = float(eta)
        self.mode = mode
        self.first_full = bool(first_full)
        self._shape: tuple[int, ...] | None = None
        self._e: torch.Tensor | None = None  # (numel,) float32 error accumulator
        self._h: torch.Tensor | None = None  # (numel,) float32 receivers' estimate
        self._seq = 0

    @property
    def residual(self) -> torch.Tensor | None:
        """e: sum of inputs minus sum of receivers' estimates so far (None before the first message)."""
        return None if self._e is None else self._e.view(self._shape)

    @property
    def estimate(self) -> torch.Tensor | None:
        """What a receiver that got every message holds for the latest input (read-only)."""
        return None if self._h is None else self._h.view(self._shape)

    def reset(self) -> None:
        """Forget the state; the next message restarts the stream (ef21_seq 0)."""
        self._shape, self._e, self._h, self._seq = None, None, None, 0

    def encode(self, x: torch.Tensor | np.ndarray) -> tuple[Header, list[memoryview]]:
        flat, shape = as_flat_input(x)
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"stream shape changed from {list(self._shape)} to {list(shape)}; call reset() first")
        g = flat.to(torch.float32)
        if self.mode == "ef":
            return self._encode_ef(g, shape)
        return self._encode_ef21(g, shape)

    def _encode_ef(self, g: torch.Tensor, shape: tuple[int, ...]) -> tuple[Header, list[memoryview]]:
        if self._e is None:
            self._shape, self._e = shape, torch.zeros_like(g)
        p = g + self._e  # fresh: the codec's buffers may alias it, so it is never modified
        header, buffers = self.codec.encode(p.view(shape))
        c = self.codec.decode(header, buffers).view(-1)  # exactly what a receiver decodes
        torch.sub(p, c, out=self._e)
        self._h = c
        return header, buffers

    def _encode_ef21(self, g: torch.Tensor, shape: tuple[int, ...]) -> tuple[Header, list[memoryview]]:
        if self._h is None:
            self._shape, self._seq = shape, 0
            self._e = torch.zeros_like(g)
            if self.first_full:
                self._h = g.clone()
                header, buffers = Fp32Codec().encode(self._h.clone().view(shape))
                return self._stamp(header), buffers
            self._h = torch.zeros_like(g)
        assert self._e is not None
        d = g - self._h
        p = torch.add(d, self._e, alpha=self.eta) if self.eta else d  # never modified after encode
        header, buffers = self.codec.encode(p.view(shape))
        delta = self.codec.decode(header, buffers).view(-1)
        self._e.add_(d).sub_(delta)
        self._h.add_(delta)
        return self._stamp(header), buffers

    def _stamp(self, header: Header) -> Header:
        header[SEQ_KEY] = self._seq
        self._seq += 1
        return header

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (safetensors-friendly); empty tensors before the first message."""
        empty = torch.empty(0)
        return {
            "residual": empty if self._e is None else self.residual.clone(),
            "estimate": empty if self._h is None else self.estimate.clone(),
            "seq": self._seq,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        e, h, seq = state["residual"], state["estimate"], int(state["seq"])
        if e.numel() == 0:
            self.reset()
            return
        if e.shape != h.shape:
            raise ValueError(f"residual shape {list(e.shape)} != estimate shape {list(h.shape)}")
        self._shape = tuple(e.shape)
        self._e = e.detach().to(torch.float32).reshape(-1).clone()
        self._h = h.detach().to(torch.float32).reshape(-1).clone()
        self._seq = seq


class ErrorFeedbackReceiver:
    """The receiving end of one sender's stream: returns the estimate of each message's input.

    "ef21" messages (headers with "ef21_seq") update the running estimate h; plain codec
    messages (classic "ef") are decoded on their own. Any codec the header names is accepted.
    """

    def __init__(self, *, max_numel: int = DEFAULT_MAX_NUMEL) -> None:
        self.max_numel = max_numel
        self._h: torch.Tensor | None = None
        self._next_seq = 0

    def decode(self, header: Header, buffers: Sequence[Any], expected_shape: Sequence[int] | None = None) -> torch.Tensor:
        if not isinstance(header, dict):
            raise CodecError(f"header must be a dict, got {type(header).__name__}")
        if SEQ_KEY not in header:
            return decode_any(header, buffers, expected_shape, max_numel=self.max_numel)
        seq = header[SEQ_KEY]
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
            raise CodecError(f"{SEQ_KEY} must be an int in [0, {MAX_SEQ}], got {seq!r}")
        body = {k: v for k, v in header.items() if k != SEQ_KEY}
        if seq == 0:
            h = decode_any(body, buffers, expected_shape, max_numel=self.max_numel)
            self._h, self._next_seq = h, 1
            return h.clone()
        if self._h is None or seq != self._next_seq:
            raise CodecError(f"EF21 stream out of step: expected message {self._next_seq}, got {seq}; "
                             "waiting for the sender to restart the stream")
        if expected_shape is not None and tuple(expected_shape) != tuple(self._h.shape):
            raise CodecError(f"EF21 stream has shape {list(self._h.shape)}, caller expects {list(expected_shape)}")
        delta = decode_any(body, buffers, self._h.shape, max_numel=self.max_numel)
        self._h.add_(delta)
        self._next_seq += 1
        return self._h.clone()
