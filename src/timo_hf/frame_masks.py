"""Frame masks: which frames of each sample are real, for batches of time series of different lengths.

`TiMoImageProcessor` pads shorter series at the end and marks the real frames in `frame_mask` (`[B, T]`, True: a
real frame). The models then run every sample on its kept frames only, grouped by how many frames they keep, so
that a sample's outputs are those it gets alone: padded frames take no part in the temporal attention, the
temporal medians of D-STGA or MHSA over all frames, and the outputs at left-out frames are zeros.
"""

from collections.abc import Iterator

import torch


def check_frame_mask(frame_mask: torch.Tensor | None, pixel_values: torch.Tensor) -> torch.Tensor | None:
    """`frame_mask` on the device of `pixel_values` (`[B, T, C, H, W]`), or `None` where every frame is kept.

    Raises a ValueError naming the problem for a mask of the wrong shape or dtype, or one that keeps no frame of a
    sample.
    """
    if frame_mask is None:
        return None
    expected = tuple(pixel_values.shape[:2])
    if tuple(frame_mask.shape) != expected:
        raise ValueError(
            f"frame_mask must have shape [batch, time] = {expected} to match pixel_values "
            f"{tuple(pixel_values.shape)}, got {tuple(frame_mask.shape)}."
        )
    if frame_mask.dtype != torch.bool:
        raise ValueError(f"frame_mask must be a boolean tensor (True: a real frame), got dtype {frame_mask.dtype}.")
    frame_mask = frame_mask.to(pixel_values.device)
    empty = (~frame_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"frame_mask keeps no frame of sample(s) {empty}; every sample needs at least one frame.")
    return None if bool(frame_mask.all()) else frame_mask


def frame_groups(frame_mask: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The samples that keep the same number `t` of frames, as `(samples [g], kept frames [g, t])`, the frames of
    each sample in their original order."""
    counts = frame_mask.sum(dim=1)
    for count in counts.unique().tolist():
        samples = (counts == count).nonzero().flatten()
        yield samples, frame_mask[samples].nonzero()[:, 1].view(len(samples), count)


def scatter_frames(values: torch.Tensor, frame_mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Per-kept-frame `values` (`[n, ...]`, in the order of `tensor[frame_mask]`) laid out as `[B, T, ...]`, `fill`
    at the left-out frames."""
    full = values.new_full((*frame_mask.shape, *values.shape[1:]), fill)
    full[frame_mask] = values
    return full


def mean_over_kept_frames(values: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (`[B, T, ...]`, zeros at left-out frames) over the kept frames: `[B, ...]`."""
    counts = frame_mask.sum(dim=1).view(-1, *([1] * (values.dim() - 2)))
    return values.sum(dim=1) / counts.to(values.dtype)
