"""Reused CPU memory for the fast kernels' large tensors (eager code).

glibc gives freed memory at the top of its heap back to the system, so a CPU training step that frees what the
previous one allocated takes it back page by page: every first touch of a 4 KiB page is a page fault that zero-fills
it. On small VMs that costs a third of a fast D-STGA step at T=30, 48 px (`python -m benchmarks.allocator` shows it
with glibc's tunables). The CUDA caching allocator avoids this on GPUs; on CPU the fast kernels keep their own
buffers, in the spirit of oneDNN's scratchpad. A buffer is handed out again only once no tensor uses its memory any
more (its storage's reference count says so), so a tensor that autograd saved, or that a caller kept, is never
overwritten.

The pool serves only:
- requests made inside `pooling(True)` (the kernels open it where it pays, see `attention_fast.POOLED_MAX_TOKENS`);
- eager CPU code (compiled code plans its own memory, CUDA has its caching allocator);
- code where autograd does not record (inside the kernels' autograd functions: an `out=` buffer cannot join a
  graph);
- tensors of at least `MIN_POOLED_BYTES`.

Each thread has its own pool of at most `max_pooled_bytes()` bytes (`TIMO_CPU_BUFFER_POOL_MB`, `0` turns the pool
off); `release_buffers()` frees the calling thread's buffers. Buffers made under `torch.inference_mode` (inference
tensors) serve only requests made under it again.
"""

import bisect
import contextlib
import math
import os
import threading

import torch


# glibc serves smaller blocks from its heap's free lists; from this size on (its initial mmap threshold) a block may
# come from fresh pages.
MIN_POOLED_BYTES = 128 << 10
DEFAULT_POOL_MB = 1024
# The pool's buffers are free when their storage is referenced by the pool's tensor and by the storage object made
# to ask (no other tensor, view or saved tensor).
_FREE_USE_COUNT = 2
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def max_pooled_bytes() -> int:
    """Most bytes one thread's pool holds (`TIMO_CPU_BUFFER_POOL_MB`, default 1024; 0 turns pooling off)."""
    value = os.environ.get("TIMO_CPU_BUFFER_POOL_MB", str(DEFAULT_POOL_MB))
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"TIMO_CPU_BUFFER_POOL_MB must be a number of MiB, got {value!r}") from None
    return int(megabytes * (1 << 20))


def _is_free(buffer: torch.Tensor) -> bool:
    return _use_count(buffer.untyped_storage()._cdata) == _FREE_USE_COUNT


class _BufferPool(threading.local):
    """Flat buffers per `(dtype, inference mode)`, in ascending size. A request takes the smallest free buffer that is
    large enough (a view of its start); where none is, the free buffers of that kind are given back (the heap can
    join them for the new one) and a new buffer is made, which the pool keeps if it has room. So the pool never holds
    more than the most of its memory that was in use at once (a buffer counting whole where a smaller tensor used
    it)."""

    def __init__(self):
        self.buffers: dict[tuple[torch.dtype, bool], list[torch.Tensor]] = {}
        self.held_bytes = 0
        self.serving = False

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        kind = self.buffers.setdefault((dtype, torch.is_inference_mode_enabled()), [])
        for buffer in kind[bisect.bisect_left(kind, numel, key=torch.Tensor.numel) :]:
            if _is_free(buffer):
                return buffer[:numel].view(shape)
        self._give_back_free(kind)
        buffer = torch.empty(numel, dtype=dtype)
        nbytes = buffer.untyped_storage().nbytes()
        if self.held_bytes + nbytes <= max_pooled_bytes():
            bisect.insort(kind, buffer, key=torch.Tensor.numel)
            self.held_bytes += nbytes
        return buffer.view(shape)

    def _give_back_free(self, kind: list[torch.Tensor]) -> None:
        in_use = []
        for buffer in kind:
            if _is_free(buffer):
                self.held_bytes -= buffer.untyped_storage().nbytes()
            else:
                in_use.append(buffer)
        kind[:] = in_use

    def release(self) -> None:
        self.buffers.clear()
        self.held_bytes = 0


_POOL = _BufferPool()


def pooled_empty(shape, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor | None:
    """An uninitialised contiguous `shape` tensor from the calling thread's pool, or `None` where the pool does not
    serve it (outside `pooling(True)`, compiled code, autograd recording, non-CPU or subclassed tensors, small
    tensors, pooling off): then the caller's operation allocates. Pass it as `out=`."""
    if not _POOL.serving or torch.compiler.is_compiling() or torch.is_grad_enabled() or _use_count is None:
        return None
    if type(like) is not torch.Tensor or like.device.type != "cpu":  # fake, functional, batched tensors: not here
        return None
    shape = tuple(shape)
    if math.prod(shape) * dtype.itemsize < MIN_POOLED_BYTES or max_pooled_bytes() <= 0:
        return None
    return _POOL.empty(shape, dtype)


def empty(shape, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous `shape` tensor on `like`'s device: pooled where `pooled_empty` serves it."""
    buffer = pooled_empty(shape, dtype, like)
    return like.new_empty(tuple(shape), dtype=dtype) if buffer is None else buffer


@contextlib.contextmanager
def pooling(serve: bool = True):
    """Let `pooled_empty` serve the calling thread's requests inside this block if `serve` (else not)."""
    outer = _POOL.serving
    _POOL.serving = serve
    try:
        yield
    finally:
        _POOL.serving = outer


def release_buffers() -> None:
    """Free the calling thread's pooled buffers (those still in use stay alive with their tensors)."""
    _POOL.release()


def pooled_storages() -> list[tuple[torch.UntypedStorage, bool]]:
    """The storages of the calling thread's pooled buffers, each with whether a tensor uses it now."""
    return [(buffer.untyped_storage(), not _is_free(buffer)) for kind in _POOL.buffers.values() for buffer in kind]


def pooled_bytes() -> int:
    """Bytes the calling thread's pool holds."""
    return _POOL.held_bytes
