"""Pre-training data for `training/pretrain.py`: sources, temporal sampling, band normalisation, batch plans.

Sources (`data.source` in the YAML):

- `"timo"`: `timo_hf.data.load_timo_dataset(data.name, data_dir=data.path, split=data.split,
  streaming=data.streaming, **data.options)`: `data.name` is a dataset name of the project's raw-data builders
  (`"millionst"`, ..., with `data.path` the raw download), a folder written by `timo_hf.data.export_to_parquet`,
  or a Hub dataset id;
- `"npy"`: a local folder of `*.npy` series `[T, C, H, W]` (e.g. the official MillionST export, one file per
  location), read directly without `datasets` (a light adapter for corpora that are only arrays).

Every example provides `pixel_values` `[T, C, H, W]` (any numeric dtype). Each time a series is used, `num_frames`
of its frames are drawn at random without replacement (default 3 of 10, paper Table 8) and kept in chronological
order (`temporal_order: random` keeps the draw order, as the official code). A series with fewer frames than
requested is an error by default (`short_series: error`); `short_series: repeat` draws with replacement instead.
The chosen frames then go through a `TiMoImageProcessor` (band selection by name where the data has band names,
per-band normalisation, optional resize to `image_size`); it is saved with the final model.

Determinism (for exact resume and identical ranks): map-style sources are read in a per-epoch permutation drawn from
the run seed and split across ranks by position, and every random choice for a sample (its frames) comes from a
seed derived from (run seed, epoch, sample index), never from a global RNG. Streaming sources are split with
`datasets.distributed.split_dataset_by_node`, shuffled with a seeded buffer, and replayed up to the resume point.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

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
    if source != "timo":
        raise ValueError(f"data.source must be 'timo' or 'npy', got {source!r}.")
    if not data["name"]:
        raise ValueError("data.source='timo' needs data.name (a dataset name, an exported folder or a Hub id).")
    from timo_hf.data import load_timo_dataset

    dataset = load_timo_dataset(
        data["name"], data_dir=path, split=data["split"], streaming=data["streaming"], **data["options"]
    )
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"The dataset {data['name']} ({data['split']}) has no examples.")
    return dataset


# ----------------------------------------------------------------------------------------------- transforms
def make_processor(data: dict, source):
    """The `TiMoImageProcessor` that normalises (and resizes) the chosen frames.

    `data.processor`: a saved processor (folder or Hub id); otherwise `data.normalization`: `"auto"` (per-band
    statistics of the first `normalization_samples` series, `timo_hf.data.compute_band_statistics`), a preset name of
    `TiMoImageProcessor` (`"rgb_uint8"`, `"s2_l2a_10"`, ...), `{mean: [...], std: [...]}`, or `"none"`. Frames are
    chosen here, not by the processor, and never padded (`size_divisor` off: padding would be reconstructed).
    """
    from timo_hf.data import compute_band_statistics
    from timo_hf.image_processing_timo import NORMALIZATION_PRESETS, TiMoImageProcessor

    size = {"height": data["image_size"][0], "width": data["image_size"][1]} if data["image_size"] else None
    options = {"temporal_sampling": "all", "pad_frames": False, "size_divisor": None, "size": size}
    if data["processor"]:
        processor = TiMoImageProcessor.from_pretrained(data["processor"])
        for key, value in options.items():
            if key != "size" or size is not None:
                setattr(processor, key, value)
        return processor
    setting = data["normalization"]
    if setting == "auto":
        count = int(data["normalization_samples"])
        examples = (source[i] for i in range(min(count, len(source)))) if hasattr(source, "__len__") else source
        statistics = compute_band_statistics(examples, max_samples=count)
        if isinstance(source, NpySeriesFolder):  # bare arrays: no band names to select by
            statistics["band_names"] = None
        return TiMoImageProcessor.from_statistics(statistics, **options)
    if setting == "none":
        return TiMoImageProcessor(**options)
    if isinstance(setting, str) and setting in NORMALIZATION_PRESETS:
        return TiMoImageProcessor(normalization=setting, **options)
    if isinstance(setting, dict) and {"mean", "std"} <= set(setting):
        return TiMoImageProcessor(image_mean=setting["mean"], image_std=setting["std"], **options)
    raise ValueError(
        f"data.normalization must be 'auto', 'none', a preset of {sorted(NORMALIZATION_PRESETS)} or "
        f"{{mean: [...], std: [...]}}, got {setting!r}."
    )


class SeriesTransform:
    """One raw series -> the model input `[k, C, H, W]` float32: frame draw, then the image processor."""

    def __init__(self, data: dict, processor):
        self.num_frames = data["num_frames"]
        self.temporal_order = data["temporal_order"]
        self.short_series = data["short_series"]
        self.processor = processor
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
        frames = np.asarray(series[chosen] if self.num_frames else series)
        processed = self.processor(frames, band_names=example.get("band_names"), seed=seed, return_tensors="pt")
        return processed["pixel_values"][0]


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
            chunk = permutation[first : first + self.batch_size]
            yield [(int(i), derive_seed(self.seed, epoch, int(i))) for i in chunk]
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
            stream = self.stream
            if self.shuffle_buffer:
                stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
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


def build_batches(
    data: dict,
    processor,
    source,
    batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
    start_micro_batch: int,
) -> tuple[Iterator[torch.Tensor], int | None]:
    """An endless iterator of this rank's micro-batches `[b, k, C, H, W]` from micro-batch `start_micro_batch` on,
    and the number of micro-batches per epoch (None for streams)."""
    transform = SeriesTransform(data, processor)
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
    skip = start_micro_batch * batch_size
    series = StreamingSeries(stream, transform, seed, rank, int(data["shuffle_buffer"]), skip)
    loader = torch.utils.data.DataLoader(series, batch_size=batch_size, num_workers=0, collate_fn=stack_series)
    return iter(loader), None


__all__ = [
    "EpochBatchPlan",
    "NpySeriesFolder",
    "SeriesTransform",
    "StreamingSeries",
    "build_batches",
    "make_processor",
    "open_source",
]
