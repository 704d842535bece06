"""Local tensor plumbing shared by the codecs: input normalisation, chunking, wire views.

Why chunks: a codec is a short pipeline of elementwise torch ops. Run over a whole 64 MiB
tensor, every op streams through memory and every temporary is a fresh allocation whose page
faults cost as much as the op. Run over chunks of ``CHUNK`` elements with scratch reused from
chunk to chunk, the temporaries stay in the L2 cache and only the input read and the output
write touch memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
from typing import Callable, Iterator

import numpy as np
import torch

# Elements per chunk: 128 Ki float32 = 512 KiB, so a chunk and its scratch fit a 2 MiB L2.
CHUNK = 1 << 17
# Outputs at least this large get their own huge-page mapping (see alloc).
HUGE_ALLOC_BYTES = 8 << 20


def alloc(n: int, dtype: torch.dtype, *, zeroed: bool = False) -> torch.Tensor:
    """An uninitialised 1-D tensor for a large codec output.

    A fresh 64 MiB tensor from the default allocator is backed by 16 Ki small pages, and the
    page faults on first touch cost as much as the codec itself (decode ran at half speed).
    A private anonymous mapping advised MADV_HUGEPAGE faults in 2 MiB pages instead. The
    tensor keeps the mapping alive; it is unmapped when the tensor is freed. A fresh anonymous
    mapping reads as zeros, so ``zeroed=True`` costs nothing extra there.
    """
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE_ALLOC_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(n, dtype=dtype) if zeroed else torch.empty(n, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass  # kernels without THP: still a valid mapping, just small pages
    return torch.frombuffer(region, dtype=dtype)


def _find_omp_set_num_threads() -> Callable[[int], None] | None:
    """libgomp's / libiomp's omp_set_num_threads, when torch's parallel backend is OpenMP."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        return ctypes.CDLL(None).omp_set_num_threads  # torch loads its OpenMP runtime globally
    except (OSError, AttributeError):
        return None


_omp_set_num_threads = _find_omp_set_num_threads()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed torch ops on the calling thread only, then restore its thread count.

    The kernels work on cache-sized chunks and gain nothing from intra-op threads; with the
    training using the same cores, those threads stall at every OpenMP barrier (measured on two
    shared cores: 0.1 GB/s instead of 1.5). The OpenMP thread count is a per-thread setting;
    ``omp_set_num_threads`` changes it for the calling thread alone, whereas
    ``torch.set_num_threads`` would also change the default of threads that start using torch
    meanwhile (a new worker thread starting a forward pass would keep one thread). Without an
    OpenMP backend this does nothing.
    """
    before = torch.get_num_threads()  # also runs torch's per-thread lazy init first
    if before == 1 or _omp_set_num_threads is None:
        yield
        return
    _omp_set_num_threads(1)
    try:
        yield
    finally:
        _omp_set_num_threads(before)


def as_flat_input(x: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` as a contiguous 1-D CPU float tensor (its own dtype, zero-copy where possible).

    numpy input is wrapped with ``torch.from_numpy`` (no copy) unless it is read-only, reversed
    (negative strides), longdouble or not in native byte order, which torch cannot wrap; those
    are copied once.
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"codecs encode float arrays, got numpy dtype {x.dtype}")
        if x.dtype.itemsize > 8:  # longdouble: torch has no such dtype
            x = x.astype(np.float64)
        if not x.dtype.isnative:
            x = x.astype(x.dtype.newbyteorder("="))
        if not x.flags.writeable or any(st < 0 for st in x.strides):  # torch cannot wrap these
            x = np.array(x, order="C", copy=True)
        t = torch.from_numpy(x)
    elif isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"codecs encode float tensors, got dtype {x.dtype}")
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
    else:
        raise TypeError(f"codecs encode torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    shape = tuple(t.shape)
    return t.reshape(-1).contiguous(), shape


def chunks(stop: int, step: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of at most ``step`` covering [0, stop)."""
    for start in range(0, stop, step):
        yield start, min(stop, start + step)


def load_f32(flat: torch.Tensor, start: int, stop: int, scratch: torch.Tensor) -> torch.Tensor:
    """Elements [start, stop) of ``flat`` as float32: a view, or converted into ``scratch``."""
    if flat.dtype == torch.float32:
        return flat[start:stop]
    out = scratch[: stop - start]
    out.copy_(flat[start:stop])
    return out


def wire_view(t: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor, sharing its memory (kept alive by the view)."""
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; the bytes are the same
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


# dtypes whose reductions run through numpy: several times faster than torch's on chunks.
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def minmax(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a non-empty 1-D CPU tensor; NaN anywhere makes both NaN."""
    if t.dtype in _NUMPY_DTYPES:
        a = t.numpy()
        return float(a.min()), float(a.max())
    lo, hi = torch.aminmax(t)
    return float(lo), float(hi)


def is_finite_range(lo: float, hi: float) -> bool:
    """True when min/max of some values show neither NaN nor infinity."""
    return -float("inf") < lo and hi < float("inf")  # NaN fails both comparisons


def check_finite_input(lo: float, hi: float, what: str) -> None:
    """Raise ValueError when a chunk's min/max show NaN or infinity (a NaN must not reach a peer)."""
    if not is_finite_range(lo, hi):
        raise ValueError(f"{what}: input contains NaN or infinity; refusing to encode it")
