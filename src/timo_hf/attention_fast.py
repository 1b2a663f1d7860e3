"""Fast exact STGA and D-STGA kernels, selected with `config.stga_implementation = "fast"` (the default).

They compute what the reference kernels of `attention_timo` compute (same layout `[batch, heads, T, N, head_dim]`,
same joint softmax, no scaling) without ever holding the `[T, N, T + N]` logits of all frames:

- the softmax over the `T + N` logits of a query is split into its spatial part (an ordinary unscaled attention
  over the `N` tokens of a frame, which returns its log-sum-exp) and its temporal part (`T` logits per query), and
  the two are merged exactly through their log-sum-exps;
- STGA's spatial part runs frame by frame through a memory-efficient attention kernel (PyTorch's CPU flash
  attention where available, else the row-blocked kernel below), so its memory is `O(N * head_dim)` per frame;
- D-STGA's spatial logits `q_med k_med^T + offset(t, n)` share their softmax over keys across frames (the offset
  is constant along the keys), so the spatial softmax is computed once per (batch, head), applied to the values of
  all `T` frames in one product, and the offset enters only through the log-sum-exp. Its memory is one row block
  of `N` logits per (batch, head), never `T * N^2`;
- both are `torch.autograd.Function`s that keep the merged log-sum-exp (and the `T x T` temporal weights per
  token) and recompute the spatial weights in backward. The gradient of a spatial log-sum-exp is folded into the
  attention backward through its row term `sum(grad * out)` computed with the merged output, which is why the
  spatial kernel's own log-sum-exp output never needs a gradient.

Inputs of any floating dtype work; the softmax statistics are kept in float32 (float64 for float64 inputs) and
autocast is suspended inside the kernels, which compute in the dtype of their inputs.
"""

import contextlib
import functools

import torch

from .attention_timo import dstga_reference, stga_reference, temporal_logits, temporal_median


# The portable spatial kernel holds at most this many logits per (batch * head) slice at a time.
BLOCK_ELEMENTS = 1 << 19
# Above this many frames the temporal median falls back to `torch.median` (the sorting network grows as T log^2 T).
MAX_NETWORK_FRAMES = 32

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _no_autocast(tensor: torch.Tensor):
    """Suspend autocast: the kernels choose their own precision."""
    device_type = tensor.device.type
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of logits, log-sum-exps and softmax weights: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Temporal median: a pruned sorting network of element-wise min/max (exact values, much faster than torch.median
# over a short non-last dimension), with the gradient routed to the median element as torch.median does.


@functools.lru_cache(maxsize=None)
def median_network(num_frames: int) -> tuple[tuple[int, int, bool, bool], ...]:
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


def median_values(tensor: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Lower median along `dim` (the values of `torch.median`), without autograd."""
    num_frames = tensor.shape[dim]
    if num_frames > MAX_NETWORK_FRAMES:
        return tensor.median(dim=dim).values
    wires = list(tensor.unbind(dim))
    for low, high, keep_min, keep_max in median_network(num_frames):
        smaller = torch.minimum(wires[low], wires[high]) if keep_min else None
        if keep_max:
            wires[high] = torch.maximum(wires[low], wires[high])
        if keep_min:
            wires[low] = smaller
    return wires[(num_frames - 1) // 2]


class _TemporalMedian(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        median = median_values(tensor, dim)
        ctx.save_for_backward(tensor, median)
        ctx.dim = dim
        return median

    @staticmethod
    def backward(ctx, grad_median: torch.Tensor):
        tensor, median = ctx.saved_tensors
        # The gradient goes to the first element equal to the median (one element, as torch.median's index).
        hit = tensor == median.unsqueeze(ctx.dim)
        first = hit & (hit.cumsum(ctx.dim) == 1)
        return torch.where(first, grad_median.unsqueeze(ctx.dim), 0.0), None


def temporal_median_fast(tensor: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Same values as `attention_timo.temporal_median` (lower median over the frames), several times faster on CPU.

    The gradient reaches the median element, like `torch.median`'s; where several frames hold exactly the median
    value it goes to the first of them.
    """
    return _TemporalMedian.apply(tensor, dim)


# ----------------------------------------------------------------------------------------------------------------
# Spatial part: unscaled softmax attention `[..., N, E] x [..., M, E] x [..., M, Ev]` returning its log-sum-exp;
# its backward takes the merged output and log-sum-exp of the joint softmax (see the module docstring).


def _row_block(num_rows: int, num_keys: int) -> int:
    return max(1, min(num_rows, BLOCK_ELEMENTS // max(num_keys, 1)))


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
    rows = query.reshape(-1, num_rows, query.shape[-1]).to(stats)
    keys_t = key.reshape(-1, num_keys, key.shape[-1]).to(stats).transpose(1, 2)
    values = value.reshape(-1, num_keys, value.shape[-1]).to(stats)
    block = _row_block(num_rows, num_keys)
    outputs, lses = [], []
    for start in range(0, num_rows, block):
        weights = torch.bmm(rows[:, start : start + block], keys_t)
        peak = weights.amax(-1, keepdim=True)
        weights = weights.sub_(peak).exp_()
        total = weights.sum(-1, keepdim=True)
        outputs.append(torch.bmm(weights, values).div_(total))
        lses.append(peak.squeeze(-1) + total.squeeze(-1).log())
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=1)
    return output.to(query.dtype).view(*lead, num_rows, -1), lse.view(*lead, num_rows)


def spatial_attention_backward(
    grad_output: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the spatial part of a joint softmax whose rows have log-sum-exp `lse` and output `output`.

    The weights are recomputed as `exp(q k^T - lse)`; the row term of the softmax gradient is `sum(grad * output)`.
    With the merged statistics this is exactly the spatial share of the joint softmax's gradient.
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
    grads, outputs = flat(grad_output, num_rows), flat(output, num_rows)
    lse = lse.reshape(-1, num_rows, 1).to(stats)
    row_term = (grads * outputs).sum(-1, keepdim=True)
    keys_t, values_t = keys.transpose(1, 2), values.transpose(1, 2)
    grad_keys, grad_values = torch.zeros_like(keys), torch.zeros_like(values)
    grad_rows = []
    block = _row_block(num_rows, num_keys)
    for start in range(0, num_rows, block):
        stop = start + block
        weights = torch.bmm(rows[:, start:stop], keys_t).sub_(lse[:, start:stop]).exp_()
        grad_values.baddbmm_(weights.transpose(1, 2), grads[:, start:stop])
        grad_logits = torch.bmm(grads[:, start:stop], values_t).sub_(row_term[:, start:stop]).mul_(weights)
        grad_rows.append(torch.bmm(grad_logits, keys))
        grad_keys.baddbmm_(grad_logits.transpose(1, 2), rows[:, start:stop])
    grad_rows = grad_rows[0] if len(grad_rows) == 1 else torch.cat(grad_rows, dim=1)
    return (
        grad_rows.to(query.dtype).view(query.shape),
        grad_keys.to(key.dtype).view(key.shape),
        grad_values.to(value.dtype).view(value.shape),
    )


# ----------------------------------------------------------------------------------------------------------------
# Temporal part and the merge (layout [B, heads, T, N, ...]).


def _merge(spatial_lse: torch.Tensor, temporal: torch.Tensor):
    """Joint log-sum-exp `[B, h, T, N]`, spatial share `exp(lse_S - lse)` and temporal weights `[B, h, T, N, T]`."""
    lse = torch.logaddexp(spatial_lse, temporal.logsumexp(-1))
    return lse, (spatial_lse - lse).exp(), (temporal - lse.unsqueeze(-1)).exp()


def _token_major(like: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Empty `[B, h, T, N, d]` tensor stored as `[B, T, N, h, d]`: the module's `[B, T*N, h*d]` is then a view."""
    batch, heads, frames, tokens, head_dim = shape
    return like.new_empty((batch, frames, tokens, heads, head_dim), dtype=dtype).permute(0, 3, 1, 2, 4)


def _combine(spatial_share, spatial_out, temporal_weights, value, dtype):
    """`spatial_share * spatial_out + temporal_weights @ value(same token)`, written token-major in `dtype`."""
    temporal_out = torch.einsum("bhtns,bhsnd->bhtnd", temporal_weights, value)
    output = _token_major(temporal_out, temporal_out.shape, dtype)
    return torch.addcmul(temporal_out, spatial_share.unsqueeze(-1), spatial_out, out=output)


def _temporal_backward(grad, query, key, value, temporal_weights, row_term):
    """Gradients of the temporal part of the joint softmax (all in the statistics dtype)."""
    grad_logits = torch.einsum("bhtnd,bhsnd->bhtns", grad, value).sub_(row_term.unsqueeze(-1)).mul_(temporal_weights)
    grad_query = torch.einsum("bhtns,bhsnd->bhtnd", grad_logits, key)
    grad_key = torch.einsum("bhtns,bhtnd->bhsnd", grad_logits, query)
    grad_value = torch.einsum("bhtns,bhtnd->bhsnd", temporal_weights, grad)
    return grad_query, grad_key, grad_value


class _STGAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value):
        with _no_autocast(query):
            batch, heads, frames, tokens, head_dim = query.shape
            stats = _statistics_dtype(query.dtype)

            def per_frame(tensor):  # [B, h, T, N, d] -> [B*T, h, N, d] (a view for the module's layout)
                return tensor.transpose(1, 2).reshape(batch * frames, heads, tokens, tensor.shape[-1])

            spatial_out, spatial_lse = spatial_attention_forward(per_frame(query), per_frame(key), per_frame(value))
            spatial_out = spatial_out.view(batch, frames, heads, tokens, head_dim).transpose(1, 2)
            spatial_lse = spatial_lse.view(batch, frames, heads, tokens).transpose(1, 2)
            query_s, key_s, value_s = query.to(stats), key.to(stats), value.to(stats)
            lse, spatial_share, temporal_weights = _merge(spatial_lse, temporal_logits(query_s, key_s))
            output = _combine(spatial_share, spatial_out, temporal_weights, value_s, query.dtype)
        ctx.save_for_backward(query, key, value, output, lse, temporal_weights)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, lse, temporal_weights = ctx.saved_tensors
        with _no_autocast(query):
            batch, heads, frames, tokens, head_dim = query.shape
            stats = _statistics_dtype(query.dtype)

            def per_frame(tensor):
                return tensor.transpose(1, 2).reshape(batch * frames, heads, tokens, tensor.shape[-1])

            grad = grad_output.to(stats)
            row_term = (grad * output.to(stats)).sum(-1)
            grads_t = _temporal_backward(
                grad, query.to(stats), key.to(stats), value.to(stats), temporal_weights, row_term
            )
            grads_s = spatial_attention_backward(
                per_frame(grad_output.to(query.dtype)),
                per_frame(query),
                per_frame(key),
                per_frame(value),
                per_frame(output),
                lse.transpose(1, 2).reshape(batch * frames, heads, tokens),
            )
            return tuple(
                (spatial.view(batch, frames, heads, tokens, head_dim).transpose(1, 2) + temporal).to(like.dtype)
                for spatial, temporal, like in zip(grads_s, grads_t, (query, key, value))
            )


class _DSTGAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, offset, query_median, key_median):
        with _no_autocast(query):
            batch, heads, frames, tokens, head_dim = query.shape
            stats = _statistics_dtype(query.dtype)
            # Values of all frames side by side per token: the shared weights apply to all of them in one product.
            value_tokens = value.transpose(2, 3).reshape(batch, heads, tokens, frames * head_dim)
            shared_out, shared_lse = spatial_attention_forward(query_median, key_median, value_tokens)
            spatial_out = shared_out.to(stats).view(batch, heads, tokens, frames, head_dim).transpose(2, 3)
            spatial_lse = shared_lse.unsqueeze(2) + offset.to(stats)
            query_s, key_s = query.to(stats), key.to(stats)
            value_s = value_tokens.to(stats).view(batch, heads, tokens, frames, head_dim).transpose(2, 3)
            lse, spatial_share, temporal_weights = _merge(spatial_lse, temporal_logits(query_s, key_s))
            output = _combine(spatial_share, spatial_out, temporal_weights, value_s, query.dtype)
        ctx.save_for_backward(
            query, key, value_tokens, query_median, key_median, output, spatial_out, shared_lse, spatial_share,
            temporal_weights,
        )
        ctx.offset_dtype = offset.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (
            query, key, value_tokens, query_median, key_median, output, spatial_out, shared_lse, spatial_share,
            temporal_weights,
        ) = ctx.saved_tensors
        with _no_autocast(query):
            batch, heads, frames, tokens, head_dim = query.shape
            stats = _statistics_dtype(query.dtype)

            def by_token(tensor):  # [B, h, T, N, d] -> [B, h, N, T*d]
                return tensor.transpose(2, 3).reshape(batch, heads, tokens, frames * head_dim)

            grad = grad_output.to(stats)
            row_term = (grad * output.to(stats)).sum(-1)
            value_s = value_tokens.to(stats).view(batch, heads, tokens, frames, head_dim).transpose(2, 3)
            grad_query, grad_key, grad_value = _temporal_backward(
                grad, query.to(stats), key.to(stats), value_s, temporal_weights, row_term
            )
            grad_offset = spatial_share * ((grad * spatial_out).sum(-1) - row_term)
            # The shared softmax sees every frame's gradient scaled by that frame's spatial share.
            grad_query_median, grad_key_median, grad_value_tokens = spatial_attention_backward(
                by_token(spatial_share.unsqueeze(-1) * grad).to(query.dtype),
                query_median,
                key_median,
                value_tokens,
                by_token(output),
                shared_lse,
            )
            grad_value = grad_value + grad_value_tokens.to(stats).view(
                batch, heads, tokens, frames, head_dim
            ).transpose(2, 3)
            return (
                grad_query.to(query.dtype),
                grad_key.to(key.dtype),
                grad_value.to(value_tokens.dtype),
                grad_offset.to(ctx.offset_dtype),
                grad_query_median,
                grad_key_median,
            )


def stga_fast(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """STGA, equal to `attention_timo.stga_reference` (returned stored token-major, `[B, T, N, heads, d]`)."""
    return _STGAFunction.apply(query, key, value)


def dstga_fast(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offset: torch.Tensor, query_median: torch.Tensor
) -> torch.Tensor:
    """D-STGA, equal to `attention_timo.dstga_reference` (same arguments)."""
    return _DSTGAFunction.apply(query, key, value, offset, query_median, temporal_median_fast(key))


class StgaKernels:
    """The median and attention kernels of one `stga_implementation`."""

    def __init__(self, median, stga, dstga):
        self.median, self.stga, self.dstga = median, stga, dstga


STGA_IMPLEMENTATIONS = {
    "reference": StgaKernels(temporal_median, stga_reference, dstga_reference),
    "fast": StgaKernels(temporal_median_fast, stga_fast, dstga_fast),
}
