"""Fast exact STGA and D-STGA kernels, selected with `config.stga_implementation = "fast"` (the default).

They compute what the reference kernels of `attention_timo` compute (same layout `[batch, heads, T, N, head_dim]`,
same joint softmax, no scaling) without ever holding the `[T, N, T + N]` logits of all frames:

- the softmax over the `T + N` logits of a query is split into its spatial part (an ordinary unscaled attention
  over the `N` tokens of a frame, which returns its log-sum-exp) and its temporal part (`T` logits per query), and
  the two are merged exactly through their log-sum-exps;
- STGA's spatial part runs frame by frame through a memory-efficient attention kernel (PyTorch's CPU flash
  attention where available, else the blocked kernel below), so its memory is `O(N * head_dim)` per frame;
- D-STGA's spatial logits `q_med k_med^T + offset(t, n)` share their softmax over keys across frames (the offset
  is constant along the keys), so the spatial softmax is computed once per (batch, head), applied to the values of
  all `T` frames in one product, and the offset enters only through the log-sum-exp. Its memory is one block of
  logits (a block of rows in forward, of key columns in backward) per (batch, head), never `T * N^2`;
- both are `torch.autograd.Function`s that keep the merged log-sum-exp (and the `T x T` temporal weights per
  token) and recompute the spatial weights in backward. The gradient of a spatial log-sum-exp is folded into the
  attention backward through its row term `sum(grad * out)` computed with the merged output, which is why the
  spatial kernel's own log-sum-exp output never needs a gradient.

On CPU the keys' and values' token copies for the temporal part carry up to two zero frames (`key_frames`), so that
the per-token products write rows a whole number of 8-float vectors wide; the padded frames get zero weight.

In eager code, D-STGA's token copies and medians are made by one more autograd function (`_EagerInputs`) from the
module's projections, whose backward writes the queries' and the packed keys' and values' gradients in the
projections' own layouts. Compiled code gets the keys' and values' gradient in the projection's layout from
`attention_timo.unpack` (D-STGA) and `attention_timo.pack_like` (STGA's backward): one stack, no re-layout after it.

In eager CPU code with small frames (`POOLED_MAX_TOKENS`), the kernels' large tensors come from a per-thread pool of
reused buffers (`buffer_pool`): a step then does not take its memory back from the system page by page.

Inputs of any floating dtype work; the softmax statistics are kept in float32 (float64 for float64 inputs) and
autocast is suspended inside the kernels, which compute in the dtype of their inputs.
"""

import contextlib
import functools

import torch
from torch.nn import functional as F

from . import buffer_pool
from .attention_timo import (
    autocast_enabled,
    dstga_reference,
    inverse_permutation,
    memory_order,
    pack_like,
    stga_reference,
    temporal_median,
    unpack,
)
from .buffer_pool import pooled_empty


# The portable spatial kernel holds at most this many logits per (batch * head) slice at a time.
BLOCK_ELEMENTS = 1 << 20
SMALL_BLOCK_ELEMENTS = 1 << 16
# Up to this many frames, products over the frames are unrolled (tiny batched matrix products are slow on CPU).
SMALL_FRAMES = 4
# STGA's backward reuses the forward's token-layout copies of q, k, v up to this many elements each (else makes them
# again).
KEEP_COPIES_ELEMENTS = 1 << 20
# Above this many frames the temporal median falls back to `torch.median` (the sorting network grows as T log^2 T).
MAX_NETWORK_FRAMES = 32
# The portable spatial kernel works with base-2 logits `log2(e) q.k`: `exp2` costs about half of `exp` on CPU.
LOG2_E = 1.4426950408889634
# On CPU the keys' and values' token copies get up to this many zero frames, so that the per-token temporal products
# write rows a whole number of `FRAME_ALIGNMENT` floats wide: MKL's batched products of small matrices are markedly
# slower otherwise (`benchmarks/temporal_products.py` measures it).
MAX_PADDING_FRAMES = 2
FRAME_ALIGNMENT = 8
# Eager CPU kernels take their large tensors from the buffer pool (`buffer_pool`) where frames hold at most this many
# tokens: there the work per byte is small and first touches of fresh pages weigh most (at T=30, 48 px, N=144, a third
# of a D-STGA step: `python -m benchmarks.allocator`). Larger frames feed more work per byte (the spatial products
# grow as N^2), and there the pool's buffers, idle between their uses while other tensors come from the heap, would
# raise the peak memory for little time saved.
POOLED_MAX_TOKENS = 256

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _no_autocast(tensor: torch.Tensor):
    """Suspend autocast: the kernels choose their own precision."""
    if autocast_enabled(tensor):
        return torch.autocast(device_type=tensor.device.type, enabled=False)
    return contextlib.nullcontext()


def _pooling(tokens: int):
    """The buffer pool serving this thread's eager code where frames hold at most `POOLED_MAX_TOKENS` tokens."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return buffer_pool.pooling(tokens <= POOLED_MAX_TOKENS)


def _statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of logits, log-sum-exps and softmax weights: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """`left @ right` for batched matrices, written into a pooled buffer in eager CPU code (`buffer_pool`)."""
    shape = (*torch.broadcast_shapes(left.shape[:-2], right.shape[:-2]), left.shape[-2], right.shape[-1])
    return torch.matmul(left, right, out=pooled_empty(shape, left.dtype, left))


def _contiguous(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.contiguous().to(dtype)`, copied into a pooled buffer in eager CPU code."""
    buffer = pooled_empty(tensor.shape, dtype, tensor)
    return tensor.contiguous().to(dtype) if buffer is None else buffer.copy_(tensor)


# ----------------------------------------------------------------------------------------------------------------
# Temporal median: a pruned sorting network of element-wise min/max (exact values, much faster than torch.median
# over a short non-last dimension), with the gradient routed to the median element as torch.median does.


def _build_median_network(num_frames: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """Comparators `(low, high, keep_min, keep_max)` whose outputs reach the lower median of `num_frames` values.

    Batcher's odd-even merge sort on the next power of two, minus the comparators that touch the padding (padding
    values are +inf and never leave the top positions) and minus those that cannot influence position
    `(num_frames - 1) // 2`.
    """
    size = 1
    while size < num_frames:
        size *= 2
    comparators = []
    merge = 1
    while merge < size:
        step = merge
        while step >= 1:
            for start in range(step % merge, size - step, 2 * step):
                for offset in range(min(step, size - start - step)):
                    low, high = start + offset, start + offset + step
                    if low // (2 * merge) == high // (2 * merge) and high < num_frames:
                        comparators.append((low, high))
            step //= 2
        merge *= 2
    needed = {(num_frames - 1) // 2}
    kept = []
    for low, high in reversed(comparators):
        keep_min, keep_max = low in needed, high in needed
        if keep_min or keep_max:
            kept.append((low, high, keep_min, keep_max))
            needed |= {low, high}
    return tuple(reversed(kept))


# Built once at import (a few milliseconds) so that torch.compile sees plain constants.
_MEDIAN_NETWORKS = tuple(_build_median_network(n) for n in range(MAX_NETWORK_FRAMES + 1))


# A constant for torch.compile: otherwise Dynamo guards every comparator of the network and checks all those guards
# on each call of a compiled block.
@torch.compiler.assume_constant_result
def median_network(num_frames: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """The pruned comparator network for the lower median of `num_frames` values (see `_build_median_network`)."""
    return _MEDIAN_NETWORKS[num_frames]


@functools.cache
def _workspace_plan(num_frames: int) -> tuple[tuple[tuple[int, int, int | None, int | None], ...], int]:
    """The median network run in a workspace of wires: per comparator `(low, high, min_slot, max_slot)`, the slots
    its kept outputs are written to (`None`: not kept), and the number of slots.

    A kept minimum gets a slot of its own (the maximum still reads both inputs); a kept maximum overwrites its high
    input where that is already a slot (element-wise, in place). An output the pruned network does not keep is never
    read again, nor is a replaced input, so their slots are free for the next comparators.
    """
    slot_of: list[int | None] = [None] * num_frames  # None: the wire is still the input frame
    free: list[int] = []
    plan, size = [], 0

    def take() -> int:
        nonlocal size
        if free:
            return free.pop()
        size += 1
        return size - 1

    for low, high, keep_min, keep_max in median_network(num_frames):
        min_slot = take() if keep_min else None
        max_slot = (slot_of[high] if slot_of[high] is not None else take()) if keep_max else None
        free.extend(slot for slot in (slot_of[low], None if keep_max else slot_of[high]) if slot is not None)
        slot_of[low], slot_of[high] = min_slot, max_slot
        plan.append((low, high, min_slot, max_slot))
    return tuple(plan), size


def median_values(tensor: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Lower median along `dim` (the values of `torch.median`), without autograd.

    Where the buffer pool serves (`buffer_pool`), the network runs in a pooled workspace of wires and a pooled copy
    of the median leaves it: every comparator's fresh result would allocate (and, on a heap that has shrunk,
    page-fault) a frame's worth of memory.
    """
    num_frames = tensor.shape[dim]
    if num_frames > MAX_NETWORK_FRAMES:
        return tensor.median(dim=dim).values
    wires = list(tensor.unbind(dim))
    workspace = None
    if num_frames > 1 and not torch.compiler.is_compiling():
        plan, size = _workspace_plan(num_frames)
        workspace = pooled_empty((size, *wires[0].shape), tensor.dtype, tensor)
    if workspace is None:
        for low, high, keep_min, keep_max in median_network(len(wires)):  # a Python int even where shapes are symbolic
            smaller = torch.minimum(wires[low], wires[high]) if keep_min else None
            if keep_max:
                wires[high] = torch.maximum(wires[low], wires[high])
            if keep_min:
                wires[low] = smaller
        return wires[(num_frames - 1) // 2]
    slots = workspace.unbind(0)
    for low, high, min_slot, max_slot in plan:
        smaller, larger = wires[low], wires[high]
        if min_slot is not None:
            wires[low] = torch.minimum(smaller, larger, out=slots[min_slot])
        if max_slot is not None:
            wires[high] = torch.maximum(smaller, larger, out=slots[max_slot])
    # Copied out: a view would keep the whole workspace from the pool for as long as the median lives.
    median = wires[(num_frames - 1) // 2]
    copy = pooled_empty(median.shape, median.dtype, median)
    return median.clone() if copy is None else copy.copy_(median)


def _median_frame(tensor: torch.Tensor, median: torch.Tensor, dim: int) -> torch.Tensor:
    """Frame of the median along `dim` (the first one where frames tie), as float32 (exact up to 2^24 frames).

    The largest of the matching frames' reversed numbers, not `argmax` (slow over a non-last dimension). A reduction
    also keeps compiled code from recomputing the frame in backward (it would redo an element-wise chain once per
    frame of the gradient). Eager code counts in bytes, in place of the comparison's booleans (a quarter of the
    memory traffic); compiled CPU code is slow with integer tensors, so it counts in float32.
    """
    frames = tensor.shape[dim]
    shape = (-1,) + (1,) * (tensor.dim() - dim - 1)
    matching = tensor == median.unsqueeze(dim)
    # A NaN frame makes the median NaN (min and max propagate it), and NaN equals nothing: the median's frame is then
    # the first NaN one, as torch.median's index says (where the median is a number, no frame is NaN). Eager CPU code
    # looks for NaN frames only if a median is NaN: a pass over the medians instead of one over all frames.
    if torch.compiler.is_compiling() or tensor.device.type != "cpu" or median.isnan().any():
        matching |= tensor.isnan()
    if torch.compiler.is_compiling() or frames > 255:
        reversed_frames = torch.arange(frames, 0, -1, dtype=torch.float32, device=tensor.device).view(shape)
        return frames - torch.where(matching, reversed_frames, 0.0).amax(dim)
    reversed_frames = torch.arange(frames, 0, -1, dtype=torch.uint8, device=tensor.device).view(shape)
    return frames - matching.view(torch.uint8).mul_(reversed_frames).amax(dim).float()


def _add_median_gradient(into: torch.Tensor, frame: torch.Tensor, grad_median: torch.Tensor, dim: int):
    """`into` plus the median's gradient `grad_median` at the median's frame `frame` (`_median_frame`) along `dim`:
    in place in eager code (a scatter touches only the median's elements), a new tensor in compiled code (there a
    scatter is a slow serial loop; this fuses)."""
    frame, grad_median = frame.unsqueeze(dim), grad_median.to(into.dtype).unsqueeze(dim)
    if torch.compiler.is_compiling():
        frames = torch.arange(into.shape[dim], dtype=frame.dtype, device=frame.device)
        frames = frames.view(-1, *([1] * (into.dim() - dim - 1)))
        return into + torch.where(frame == frames, grad_median, 0.0)
    return into.scatter_add_(dim, frame.long(), grad_median)


class _TemporalMedian(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        dim = dim % tensor.dim()
        median = median_values(tensor, dim)
        # The median's frame only matters for backward (not looked for at all without autograd).
        ctx.save_for_backward(_median_frame(tensor, median, dim) if ctx.needs_input_grad[0] else None)
        ctx.dim, ctx.shape = dim, tensor.shape
        return median

    @staticmethod
    def backward(ctx, grad_median: torch.Tensor):
        (frame,) = ctx.saved_tensors
        return _add_median_gradient(grad_median.new_zeros(ctx.shape), frame, grad_median, ctx.dim), None


def temporal_median_fast(tensor: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Same values as `attention_timo.temporal_median` (lower median over the frames), several times faster on CPU.

    The gradient reaches the median element, like `torch.median`'s; where several frames hold exactly the median
    value (ties), it goes to the first of them, and a NaN median's (a NaN among the frames) to the first NaN frame.
    """
    return _TemporalMedian.apply(tensor, dim)


# ----------------------------------------------------------------------------------------------------------------
# Spatial part: unscaled softmax attention `[..., N, E] x [..., M, E] x [..., M, Ev]` returning its log-sum-exp;
# its backward takes the merged output and log-sum-exp of the joint softmax (see the module docstring).


def _row_block(num_rows: int, num_keys: int) -> int:
    return max(1, min(num_rows, BLOCK_ELEMENTS // max(num_keys, 1)))


class _WorkBuffers:
    """`count` reusable blocks of logits of up to `[batch, rows, columns]`, passed as `out=`: allocated (and
    page-faulted) once per call, not once per block, which on CPU costs more than the products that fill them.

    While tracing there are none (`view` gives `None`, so each product makes its result): compiled code plans its
    own memory, and an `out=` of a symbolic size pins the sizes to their traced values (a recompilation for every
    other frame count; torch 2.11 fails outright inside the autograd function).
    """

    def __init__(self, batch: int, rows: int, columns: int, like: torch.Tensor, count: int = 1):
        self.batch = batch
        tracing = torch.compiler.is_compiling()
        self.storage = None if tracing else like.new_empty((count, batch * rows * columns))

    def view(self, rows: int, columns: int, index: int = 0) -> torch.Tensor | None:
        if self.storage is None:
            return None
        return self.storage[index, : self.batch * rows * columns].view(self.batch, rows, columns)


def _use_cpu_flash(query: torch.Tensor, value: torch.Tensor) -> bool:
    return _CPU_FLASH is not None and query.device.type == "cpu" and query.shape[-1] == value.shape[-1]


def spatial_attention_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`softmax(q k^T) v` over 4-D `[X, Y, N, E]` inputs and the log-sum-exp `[X, Y, N]` of each row's logits."""
    if _use_cpu_flash(query, value):
        return _CPU_FLASH(query, key, value, scale=1.0)
    stats = _statistics_dtype(query.dtype)
    lead, num_rows, num_keys = query.shape[:2], query.shape[2], key.shape[2]
    rows = query.reshape(-1, num_rows, query.shape[-1]).to(stats) * LOG2_E
    keys_t = key.reshape(-1, num_keys, key.shape[-1]).to(stats).transpose(1, 2)
    values = value.reshape(-1, num_keys, value.shape[-1]).to(stats)
    block = _row_block(num_rows, num_keys)
    logits = _WorkBuffers(rows.shape[0], block, num_keys, rows)
    outputs, lses = [], []
    for start in range(0, num_rows, block):
        chunk = rows[:, start : start + block]
        weights = torch.bmm(chunk, keys_t, out=logits.view(chunk.shape[1], num_keys))
        peak = weights.amax(-1, keepdim=True)
        weights = weights.sub_(peak).exp2_()
        total = weights.sum(-1, keepdim=True)
        outputs.append(_product(weights, values).div_(total))
        lses.append(peak.squeeze(-1) / LOG2_E + total.squeeze(-1).log())
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=1)
    return output.to(query.dtype).view(*lead, num_rows, -1), lse.view(*lead, num_rows)


def spatial_attention_backward(
    grad_output: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor | None,
    lse: torch.Tensor,
    row_term: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the spatial part of a joint softmax whose rows have log-sum-exp `lse` and output `output`.

    The weights are recomputed as `exp(q k^T - lse)`; the row term of the softmax gradient is `sum(grad * output)`
    (`row_term`, `[X, Y, N]`, may be passed instead of `output` where the CPU flash kernel is not used). With the
    merged statistics this is exactly the spatial share of the joint softmax's gradient.
    """
    if _use_cpu_flash(query, value):
        return _CPU_FLASH_BACKWARD(
            grad_output, query, key, value, output, lse.contiguous(), 0.0, False, scale=1.0
        )
    stats = _statistics_dtype(query.dtype)
    num_rows, num_keys = query.shape[2], key.shape[2]

    def flat(tensor, length):
        return tensor.reshape(-1, length, tensor.shape[-1]).to(stats)

    rows, keys, values = flat(query, num_rows), flat(key, num_keys), flat(value, num_keys)
    grads = flat(grad_output, num_rows)
    lse = lse.reshape(-1, num_rows, 1).to(stats)
    if row_term is None:
        row_term = (grads * flat(output, num_rows)).sum(-1, keepdim=True)
    else:
        row_term = row_term.reshape(-1, num_rows, 1).to(stats)
    # One extra column folds the subtractions into the products: [q, -lse] . [k, 1] = q.k - lse and
    # [g, -row_term] . [v, 1] = g.v - row_term, saving two passes over every block of logits (worth the copies
    # only where the logits outnumber the values). The weights are recomputed from base-2 logits (see LOG2_E).
    fold = num_keys > values.shape[-1]
    if fold:
        ones = keys.new_ones(keys.shape[0], num_keys, 1)
        rows_lse = torch.cat([rows, -lse], dim=-1).mul_(LOG2_E)
        keys_t = torch.cat([keys, ones], dim=-1).transpose(1, 2)
        grads_row = torch.cat([grads, -row_term], dim=-1)
        values_t = torch.cat([values, ones], dim=-1).transpose(1, 2)
    else:
        rows_lse, keys_t, grads_row, values_t = rows * LOG2_E, keys.transpose(1, 2), grads, values.transpose(1, 2)
        lse = lse * LOG2_E
    # Blocks of key columns over all rows: each block's keys' and values' gradients then come whole from products
    # as deep as the rows are many (these run near the matmul peak), and only the queries' gradient, `head_dim`
    # wide, accumulates over the blocks (row blocks would accumulate the keys' and the wider values' gradients
    # instead, through products only a block deep). Two blocks of logits are alive at once (weights and their
    # gradient), half of the forward's one block between them, and at most N^2 (small matrices, up to
    # SMALL_BLOCK_ELEMENTS per slice, are done in one block).
    budget = min(BLOCK_ELEMENTS // 2, max(num_rows * num_keys, SMALL_BLOCK_ELEMENTS))
    block = max(1, min(num_keys, budget // (2 * num_rows)))
    buffers = _WorkBuffers(rows.shape[0], num_rows, block, rows, count=2)
    grad_rows = None
    grad_keys, grad_values = [], []
    for start in range(0, num_keys, block):
        size = min(block, num_keys - start)
        columns = slice(start, start + size)
        weights = torch.bmm(rows_lse, keys_t[..., columns], out=buffers.view(num_rows, size))
        weights = (weights if fold else weights.sub_(lse)).exp2_()
        grad_values.append(_product(weights.transpose(1, 2), grads))
        grad_logits = torch.bmm(grads_row, values_t[..., columns], out=buffers.view(num_rows, size, 1))
        grad_logits = (grad_logits if fold else grad_logits.sub_(row_term)).mul_(weights)
        grad_keys.append(torch.bmm(grad_logits.transpose(1, 2), rows))
        if grad_rows is None:
            grad_rows = torch.bmm(grad_logits, keys[:, columns])
        else:
            grad_rows.baddbmm_(grad_logits, keys[:, columns])
    grad_keys = grad_keys[0] if len(grad_keys) == 1 else torch.cat(grad_keys, dim=1)
    grad_values = grad_values[0] if len(grad_values) == 1 else torch.cat(grad_values, dim=1)
    return (
        grad_rows.to(query.dtype).view(query.shape),
        grad_keys.to(key.dtype).view(key.shape),
        grad_values.to(value.dtype).view(value.shape),
    )


# ----------------------------------------------------------------------------------------------------------------
# Temporal part and the merge, in "token layout" `[B, heads, N, T, ...]`: there the temporal logits of all queries
# are one batched product of contiguous `[T, d]` matrices.


def key_frames(frames: int, device: torch.device) -> int:
    """How many frames the keys' and values' token copies hold: `frames`, plus up to `MAX_PADDING_FRAMES` zero
    frames on CPU where that makes the count a multiple of `FRAME_ALIGNMENT`."""
    aligned = -(-frames // FRAME_ALIGNMENT) * FRAME_ALIGNMENT
    if device.type == "cpu" and frames > SMALL_FRAMES and aligned - frames <= MAX_PADDING_FRAMES:
        return aligned
    return frames


def _pad_frames(tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """Token layout `[..., T, d]` -> `[..., frames, d]` (contiguous where padded), the frames past `T` zero."""
    padding = frames - tokens.shape[-2]
    return torch.nn.functional.pad(tokens, (0, 0, 0, padding)) if padding else tokens


def _by_token(tensor: torch.Tensor, dtype: torch.dtype, frames: int | None = None) -> torch.Tensor:
    """`[..., B, h, T, N, d]` (any strides) -> contiguous `[..., B, h, N, frames, d]` in `dtype`, the frames past
    `T` zero."""
    tokens = tensor.transpose(-3, -2)
    if frames is None or frames == tensor.shape[-3]:
        return _contiguous(tokens, dtype)
    padded = pooled_empty((*tokens.shape[:-2], frames, tokens.shape[-1]), dtype, tensor)
    if padded is None:
        return _pad_frames(tokens.to(dtype), frames)
    padded[..., : tokens.shape[-2], :].copy_(tokens)
    padded[..., tokens.shape[-2] :, :].zero_()
    return padded


def _by_frame(tensor: torch.Tensor) -> torch.Tensor:
    """`[B, h, N, T, ...]` -> `[B, h, T, N, ...]` view."""
    return tensor.transpose(2, 3)


def _merge(spatial_lse: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
    """Joint log-sum-exp `[B, h, N, T]`, spatial share `exp(lse_S - lse)` and temporal weights `[B, h, N, T, Tk]`.

    `query`, `key` in token layout, the keys possibly padded with zero frames to `Tk` (`key_frames`); each query's
    own frame (as the -inf mask of the reference) and the padding are left out of its temporal logits: their
    weights are 0.
    """
    frames, padded = query.shape[-2], key.shape[-2]
    # Masked by adding -inf (a boolean mask is slow in compiled CPU code). Not `fill_diagonal_`, which pins a
    # dynamic frame count to its traced value (see `_WorkBuffers`).
    key_frame = torch.arange(padded, device=query.device)
    left_out = (key_frame == torch.arange(frames, device=query.device).unsqueeze(-1)) | (key_frame >= frames)
    excluded = torch.zeros(frames, padded, dtype=query.dtype, device=query.device).masked_fill_(left_out, float("-inf"))
    logits = _product(query, key.transpose(-1, -2)).add_(excluded)
    # Fewer passes than `logsumexp` and then `exp(logits - lse)`: the weights `exp(logits - peak)` are rescaled. The
    # peak is kept finite so that a query without temporal logits (T = 1) gets zero weights, not NaN.
    peak = logits.amax(-1).clamp_min_(torch.finfo(logits.dtype).min)
    weights = logits.sub_(peak.unsqueeze(-1)).exp_()
    lse = torch.logaddexp(spatial_lse, weights.sum(-1).log_().add_(peak))
    return lse, (spatial_lse - lse).exp(), weights.mul_((peak - lse).exp_().unsqueeze(-1))


def _combine(spatial_share, spatial_out, temporal_weights, value, dtype):
    """`spatial_share * spatial_out + temporal_weights @ value(same token)` (token layout in, values possibly padded)
    as `[B, h, T, N, d]` stored token-major (`[B, T, N, h, d]`), so that the module's `[B, T*N, h*d]` is a view of
    it."""
    batch, heads, tokens, frames, head_dim = spatial_out.shape
    stored = buffer_pool.empty((batch, frames, tokens, heads, head_dim), dtype, value)
    target = stored.permute(0, 3, 2, 1, 4)
    temporal = _frames_product(temporal_weights[..., :frames], value[..., :frames, :])
    spatial_share = spatial_share.unsqueeze(-1)
    if torch.compiler.is_compiling():  # Dynamo refuses a strided `out=`; compiled code fuses the copy anyway
        target.copy_(torch.addcmul(temporal, spatial_share, spatial_out))
    else:  # written in place of the permuted copy: one pass fewer over the output
        torch.addcmul(temporal, spatial_share, spatial_out, out=target)
    return stored.permute(0, 3, 1, 2, 4)


def _pooled_mul(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """`left * right` (same shapes), written into a pooled buffer in eager CPU code."""
    return torch.mul(left, right, out=pooled_empty(left.shape, left.dtype, left))


def _row_term(grad_output: torch.Tensor, output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`sum(grad * output)` over channels, `[B, h, N, T]` (computed in the tensors' own layout)."""
    return _by_frame(_pooled_mul(grad_output.to(dtype), output.to(dtype)).sum(-1))


def _keep_copies(query: torch.Tensor) -> bool:
    """Whether backward reuses the forward's token-layout copies. Never while tracing (torch.compile /
    torch.export): a size test there would become a guard on the (possibly dynamic) batch size."""
    return not torch.compiler.is_compiling() and query.numel() <= KEEP_COPIES_ELEMENTS


def _frames_product(weights: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`weights @ tensor` for `[..., T, T]` x `[..., T, d]`: for a few frames a sum of T scaled copies beats a
    batched product of tiny matrices."""
    frames = weights.shape[-1]
    if frames > SMALL_FRAMES:
        return _product(weights, tensor)
    result = weights[..., :1] * tensor[..., :1, :]
    for frame in range(1, frames):
        result = result.addcmul_(weights[..., frame : frame + 1], tensor[..., frame : frame + 1, :])
    return result


def _temporal_backward(grad, query, key, value, temporal_weights, row_term):
    """Gradients of the temporal part of the joint softmax (token layout, statistics dtype; keys and values possibly
    padded as in `_merge`, and so their gradients, which are 0 on the padded frames)."""
    frames = query.shape[-2]
    grad_logits = _product(grad, value.transpose(-1, -2)).sub_(row_term.unsqueeze(-1)).mul_(temporal_weights)
    # The padded frames' weights, hence their logits' gradients, are 0.
    grad_query = _frames_product(grad_logits[..., :frames], key[..., :frames, :])
    grad_key = _frames_product(grad_logits.transpose(-1, -2), query)
    del grad_logits  # freed before the values' gradient is made: one block of memory fewer at the peak
    grad_value = _frames_product(temporal_weights.transpose(-1, -2), grad)
    return grad_query, grad_key, grad_value


def _stga_token_copies(query, key_value, dtype):
    """STGA's queries and packed keys and values in token layout, the keys and values padded to `key_frames`
    frames: `(query_tokens, key_tokens, value_tokens)`."""
    frames = key_frames(query.shape[2], query.device)
    return _by_token(query, dtype), *_by_token(key_value, dtype, frames).unbind(0)


class _STGAFunction(torch.autograd.Function):
    """STGA from the queries `[B, h, T, N, d]` and the keys and values packed as `[2, B, h, T, N, d]`. In eager code
    its backward writes the queries' and the packed keys' and values' gradients straight in the inputs' layouts
    (for TiMoAttention, its projections'): autograd would otherwise stack the keys' and values' gradients and
    re-lay them out, two passes and two allocations more."""

    @staticmethod
    def forward(ctx, query, key_value):
        key, value = key_value.unbind(0)
        with _no_autocast(query), _pooling(query.shape[3]):
            batch, heads, frames, tokens, head_dim = query.shape
            stats = _statistics_dtype(query.dtype)

            def per_frame(tensor):  # [B, h, T, N, d] -> [B*T, h, N, d] (a view for the module's layout)
                return tensor.transpose(1, 2).reshape(batch * frames, heads, tokens, tensor.shape[-1])

            spatial_out, spatial_lse = spatial_attention_forward(per_frame(query), per_frame(key), per_frame(value))
            spatial_out = spatial_out.view(batch, frames, heads, tokens, head_dim).permute(0, 2, 3, 1, 4)
            spatial_lse = spatial_lse.view(batch, frames, heads, tokens).permute(0, 2, 3, 1)
            tokens_qkv = _stga_token_copies(query, key_value, stats)
            lse, spatial_share, temporal_weights = _merge(spatial_lse, *tokens_qkv[:2])
            output = _combine(spatial_share, spatial_out.to(stats), temporal_weights, tokens_qkv[2], query.dtype)
        ctx.keep_copies = _keep_copies(query)
        ctx.save_for_backward(
            query, key_value, output, lse, temporal_weights, *(tokens_qkv if ctx.keep_copies else ())
        )
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key_value, output, lse, temporal_weights, *tokens_qkv = ctx.saved_tensors
        key, value = key_value.unbind(0)
        with _no_autocast(query), _pooling(query.shape[3]):
            batch, heads, frames, tokens, head_dim = query.shape
            stats = _statistics_dtype(query.dtype)

            def per_frame(tensor):
                return tensor.transpose(1, 2).reshape(batch * frames, heads, tokens, tensor.shape[-1])

            if not ctx.keep_copies:
                tokens_qkv = _stga_token_copies(query, key_value, stats)
            grads_t = _temporal_backward(
                _by_token(grad_output, stats), *tokens_qkv, temporal_weights, _row_term(grad_output, output, stats)
            )
            del tokens_qkv
            grads_s = spatial_attention_backward(
                per_frame(grad_output.to(query.dtype)),
                per_frame(query),
                per_frame(key),
                per_frame(value),
                per_frame(output),
                lse.permute(0, 3, 1, 2).reshape(batch * frames, heads, tokens),
            )
            sums = [
                (
                    spatial.view(batch, frames, heads, tokens, head_dim).transpose(1, 2),
                    _by_frame(temporal[..., :frames, :]),
                )
                for spatial, temporal in zip(grads_s, grads_t)
            ]
            # Dynamo refuses a strided `out=` (compiled code fuses the sums anyway), autograd one that would record.
            if torch.compiler.is_compiling() or torch.is_grad_enabled():
                grads = [spatial + temporal for spatial, temporal in sums]
                return grads[0].to(query.dtype), pack_like(grads[1:], key_value).to(key_value.dtype)
            grad_query = _empty_in_layout(query.shape, query.stride(), query.dtype, grad_output)
            grad_key_value = _empty_in_layout(key_value.shape, key_value.stride(), key_value.dtype, grad_output)
            for (spatial, temporal), target in zip(sums, (grad_query, *grad_key_value.unbind(0))):
                torch.add(spatial, temporal, out=target)
            return grad_query, grad_key_value


def _packed_frames(value_tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """The first `frames` frames of (possibly padded) token-layout values side by side per token, `[B, h, N, T*d]`
    (a view: the rows keep the padded stride)."""
    batch, heads, tokens, padded, head_dim = value_tokens.shape
    return value_tokens.view(batch, heads, tokens, padded * head_dim)[..., : frames * head_dim]


class _DSTGAFunction(torch.autograd.Function):
    """D-STGA from the queries, keys and values in token layout (`[B, h, N, T, d]`; keys and values padded to
    `key_frames`, see `dstga_fast_with_offset`), the offsets and the two medians."""

    @staticmethod
    def forward(ctx, query_tokens, key_tokens, value_tokens, offset, query_median, key_median):
        with _no_autocast(value_tokens), _pooling(query_tokens.shape[2]):
            batch, heads, tokens, frames, head_dim = query_tokens.shape
            stats = _statistics_dtype(value_tokens.dtype)
            # Values of all frames side by side per token: the shared weights apply to all of them in one product.
            shared_out, shared_lse = spatial_attention_forward(
                query_median, key_median, _packed_frames(value_tokens, frames)
            )
            spatial_out = shared_out.to(stats).view(batch, heads, tokens, frames, head_dim)
            spatial_lse = shared_lse.unsqueeze(-1) + _by_frame(offset.to(stats))
            lse, spatial_share, temporal_weights = _merge(spatial_lse, query_tokens.to(stats), key_tokens.to(stats))
            output = _combine(spatial_share, spatial_out, temporal_weights, value_tokens.to(stats), value_tokens.dtype)
        ctx.save_for_backward(
            query_tokens, key_tokens, value_tokens, query_median, key_median, output, spatial_out, shared_lse,
            spatial_share, temporal_weights,
        )
        ctx.dtypes = (query_tokens.dtype, key_tokens.dtype, offset.dtype)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (
            query_tokens, key_tokens, value_tokens, query_median, key_median, output, spatial_out, shared_lse,
            spatial_share, temporal_weights,
        ) = ctx.saved_tensors
        query_dtype, key_dtype, offset_dtype = ctx.dtypes
        value_dtype = value_tokens.dtype
        with _no_autocast(output), _pooling(output.shape[3]):
            batch, heads, frames, tokens, head_dim = output.shape
            stats = _statistics_dtype(value_dtype)
            grad = _by_token(grad_output, stats)
            row_term = _row_term(grad_output, output, stats)
            grad_offset = spatial_share * (_pooled_mul(grad, spatial_out).sum(-1) - row_term)
            # The shared softmax sees every frame's gradient scaled by that frame's spatial share; its row term is
            # the share-weighted sum of the frames' row terms.
            packed = (batch, heads, tokens, frames * head_dim)
            packed_values = _packed_frames(value_tokens, frames)
            use_output = _use_cpu_flash(query_median, packed_values)
            grad_query_median, grad_key_median, grad_value_tokens = spatial_attention_backward(
                _pooled_mul(grad, spatial_share.unsqueeze(-1).expand_as(grad)).reshape(packed).to(value_dtype),
                query_median,
                key_median,
                packed_values,
                _by_token(output, value_dtype).view(packed) if use_output else None,
                shared_lse,
                row_term=None if use_output else (spatial_share * row_term).sum(-1),
            )
            grad_query, grad_key, grad_value = _temporal_backward(
                grad, query_tokens.to(stats), key_tokens.to(stats), value_tokens.to(stats), temporal_weights, row_term
            )
            del grad
            grad_value[..., :frames, :] += grad_value_tokens.to(stats).view(batch, heads, tokens, frames, head_dim)
            return (
                grad_query.to(query_dtype),
                grad_key.to(key_dtype),
                grad_value.to(value_dtype),
                _by_frame(grad_offset).to(offset_dtype),
                grad_query_median,
                grad_key_median,
            )


def _empty_in_layout(shape: torch.Size, strides: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor):
    """An uninitialised dense tensor of `shape` whose dimensions are ordered in memory as `strides` order them (the
    strides themselves where those describe a dense tensor, as `torch.empty_like` does)."""
    order = memory_order(strides)
    tensor = buffer_pool.empty([shape[dim] for dim in order], dtype, like)
    return tensor.permute(inverse_permutation(order))


class _EagerInputs(torch.autograd.Function):
    """Eager D-STGA's inputs from the module's queries `[B, h, T, N, d]` and keys and values packed as
    `[2, B, h, T, N, d]` (views of its projections): the queries' and keys' medians (one network for both), one
    token-layout copy of the queries and (padded) keys, the values' padded token copy, and, given the offset
    branch's projection weight `[1, d]`, the projected queries `w . q` (`[B, h, N, T]`, else `None`).

    Its backward writes the gradients straight into tensors laid out like the projections, the medians' and the
    projection's shares added there: autograd would otherwise stack the keys' and values' gradients and re-lay them
    out (two passes and two allocations more), route each median's gradient through a tensor of zeros, and make the
    projection's full-size gradient `grad * w` only to add it to the queries' in a pass of its own.
    """

    @staticmethod
    def forward(ctx, query, key_value, weight):
        with _pooling(query.shape[3]):
            key, value = key_value.unbind(0)
            batch, heads, frames, tokens, head_dim = query.shape
            padded = key_frames(frames, query.device)
            # Frame-major first, `[T, 2, B, N, h, d]`: there each wire of the median network is one contiguous block.
            parts = [query.permute(2, 0, 3, 1, 4), key.permute(2, 0, 3, 1, 4)]
            frame_major = pooled_empty((frames, 2, batch, tokens, heads, head_dim), query.dtype, query)
            frame_major = torch.stack(parts, dim=1, out=frame_major)
            medians = median_values(frame_major, dim=0)
            median_frames = _median_frame(frame_major, medians, 0) if any(ctx.needs_input_grad[:2]) else None
            medians = medians.transpose(2, 3)  # [2, B, h, N, d]
            query_key = buffer_pool.empty((2, batch, heads, tokens, padded, head_dim), query.dtype, query)
            unpadded = query_key[..., :frames, :]
            unpadded.copy_(frame_major.permute(1, 2, 4, 3, 0, 5))
            query_key[..., frames:, :].zero_()
            # Projected over the padded copy (a view there, a copy of the unpadded one), the padded frames dropped.
            projected = None if weight is None else F.linear(query_key[0], weight)[..., :frames, 0]
            ctx.save_for_backward(
                None if median_frames is None else median_frames.transpose(2, 3),
                *((None, None) if weight is None else (query_key[0], weight)),
            )
            ctx.layouts = tuple((tensor.shape, tensor.stride(), tensor.dtype) for tensor in (query, key_value))
            value_tokens = _by_token(value, value.dtype, padded)
            return medians[0], medians[1], unpadded[0], query_key[1], value_tokens, projected

    @staticmethod
    def backward(
        ctx, grad_query_median, grad_key_median, grad_query_tokens, grad_key_tokens, grad_value_tokens, grad_projected
    ):
        query_layout, key_value_layout = ctx.layouts
        with _pooling(query_layout[0][3]):
            median_frames, padded_query, weight = ctx.saved_tensors
            weight_gradient = _projection_weight_gradient(grad_projected, padded_query, ctx)
            if median_frames is None:  # only the projection weight needs a gradient (frozen q, k, v projections)
                return None, None, weight_gradient
            frames = query_layout[0][2]
            grad_query = _empty_in_layout(*query_layout, grad_query_tokens)
            if grad_projected is None:
                grad_query.copy_(_by_frame(grad_query_tokens))
            else:
                torch.addcmul(
                    _by_frame(grad_query_tokens), _by_frame(grad_projected).unsqueeze(-1), weight[0], out=grad_query
                )
            grad_key_value = _empty_in_layout(*key_value_layout, grad_key_tokens)
            grad_key_value[0].copy_(_by_frame(grad_key_tokens[..., :frames, :]))
            grad_key_value[1].copy_(_by_frame(grad_value_tokens[..., :frames, :]))
            # In place (eager code).
            _add_median_gradient(grad_query, median_frames[0], grad_query_median, 2)
            _add_median_gradient(grad_key_value[0], median_frames[1], grad_key_median, 2)
            return grad_query, grad_key_value, weight_gradient


def _projection_weight_gradient(grad_projected, padded_query, ctx) -> torch.Tensor | None:
    """The gradient of `w . q` with respect to `w` (`[1, d]`), as `Linear`'s backward makes it (the projected
    queries' gradient padded with zeros to the padded copy's frames)."""
    if grad_projected is None or not ctx.needs_input_grad[2]:
        return None
    frames = grad_projected.shape[-1]
    padded_grad = grad_projected.new_zeros(padded_query.shape[:-1])
    padded_grad[..., :frames] = grad_projected
    return padded_grad.reshape(1, -1) @ padded_query.reshape(-1, padded_query.shape[-1])


def stga_fast(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """STGA, equal to `attention_timo.stga_reference` (returned stored token-major, `[B, T, N, heads, d]`)."""
    return _STGAFunction.apply(query, torch.stack((key, value)))


def stga_fast_packed(query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
    """`stga_fast` with the keys and values packed as `[2, B, h, T, N, d]` (TiMoAttention's call: views of its
    projections, whose gradients it then writes in their own layout)."""
    return _STGAFunction.apply(query, key_value)


def stga_reference_packed(query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
    """`attention_timo.stga_reference` with the keys and values packed as `[2, B, h, T, N, d]`."""
    return stga_reference(query, *unpack(key_value))


def _token_copies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """The queries, keys and values in token layout, keys and values padded to `key_frames`, as `_DSTGAFunction`
    takes them (made by autograd-tracked operations)."""
    padded = key_frames(query.shape[2], query.device)
    return _by_token(query, query.dtype), _by_token(key, key.dtype, padded), _by_token(value, value.dtype, padded)


def dstga_fast(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offset: torch.Tensor, query_median: torch.Tensor
) -> torch.Tensor:
    """D-STGA, equal to `attention_timo.dstga_reference` (same arguments)."""
    return _DSTGAFunction.apply(*_token_copies(query, key, value), offset, query_median, temporal_median_fast(key))


def dstga_fast_with_offset(query, key_value, query_offset) -> torch.Tensor:
    """`dstga_fast` with the keys and values packed as `[2, B, h, T, N, d]` and its offset branch
    `query_offset(query, query_median) -> offset` (TiMoAttention's call)."""
    if torch.compiler.is_compiling():  # compiled code fuses the copies and the median networks anyway
        key, value = unpack(key_value)
        query_median, key_median = temporal_median_fast(query), temporal_median_fast(key)
        query_tokens, key_tokens, value_tokens = _token_copies(query, key, value)
        # From the token copy, which backward keeps anyway: compiled code then recomputes `q - q_med` there instead
        # of saving it.
        offset = query_offset(_by_frame(query_tokens), query_median)
    else:
        # In full precision `w . q` comes with the token copies, its gradient added where the queries' is written.
        weight = query_offset.projection.weight if query_offset.projects_separately(query) else None
        query_median, key_median, query_tokens, key_tokens, value_tokens, projected = _EagerInputs.apply(
            query, key_value, weight
        )
        if projected is None:
            offset = query_offset(_by_frame(query_tokens), query_median)
        else:
            median_projected = F.linear(query_median, weight).transpose(-1, -2)  # [B, h, 1, N]
            offset = query_offset.normalize(_by_frame(projected) - median_projected)
    return _DSTGAFunction.apply(query_tokens, key_tokens, value_tokens, offset, query_median, key_median)


def dstga_reference_with_offset(query, key_value, query_offset) -> torch.Tensor:
    """`attention_timo.dstga_reference` with the keys and values packed as `[2, B, h, T, N, d]` and its offset
    branch `query_offset(query, query_median) -> offset`."""
    query_median = temporal_median(query)
    return dstga_reference(query, *unpack(key_value), query_offset(query, query_median), query_median)


class StgaKernels:
    """The kernels of one `stga_implementation`: `median(x)`, `stga(q, k, v)`, `dstga(q, k, v, offset, q_median)`,
    and the two that TiMoAttention calls with the keys and values packed: `stga_packed(q, key_value)` and
    `dstga_with_offset(q, key_value, query_offset)`."""

    def __init__(self, median, stga, stga_packed, dstga, dstga_with_offset):
        self.median, self.stga, self.stga_packed = median, stga, stga_packed
        self.dstga, self.dstga_with_offset = dstga, dstga_with_offset


STGA_IMPLEMENTATIONS = {
    "reference": StgaKernels(
        temporal_median, stga_reference, stga_reference_packed, dstga_reference, dstga_reference_with_offset
    ),
    "fast": StgaKernels(temporal_median_fast, stga_fast, stga_fast_packed, dstga_fast, dstga_fast_with_offset),
}
