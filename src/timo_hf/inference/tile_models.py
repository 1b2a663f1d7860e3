"""The model side of tiled inference: a batch of raw tiles in, per-pixel class probabilities or features out.

Both callables take `(B, T, C, h, w)` float32 tiles whose missing pixels are NaN, normalise them with the model's
image processor (which also fills the NaNs and builds `temporal_positions` from the dates), run the model without
gradients on `device` (with autocast when `dtype` is not float32) and return numpy arrays on the tile's grid.
"""

from __future__ import annotations

import contextlib
import datetime

import numpy as np
import torch

from ..frame_masks import mean_over_kept_frames
from ..image_processing_timo import TiMoImageProcessor
from ..modeling_timo import TiMoForSemanticSegmentation, TiMoModel, split_frames


PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """The torch device `name` (`auto`: CUDA when available, else CPU); a ValueError when torch does not know it or
    this machine cannot use it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu (or auto)")
    try:
        torch.empty(0, device=device)  # an absent GPU index or backend fails here rather than deep in the run
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"--device {name} cannot be used on this machine ({error}); use --device auto") from None
    return device


def kept_date_positions(present: np.ndarray, days: np.ndarray | None) -> np.ndarray:
    """`(B, T)` temporal positions of the dates each tile keeps (`present`), numbered as the image processor
    numbers the dates a sample keeps in training: 0, 1, ... (`days` None, "index" encoding) or days since the first
    kept date ("days" encoding, `days` the day number of each date). Left-out dates get 0 (the model skips them)."""
    if days is None:
        positions = np.cumsum(present, axis=1) - 1
    else:
        first_kept = days[present.argmax(axis=1)]
        positions = days[None, :] - first_kept[:, None]
    return np.where(present, positions, 0).astype(np.float32)


class _TileModel:
    def __init__(
        self,
        model: torch.nn.Module,
        processor: TiMoImageProcessor,
        dates: list[datetime.date] | None,
        device: torch.device,
        precision: str = "float32",
    ):
        if processor.temporal_encoding == "days" and not dates:
            raise ValueError(
                "the model's image processor encodes acquisition dates (temporal_encoding='days'); give the dates "
                "in the file names, with --dates, or in a JSON input list"
            )
        self.model = model.to(device).eval()
        self.processor = processor
        self.dates = [date.isoformat() for date in dates] if dates else None
        encodes_days = processor.temporal_encoding == "days"
        self.day_numbers = np.array([date.toordinal() for date in dates]) if encodes_days else None
        self.device = device
        self.dtype = PRECISIONS[precision]

    def _inputs(self, tiles: np.ndarray) -> dict[str, torch.Tensor]:
        """Model inputs of a batch of tiles: a date without any value in a tile is left out of it (`frame_mask`;
        where a scene keeps its gaps, `Scene(gaps="fill")`), unless the tile has no value at all (then it is
        nodata in the outputs anyway); the dates it keeps are numbered as if the left-out ones had never been given,
        so that the tile gets what the scene without those dates would get."""
        batch = self.processor(list(tiles), dates=self.dates, return_tensors="pt")  # one list of dates for all tiles
        present = np.isfinite(tiles).any(axis=(2, 3, 4))
        present[~present.any(axis=1)] = True
        return {
            "pixel_values": batch["pixel_values"].to(self.device),
            "temporal_positions": torch.from_numpy(kept_date_positions(present, self.day_numbers)).to(self.device),
            "frame_mask": torch.from_numpy(present).to(self.device),
        }

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


class TileSegmenter(_TileModel):
    """Class probabilities `(B, F * K, h, w)`: F = 1 for `temporal_fusion="max"` models, F = T (one map per date)
    for `"none"`; K = `num_labels`."""

    model: TiMoForSemanticSegmentation

    def __init__(self, model: TiMoForSemanticSegmentation, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.num_labels = model.config.num_labels
        self.per_frame = model.config.temporal_fusion == "none"

    def maps_per_tile(self, num_frames: int) -> int:
        return num_frames if self.per_frame else 1

    @torch.no_grad()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        height, width = tiles.shape[-2:]
        with self._autocast():
            logits = self.model(**self._inputs(tiles)).logits
        probabilities = logits.float().softmax(dim=-3)[..., :height, :width]
        return probabilities.reshape(len(tiles), -1, height, width).cpu().numpy()


def stage_stride(config, stage: str) -> int:
    """Input pixels per feature-map pixel: 4 for the stem and stage 1, then x2 per stage."""
    if stage not in config.stage_names:
        raise ValueError(f"unknown stage {stage!r}; choose one of {config.stage_names}")
    index = config.stage_names.index(stage)
    return 4 * 2 ** max(index - 1, 0)


TEMPORAL_POOLING = ("mean", "max", "none")


class TileEmbedder(_TileModel):
    """Features of one stage, `(B, C, h / stride, w / stride)` pooled over the dates (`"mean"`, `"max"`), or
    `(B, T * C, ...)` date by date (`"none"`, NaN for a date left out of a tile)."""

    model: TiMoModel

    def __init__(self, model: TiMoModel, *args, stage: str = "stage4", temporal_pooling: str = "mean", **kwargs):
        super().__init__(model, *args, **kwargs)
        if temporal_pooling not in TEMPORAL_POOLING:
            raise ValueError(f"temporal pooling must be one of {TEMPORAL_POOLING}, got {temporal_pooling!r}")
        self.stride = stage_stride(model.config, stage)
        self.stage_index = model.config.stage_names.index(stage)
        self.channels = ([model.config.hidden_sizes[0]] + list(model.config.hidden_sizes))[self.stage_index]
        self.temporal_pooling = temporal_pooling

    @torch.no_grad()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        height, width = (size // self.stride for size in tiles.shape[-2:])
        inputs = self._inputs(tiles)
        with self._autocast():
            maps = self.model.compute_feature_maps(**inputs)[self.stage_index]
        features = split_frames(maps.float(), len(tiles))[..., :height, :width]
        kept = inputs["frame_mask"]
        left_out = ~kept.view(*kept.shape, 1, 1, 1)
        if self.temporal_pooling == "mean":
            features = mean_over_kept_frames(features, kept)  # zeros at left-out dates
        elif self.temporal_pooling == "max":
            features = features.masked_fill(left_out, float("-inf")).amax(dim=1)
        else:
            features = features.masked_fill(left_out, float("nan")).flatten(1, 2)
        return features.cpu().numpy()
