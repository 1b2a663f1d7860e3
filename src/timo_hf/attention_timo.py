"""Spatiotemporal gyroscope attention (STGA) and its dynamic variant (D-STGA): readable reference kernels.

Tensors are laid out per frame: `query`, `key`, `value` are `[batch, heads, T, N, head_dim]` with `N = h * w`
tokens per frame. For every query token `(t, n)` the attention sees

- `T` temporal logits `q(t, n) . k(t', n)`, one per frame at the same location, the query's own frame masked
  with `-inf` (it is reached through the spatial part instead);
- `N` spatial logits over the tokens `m` of its own frame: `q(t, n) . k(t, m)` for STGA; for D-STGA
  `q_med(n) . k_med(m) + offset(t, n)` where `q_med`/`k_med` are the temporal (lower) medians.

One softmax runs over the `T + N` logits jointly; the output is the temporal weights applied to the values at the
same location plus the spatial weights applied to the values of the own frame (never medianed). No `head_dim`
scaling is applied: the official model is trained unscaled.

These kernels materialise the `[T, N, T + N]` logits of every frame and mirror the paper's equations term by
term; they are the ground truth that faster kernels are tested against.
"""

import types

import torch
from torch import nn
from torch.nn import functional as F


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def autocast_enabled(tensor: torch.Tensor) -> bool:
    """Whether autocast is on for the tensor's device (False on devices without autocast, such as "meta")."""
    device_type = tensor.device.type
    return device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)


def memory_order(strides) -> list[int]:
    """The dimensions from the outermost in memory to the innermost (largest stride first; ties keep their order).

    An insertion sort of plain comparisons: under torch.compile with dynamic shapes the strides are symbolic, and
    Dynamo sorts only by constant keys (each comparison here becomes a guard that holds for any size instead)."""
    order: list[int] = []
    for dim in range(len(strides)):
        position = len(order)
        while position and strides[order[position - 1]] < strides[dim]:
            position -= 1
        order.insert(position, dim)
    return order


def inverse_permutation(order: list[int]) -> list[int]:
    """The permutation that undoes `tensor.permute(order)`."""
    return sorted(range(len(order)), key=order.__getitem__)


def _packing_order(packed: torch.Tensor) -> tuple[list[int], list[int]]:
    """`packed`'s dimensions in memory order, and its parts' (dimension 0 left out) in memory order."""
    order = memory_order(packed.stride())
    return order, [dim - 1 for dim in order if dim != 0]


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`packed.unbind(0)`, unbound where dimension 0 lies in memory: autograd then stacks the parts' gradients
    straight in the layout of `packed` (for TiMoAttention's keys and values, their projection's), not along
    dimension 0 and then copied into that layout."""
    order, parts_order = _packing_order(packed)
    restore = inverse_permutation(parts_order)
    return tuple(part.permute(restore) for part in packed.permute(order).unbind(order.index(0)))


def pack_like(parts: list[torch.Tensor], packed: torch.Tensor) -> torch.Tensor:
    """`torch.stack(parts)` laid out in memory like `packed` (the inverse of `unpack`): one pass, no re-layout."""
    order, parts_order = _packing_order(packed)
    stacked = torch.stack([part.permute(parts_order) for part in parts], order.index(0))
    return stacked.permute(inverse_permutation(order))


def temporal_median(tensor: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Median over the frames; for an even count the lower of the two middle values (as `torch.median`)."""
    return tensor.median(dim=dim).values


def temporal_logits(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """`[B, heads, T, N, T]` logits of each token against its own location in every frame, own frame at -inf."""
    logits = torch.einsum("bhtnd,bhsnd->bhtns", query, key)
    num_frames = query.shape[2]
    own_frame = torch.eye(num_frames, dtype=torch.bool, device=query.device).view(num_frames, 1, num_frames)
    return logits.masked_fill(own_frame, float("-inf"))


def joint_softmax_aggregate(
    temporal: torch.Tensor, spatial: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """One softmax over `[temporal | spatial]` logits, then the two weighted sums of values, added."""
    num_frames = temporal.shape[-1]
    weights = torch.cat([temporal, spatial], dim=-1).softmax(dim=-1)
    temporal_weights, spatial_weights = weights.split([num_frames, weights.shape[-1] - num_frames], dim=-1)
    return torch.einsum("bhtns,bhsnd->bhtnd", temporal_weights, value) + spatial_weights @ value


def stga_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """STGA: spatial logits of each frame from its own queries and keys."""
    spatial = query @ key.transpose(-1, -2)
    return joint_softmax_aggregate(temporal_logits(query, key), spatial, value)


def dstga_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offset: torch.Tensor, query_median: torch.Tensor
) -> torch.Tensor:
    """D-STGA: spatial logits `q_med k_med^T` shared by all frames, plus `offset[b, h, t, n]` added per query.

    `query_median` is the temporal median of `query` (computed once by the caller, who also needs it for the
    offset branch).
    """
    key_median = temporal_median(key)
    shared = query_median @ key_median.transpose(-1, -2)
    spatial = shared.unsqueeze(2) + offset.unsqueeze(-1)
    return joint_softmax_aggregate(temporal_logits(query, key), spatial, value)


# `active` while activation checkpointing runs a block's forward again in backward (`recompute_marked`): that pass
# must normalise exactly as the first one did, without counting the batch into BatchNorm's running statistics again.
# A plain attribute rather than a ContextVar: torch.compile traces (and guards on) it without a graph break.
RECOMPUTATION = types.SimpleNamespace(active=False)


def recompute_marked(checkpoint_func):
    """`checkpoint_func` (e.g. `torch.utils.checkpoint.checkpoint`, reentrant or not) whose later calls of the
    checkpointed function, the recomputation in backward, run with `RECOMPUTATION.active` set."""

    def run(function, *args, **kwargs):
        calls = 0

        def marked(*inner_args, **inner_kwargs):
            nonlocal calls
            calls += 1
            previous, RECOMPUTATION.active = RECOMPUTATION.active, calls > 1
            try:
                return function(*inner_args, **inner_kwargs)
            finally:
                RECOMPUTATION.active = previous

        return checkpoint_func(marked, *args, **kwargs)

    return run


class TiMoQueryOffset(nn.Module):
    """D-STGA's per-query offset: `ReLU(BatchNorm1d(w . (q(t, n) - q_med(n))))`, one scalar per query.

    The BatchNorm has a single channel whose rows are all `(batch, head, frame, token)` queries, so in training
    mode it normalises with the statistics of the whole batch.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        self.projection = nn.Linear(head_dim, 1, bias=False)
        self.norm = nn.BatchNorm1d(1)

    def forward(self, query: torch.Tensor, query_median: torch.Tensor) -> torch.Tensor:
        return self.normalize(self._projected_deviation(query, query_median))

    def normalize(self, deviation: torch.Tensor) -> torch.Tensor:
        """`ReLU(BatchNorm1d(deviation))` of the projected deviations `w . (q - q_med)`, any shape."""
        # One channel: the rows as the length of a single sample normalise exactly as rows of a batch, faster.
        rows, norm = deviation.reshape(1, 1, -1), self.norm
        if norm.training and RECOMPUTATION.active:  # the batch's statistics again; momentum 0 keeps the running ones
            normalized = F.batch_norm(rows, norm.running_mean, norm.running_var, norm.weight, norm.bias, True, 0.0,
                                      norm.eps)
        else:
            normalized = norm(rows)
        return F.relu(normalized).view(deviation.shape)

    @staticmethod
    def projects_separately(query: torch.Tensor) -> bool:
        """Whether `w . (q - q_med)` is computed as `w . q - w . q_med` (full precision: no full-size difference, and
        the median's gradient is a sum over frames of scalars, not of vectors); in lower precision the two rounded
        products could cancel, so the difference is projected."""
        return query.dtype in (torch.float32, torch.float64) and not autocast_enabled(query)

    def _projected_deviation(self, query: torch.Tensor, query_median: torch.Tensor) -> torch.Tensor:
        """`w . (q - q_med)`, `[B, heads, T, N]`, in the order that suits the precision and the execution mode."""
        low_precision = not self.projects_separately(query)
        if torch.compiler.is_compiling() and not low_precision:
            # One fused pass over the queries in compiled code (a product with one output column does not fuse).
            weight = self.projection.weight.view(-1)
            return ((query - query_median.unsqueeze(2)) * weight).sum(-1)
        # Projected in the order the queries are stored in (TiMoAttention's `[B, T, N, heads, d]`, the fast D-STGA's
        # token copy `[B, heads, N, T, d]`), where flattening them for the product is a view, not a copy.
        order = memory_order(query.stride()[:4])
        median = query_median.unsqueeze(2)
        if low_precision:
            projected = self.projection((query - median).permute(*order, 4))
        else:
            projected = self.projection(query.permute(*order, 4)) - self.projection(median.permute(*order, 4))
        return projected.squeeze(-1).permute(inverse_permutation(order))
