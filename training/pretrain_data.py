"""Pre-training data for `training/pretrain.py`: sources, temporal sampling, band normalisation, batch plans.

Sources (`data.source` in the YAML):

- `"timo"`: `timo_hf.data.load_timo_dataset(data.name, data_dir=data.path, split=data.split,
  streaming=data.streaming)`, the project's raw-data builders (MillionST GeoTIFF or npy layouts, ...);
- `"parquet"`: local Parquet files (`data.path`: a folder, a file or a glob), e.g. from `timo_hf.data`'s export;
- `"hub"`: a Hub dataset id (`data.path`), usually with `data.streaming: true`;
- `"npy"`: a local folder of `*.npy` series `[T, C, H, W]` (the official MillionST export: one file per location),
  read directly, without `datasets`.

Every example provides `pixel_values` `[T, C, H, W]` (any numeric dtype). Each time a series is used, `num_frames`
of its frames are drawn at random without replacement (default 3 of 10, paper Table 8) and kept in chronological
order (`temporal_order: random` keeps the draw order, as the official code). A series with fewer frames than
requested is an error by default (`short_series: error`); `short_series: repeat` draws with replacement instead.
Frames are optionally resized (`image_size`), then normalised per band.

Determinism (for exact resume and identical ranks): map-style sources are read in a per-epoch permutation drawn from
the run seed and split across ranks by position, and every random choice for a sample (its frames) comes from a
seed derived from (run seed, epoch, sample index), never from a global RNG. Streaming sources are split with
`datasets.distributed.split_dataset_by_node`, shuffled with a seeded buffer, and replayed up to the resume point.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from common import derive_seed


# ----------------------------------------------------------------------------------------------- sources
class NpySeriesFolder:
    """Map-style source over the sorted `*.npy` files of a folder, each one series `[T, C, H, W]`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"data.path {self.folder} is not a folder of .npy series.")
        self.files = sorted(self.folder.glob("*.npy"))
        if not self.files:
            raise FileNotFoundError(f"data.path {self.folder} holds no .npy files.")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        array = np.load(self.files[index], mmap_mode="r")
        if array.ndim != 4:
            raise ValueError(f"{self.files[index]}: expected a series [T, C, H, W], got shape {array.shape}.")
        return {"pixel_values": array, "sample_id": self.files[index].stem}


def open_source(data: dict):
    """The configured source: a map-style dataset (`len` and `[index]`) or a `datasets.IterableDataset`."""
    source, path = data["source"], data["path"]
    if source == "npy":
        if data["streaming"]:
            raise ValueError("data.source='npy' is read directly from disk; set data.streaming to false.")
        return NpySeriesFolder(path)
    import datasets

    if source == "timo":
        try:
            from timo_hf.data import load_timo_dataset
        except ImportError as err:
            raise RuntimeError(
                "data.source='timo' needs timo_hf.data.load_timo_dataset, which this installation lacks; use "
                "data.source 'parquet', 'hub' or 'npy'."
            ) from err
        dataset = load_timo_dataset(data["name"], data_dir=path, split=data["split"], streaming=data["streaming"])
    elif source == "parquet":
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)) if os.path.isdir(path) else path
        if not files:
            raise FileNotFoundError(f"data.path {path} holds no .parquet files.")
        dataset = datasets.load_dataset("parquet", data_files=files, split="train", streaming=data["streaming"])
    elif source == "hub":
        dataset = datasets.load_dataset(path, name=data["name"], split=data["split"], streaming=data["streaming"])
    else:
        raise ValueError(f"data.source must be 'timo', 'parquet', 'hub' or 'npy', got {source!r}.")
    if isinstance(dataset, datasets.Dataset):
        if len(dataset) == 0:
            raise ValueError(f"The {source} dataset {path} has no examples.")
        dataset = dataset.with_format("numpy", columns=["pixel_values"], output_all_columns=True)
    return dataset


# ----------------------------------------------------------------------------------------------- transforms
class BandNormalizer:
    """`(x * scale - mean[c]) / std[c]` per band."""

    def __init__(self, mean, std, scale: float = 1.0):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale = float(scale)
        if (self.std <= 0).any():
            raise ValueError(f"Normalisation std must be positive, got {self.std.flatten().tolist()}.")

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.shape[-3] != self.mean.shape[0]:
            raise ValueError(
                f"The data has {frames.shape[-3]} bands but the normalisation has {self.mean.shape[0]} means."
            )
        return (frames * self.scale - self.mean) / self.std

    def to_dict(self) -> dict:
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(), "scale": self.scale}


def estimate_band_statistics(examples: list[np.ndarray], scale: float = 1.0) -> BandNormalizer:
    """Per-band mean and std over every pixel of every frame of `examples` (each `[T, C, H, W]`)."""
    channels = examples[0].shape[1]
    flat = np.concatenate([np.asarray(e, dtype=np.float64).transpose(1, 0, 2, 3).reshape(channels, -1) for e in examples], 1)
    flat = flat * scale
    return BandNormalizer(flat.mean(axis=1), np.maximum(flat.std(axis=1), 1e-6), scale)


class SeriesTransform:
    """One raw series -> the model input `[k, C, H, W]` float32: frame draw, resize, per-band normalisation."""

    def __init__(self, data: dict, normalizer: BandNormalizer):
        self.num_frames = data["num_frames"]
        self.temporal_order = data["temporal_order"]
        self.short_series = data["short_series"]
        self.image_size = tuple(data["image_size"]) if data["image_size"] else None
        self.normalizer = normalizer
        if self.temporal_order not in ("sorted", "random"):
            raise ValueError(f"data.temporal_order must be 'sorted' or 'random', got {self.temporal_order!r}.")
        if self.short_series not in ("error", "repeat"):
            raise ValueError(f"data.short_series must be 'error' or 'repeat', got {self.short_series!r}.")

    def select_frames(self, num_available: int, rng: np.random.Generator, sample: str) -> np.ndarray:
        if self.num_frames is None:
            return np.arange(num_available)
        if num_available < self.num_frames:
            if self.short_series == "error":
                raise ValueError(
                    f"Series {sample} has {num_available} frames but data.num_frames = {self.num_frames}; filter "
                    "such series out, lower data.num_frames, or set data.short_series: repeat (draw with "
                    "replacement)."
                )
            chosen = rng.choice(num_available, self.num_frames, replace=True)
        else:
            chosen = rng.choice(num_available, self.num_frames, replace=False)
        return np.sort(chosen) if self.temporal_order == "sorted" else chosen

    def __call__(self, example: dict, seed: int) -> torch.Tensor:
        series = example["pixel_values"]
        sample = example.get("sample_id", "?")
        if getattr(series, "ndim", 0) != 4:
            raise ValueError(f"Series {sample}: pixel_values must be [T, C, H, W], got shape {np.shape(series)}.")
        chosen = self.select_frames(series.shape[0], np.random.default_rng(seed), sample)
        frames = torch.from_numpy(np.asarray(series[chosen] if self.num_frames else series, dtype=np.float32))
        if self.image_size is not None and tuple(frames.shape[-2:]) != self.image_size:
            frames = F.interpolate(frames, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        return self.normalizer(frames)


def stack_series(batch: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(item.shape) for item in batch}
    if len(shapes) != 1:
        raise ValueError(
            f"Series in one batch differ in shape {sorted(shapes)}; set data.image_size (and data.num_frames) so "
            "that every sample has the same [T, C, H, W]."
        )
    return torch.stack(batch)


# ----------------------------------------------------------------------------------------------- batch plans
class MapStyleSeries(torch.utils.data.Dataset):
    """Map-style wrapper whose keys are `(index, seed)`: the seed fixes the sample's random frame draw."""

    def __init__(self, source, transform: SeriesTransform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        index, seed = key
        return self.transform(self.source[index], seed)


class EpochBatchPlan(torch.utils.data.Sampler):
    """Micro-batches `[(index, seed), ...]` of one rank, from global micro-batch `start` on, epoch after epoch.

    Epoch `e` reads the permutation `default_rng(seed(run, e))` of the dataset; micro-batch `j` of the epoch gives
    rank `r` the slice `[(j * world + r) * batch, ...)`, so ranks never share samples and the incomplete tail of an
    epoch is dropped. Micro-batch `m` is a pure function of `m`: resuming at `start = m` continues exactly.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int, seed: int, start: int = 0):
        self.per_epoch = num_samples // (batch_size * world_size)
        if self.per_epoch == 0:
            raise ValueError(
                f"The dataset has {num_samples} series, fewer than one global micro-batch "
                f"({batch_size} per device x {world_size} processes)."
            )
        self.num_samples, self.batch_size, self.world_size = num_samples, batch_size, world_size
        self.rank, self.seed, self.start = rank, seed, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro, permutation, permutation_epoch = self.start, None, -1
        while True:
            epoch, position = divmod(micro, self.per_epoch)
            if epoch != permutation_epoch:
                permutation = np.random.default_rng(derive_seed(self.seed, epoch)).permutation(self.num_samples)
                permutation_epoch = epoch
            first = (position * self.world_size + self.rank) * self.batch_size
            yield [(int(i), derive_seed(self.seed, epoch, int(i))) for i in permutation[first : first + self.batch_size]]
            micro += 1


class StreamingSeries(torch.utils.data.IterableDataset):
    """A rank's share of a streamed source (already `split_dataset_by_node`), shuffled with a seeded buffer, epoch
    after epoch; the first `skip` samples (those consumed before a resume) are replayed without being decoded."""

    def __init__(self, stream, transform: SeriesTransform, seed: int, rank: int, shuffle_buffer: int, skip: int = 0):
        self.stream, self.transform = stream, transform
        self.seed, self.rank, self.shuffle_buffer, self.skip = seed, rank, shuffle_buffer, skip

    def __iter__(self) -> Iterator[torch.Tensor]:
        count, epoch = 0, 0
        while True:
            stream = self.stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer) if self.shuffle_buffer else self.stream
            stream.set_epoch(epoch)
            seen = False
            for example in stream:
                seen = True
                if count >= self.skip:
                    yield self.transform(example, derive_seed(self.seed, self.rank, count))
                count += 1
            if not seen:
                raise ValueError(f"Rank {self.rank} received no examples from the streamed dataset.")
            epoch += 1


def first_examples(source, count: int) -> list[np.ndarray]:
    """The `pixel_values` of the first `count` examples of a source (for the band statistics)."""
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        return [np.asarray(source[i]["pixel_values"]) for i in range(min(count, len(source)))]
    out = []
    for example in source:
        out.append(np.asarray(example["pixel_values"]))
        if len(out) >= count:
            break
    return out


def build_batches(
    data: dict,
    normalizer: BandNormalizer,
    source,
    batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
    start_micro_batch: int,
) -> tuple[Iterator[torch.Tensor], int | None]:
    """An endless iterator of this rank's micro-batches `[b, k, C, H, W]` from micro-batch `start_micro_batch` on,
    and the number of micro-batches per epoch (None for streams)."""
    transform = SeriesTransform(data, normalizer)
    workers = int(data["num_workers"])
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        plan = EpochBatchPlan(len(source), batch_size, world_size, rank, seed, start_micro_batch)
        loader = torch.utils.data.DataLoader(
            MapStyleSeries(source, transform), batch_sampler=plan, num_workers=workers, collate_fn=stack_series,
            persistent_workers=workers > 0,
        )
        return iter(loader), plan.per_epoch
    from datasets.distributed import split_dataset_by_node

    stream = split_dataset_by_node(source, rank=rank, world_size=world_size) if world_size > 1 else source
    series = StreamingSeries(stream, transform, seed, rank, int(data["shuffle_buffer"]), start_micro_batch * batch_size)
    loader = torch.utils.data.DataLoader(series, batch_size=batch_size, num_workers=0, collate_fn=stack_series)
    return iter(loader), None


__all__ = [
    "BandNormalizer",
    "EpochBatchPlan",
    "NpySeriesFolder",
    "SeriesTransform",
    "StreamingSeries",
    "build_batches",
    "estimate_band_statistics",
    "first_examples",
    "open_source",
]
