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
`datasets.distributed.split_dataset_by_node`, shuffled in seeded blocks of `shuffle_buffer` examples, and resumed
from the per-rank stream position saved in the checkpoint (`StreamingBatches`, `save_data_state`/`load_data_state`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from common import derive_seed, loader_generator


logger = logging.getLogger("timo_hf.pretrain")


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
def series_band_names(data: dict, source) -> list[str] | None:
    """The bands the model is pre-trained on, in order: `data.band_names`, else those the first example names (a
    folder of bare `.npy` series names none: give them in `data.band_names`, in file order, so that the saved model
    knows its bands, as `timo predict`, `timo embed` and fine-tuning need)."""
    if data["band_names"]:
        return list(data["band_names"])
    if isinstance(source, NpySeriesFolder):
        return None
    example = source[0] if hasattr(source, "__len__") else next(iter(source))
    return example.get("band_names")


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
    names = series_band_names(data, source)
    if data["processor"]:
        processor = TiMoImageProcessor.from_pretrained(data["processor"])
        for key, value in {**options, "band_names": processor.band_names or names}.items():
            if key != "size" or size is not None:
                setattr(processor, key, value)
        return processor
    setting = data["normalization"]
    if setting == "auto":
        count = int(data["normalization_samples"])
        examples = (source[i] for i in range(min(count, len(source)))) if hasattr(source, "__len__") else source
        statistics = compute_band_statistics(examples, max_samples=count)
        if isinstance(source, NpySeriesFolder):  # bare arrays: named by data.band_names only
            statistics["band_names"] = names
        return TiMoImageProcessor.from_statistics(statistics, **options)
    if names:
        options["band_names"] = names
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
    epoch is dropped. With `micro_batches_per_step` (gradient accumulation) an epoch holds a whole number of
    optimizer steps: the micro-batches left over are part of the dropped tail, so that no step straddles two
    epochs. Micro-batch `m` is a pure function of `m`: resuming at `start = m` continues exactly.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int, seed: int, start: int = 0,
                 micro_batches_per_step: int = 1):
        per_step = batch_size * world_size * micro_batches_per_step
        self.per_epoch = num_samples // per_step * micro_batches_per_step
        if self.per_epoch == 0:
            raise ValueError(
                f"The dataset has {num_samples} series, fewer than one optimizer step takes ({batch_size} per "
                f"device x {world_size} processes x {micro_batches_per_step} accumulated micro-batches)."
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


STREAM_RESUME_MODES = ("exact", "fast")
DATA_STATE_FILE = "data_state_rank{rank}.json"


class StreamingBatches:
    """One rank's endless micro-batches `[b, k, C, H, W]` from a streamed `datasets.IterableDataset`, with a
    checkpointable position (`state_dict()` / `load_state_dict()`).

    Reading. Epoch `e` iterates `split_dataset_by_node(source, rank, world_size)` (shards split across ranks when
    their count is a multiple of the world size, otherwise every rank reads all and keeps 1 example in
    `world_size`: ranks never share a sample within an epoch) after `set_epoch(key)` with a key drawn from
    (run seed, e), so datasets shuffles the shard order differently in every epoch and run seed (with
    `shuffle_buffer: 0`, key = e: file order in epoch 0, datasets' own shard reshuffle afterwards).

    Shuffling is a *block* shuffle (not datasets' rolling `shuffle(buffer_size)`): the rank's stream is cut into
    blocks of `shuffle_buffer` consecutive examples (the first block of each epoch has a random length in
    `[1, shuffle_buffer]`, so blocks differ between epochs even with a single shard) and each block is yielded in
    the permutation `default_rng(derive_seed(seed, rank, epoch, block))`. It holds as many examples in memory as
    the rolling buffer of the same size and mixes over the same distance, but its position is exactly
    restorable: datasets' `state_dict()` of the rank's stream is recorded at every block boundary. (datasets 5.2's
    own `shuffle(buffer_size)` is not: its `state_dict()` holds the source position only, so a resume loses the
    buffered examples (up to `buffer_size`, read but never yielded in that epoch) and restarts the buffer RNG.)

    Sample `n` of the rank (counted over epochs) draws its frames with `derive_seed(seed, rank, n)`.

    State (`state_dict()`, a small JSON-able dict): epoch, `samples_consumed`, block index and offset, and
    datasets' `state_dict()` of the rank stream at the start (`block_start`) and end (`block_end`) of the current
    block. It covers exactly the micro-batches returned by `next()` so far (no read-ahead beyond the block in
    memory, no DataLoader prefetch: batches are assembled here, `num_workers` is not used for streams).

    Resume modes (`data.stream_resume`, applied by `load_state_dict`):

    - `"exact"` (default): restore `block_start`, re-read the current block (at most `shuffle_buffer` examples,
      i.e. one buffer fill, about the cost of starting a run) and skip its already consumed part: the micro-batches
      that follow are bit-identical to those of an uninterrupted run.
    - `"fast"`: restore `block_end` and read nothing again. Lost: the current block's unconsumed examples (at most
      `shuffle_buffer - 1`; never seen in this epoch, they come back in the next one). Guarantee: the sample
      sequence that follows is the uninterrupted run's sequence with those examples removed, each later sample
      drawing the same frames (its sample number is advanced past the skipped ones); no sample repeats within
      the epoch. Batch boundaries shift, so the batches themselves differ.

    When resuming at a block boundary (offset 0) both modes are identical and read nothing again.
    """

    def __init__(self, source, transform: SeriesTransform, *, batch_size: int, world_size: int, rank: int,
                 seed: int, shuffle_buffer: int, resume_mode: str = "exact", skip: int = 0):
        _check_resume_mode(resume_mode)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size}).")
        self.source, self.transform = source, transform
        self.batch_size, self.world_size, self.rank, self.seed = int(batch_size), int(world_size), int(rank), int(seed)
        self.shuffle_buffer, self.resume_mode = max(0, int(shuffle_buffer)), resume_mode
        self.block_capacity = max(1, self.shuffle_buffer)
        self.num_shards = int(getattr(source, "num_shards", 1))
        self.last_sample_ids: list = []  # sample_id of each series of the last batch (None where absent)
        # position: everything below is what state_dict() saves
        self.epoch, self.count, self.block_index, self.block_offset = 0, 0, 0, 0
        self.block_start: dict | None = None  # datasets state of the rank stream before the current block
        self.block_end: dict | None = None  # ... after it (None while no block is in memory)
        # live reading state (not saved)
        self._block: list | None = None
        self._stream = None
        self._reader = None
        self._pending_offset = 0  # exact resume: examples of the re-read block to skip
        self._started = False
        self._skip = int(skip)  # legacy resume without a saved state: replay this many samples

    # ------------------------------------------------------------------ reading
    def _epoch_key(self, epoch: int) -> int:
        if not self.shuffle_buffer:
            return epoch
        return 1 + derive_seed(self.seed, epoch, 0x5EED) % (2**31 - 2)

    def _block_length(self, epoch: int, block: int) -> int:
        if block == 0 and self.block_capacity > 1:
            return 1 + derive_seed(self.seed, self.rank, epoch, 0xB10C) % self.block_capacity
        return self.block_capacity

    def _open_epoch(self) -> None:
        from datasets.distributed import split_dataset_by_node

        stream = split_dataset_by_node(self.source, rank=self.rank, world_size=self.world_size)  # a fresh object
        stream.set_epoch(self._epoch_key(self.epoch))
        if self.block_start is not None:
            stream.load_state_dict(self.block_start)
        self._stream, self._reader = stream, iter(stream)

    def _fill_block(self) -> bool:
        """Read the next block into memory; False at the end of the epoch."""
        if self._reader is None:
            self._open_epoch()
        items = list(islice(self._reader, self._block_length(self.epoch, self.block_index)))
        if not items:
            return False
        self.block_end = self._stream.state_dict()
        if self.shuffle_buffer > 1:
            order = np.random.default_rng(derive_seed(self.seed, self.rank, self.epoch, self.block_index))
            items = [items[i] for i in order.permutation(len(items))]
        self._block, self.block_offset = items, self._pending_offset
        self._pending_offset = 0
        if self.block_offset > len(items):
            raise RuntimeError(
                f"Rank {self.rank}: the saved data position (offset {self.block_offset} in block {self.block_index} "
                f"of epoch {self.epoch}) does not fit the re-read block of {len(items)} examples; the data changed."
            )
        return True

    def _next_block(self) -> None:
        self.block_index, self.block_offset, self._block = self.block_index + 1, 0, None
        self.block_start, self.block_end = self.block_end, None

    def _next_example(self) -> dict:
        while self._block is None or self.block_offset >= len(self._block):
            if self._block is not None:  # an exactly re-read, already consumed block
                self._next_block()
                continue
            if self._fill_block():
                continue
            if self.block_index == 0:
                raise ValueError(f"Rank {self.rank} received no examples from the streamed dataset.")
            self.epoch, self.block_index, self.block_offset = self.epoch + 1, 0, 0
            self.block_start = self.block_end = None
            self._stream = self._reader = None
        example = self._block[self.block_offset]
        self._block[self.block_offset] = None  # free it
        self.block_offset += 1
        self.count += 1
        if self.block_offset == len(self._block):  # block done: the state is the next block's start
            self._next_block()
        return example

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if not self._started:
            self._started = True
            if self._skip:
                logger.warning(
                    "Rank %d: no saved data position; replaying the first %d streamed samples to find it (each is "
                    "read and decoded again).", self.rank, self._skip,
                )
                for _ in range(self._skip):
                    self._next_example()
        series, ids = [], []
        for _ in range(self.batch_size):
            number = self.count
            example = self._next_example()
            ids.append(example.get("sample_id"))
            series.append(self.transform(example, derive_seed(self.seed, self.rank, number)))
        self.last_sample_ids = ids
        return stack_series(series)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The position after the micro-batches returned so far (JSON-serialisable)."""
        return {
            "version": 1,
            "kind": "stream",
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "num_shards": self.num_shards,
            "epoch": self.epoch,
            "samples_consumed": self.count,
            "block_index": self.block_index,
            "block_offset": self.block_offset,
            "block_length": len(self._block) if self._block is not None else None,
            "block_start": copy.deepcopy(self.block_start),
            "block_end": copy.deepcopy(self.block_end) if self._block is not None else None,
        }

    def load_state_dict(self, state: dict, mode: str | None = None) -> None:
        """Continue from `state` (this rank's `state_dict()` of the same layout), in `mode` (default: the
        configured `data.stream_resume`). Call before the first `next()`.

        Raises ValueError for another rank's or another world size's state (use `resume_from_states`, which
        applies the documented fallback), or for another seed / shard count (a different data order).
        """
        mode = _check_resume_mode(mode or self.resume_mode)
        if state.get("kind") != "stream" or state.get("version") != 1:
            raise ValueError(f"Not a stream data state (version 1): {sorted(state)}.")
        for key in ("rank", "world_size", "seed", "num_shards"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"The saved data state has {key} = {state[key]} but this run has {getattr(self, key)}; its "
                    "position does not apply here (see StreamingBatches.resume_from_states for the fallback)."
                )
        if state["shuffle_buffer"] != self.shuffle_buffer and mode == "exact" and state["block_offset"]:
            logger.warning(
                "Rank %d: data.shuffle_buffer changed (%s -> %s): the saved shuffle block cannot be rebuilt; resuming "
                "in 'fast' mode (the rest of the current block is skipped for this epoch).",
                self.rank, state["shuffle_buffer"], self.shuffle_buffer,
            )
            mode = "fast"
        offset = int(state["block_offset"])
        if offset and mode == "fast":  # jump to the end of the current block
            skipped = int(state["block_length"]) - offset
            self._seek(state["epoch"], state["samples_consumed"] + skipped, state["block_index"] + 1,
                       state["block_end"])
        else:
            self._seek(state["epoch"], state["samples_consumed"], state["block_index"], state["block_start"])
            self._pending_offset = offset  # exact: re-read the block and skip what was consumed

    def resume_from_states(self, states: dict[int, dict], mode: str | None = None) -> str:
        """Resume from the per-rank states of a checkpoint (`{saved_rank: state}`, all ranks it saved).

        Same world size (and seed, shard count): this rank's own state is loaded (`load_state_dict`); returns
        `"resumed"`. Otherwise the per-rank positions do not map onto the new ranks, and no rank may take another's
        state: with a warning, every rank starts the *next* epoch (the largest saved epoch + 1) from its beginning,
        with sample numbers continuing after the largest saved one (no frame seed is reused). The examples of the
        interrupted epoch that no rank had consumed yet are skipped for that epoch; nothing is repeated.
        Returns `"next_epoch"`. No states (a checkpoint written before data states existed): the legacy replay of
        `start_micro_batch * batch_size` samples given to `build_batches` is kept; returns `"replay"`.
        """
        if not states:
            if self._skip:
                logger.warning("The checkpoint holds no data state; falling back to replaying %d samples.", self._skip)
            return "replay"
        saved_world = {int(s["world_size"]) for s in states.values()}
        usable = (
            saved_world == {self.world_size}
            and set(states) == set(range(self.world_size))
            and states[self.rank].get("seed") == self.seed
            and states[self.rank].get("num_shards") == self.num_shards
        )
        if usable:
            self.load_state_dict(states[self.rank], mode)
            return "resumed"
        first = next(iter(states.values()))
        logger.warning(
            "Rank %d: the checkpoint's data position was saved by %s (world size %s, seed %s, %s shards; this run: "
            "rank of %d processes, seed %d, %d shards); per-rank stream states do not carry over. Starting the next "
            "epoch from its beginning on every rank; unread examples of the interrupted epoch are skipped.",
            self.rank, f"ranks {sorted(states)}", sorted(saved_world), first.get("seed"), first.get("num_shards"),
            self.world_size, self.seed, self.num_shards,
        )
        self._seek(max(int(s["epoch"]) for s in states.values()) + 1,
                   max(int(s["samples_consumed"]) for s in states.values()), 0, None)
        return "next_epoch"

    def _seek(self, epoch: int, count: int, block_index: int, block_start: dict | None) -> None:
        """Continue at the beginning of block `block_index` of `epoch` (datasets' stream position `block_start`,
        None at an epoch's start), the next sample being number `count`."""
        if self._started:
            raise RuntimeError("A data position must be restored before the first batch is read.")
        self.epoch, self.count, self.block_index, self.block_offset = int(epoch), int(count), int(block_index), 0
        self.block_start, self.block_end = copy.deepcopy(block_start), None
        self._block = self._stream = self._reader = None
        self._skip = self._pending_offset = 0


def _check_resume_mode(mode: str) -> str:
    if mode not in STREAM_RESUME_MODES:
        raise ValueError(f"data.stream_resume must be one of {STREAM_RESUME_MODES}, got {mode!r}.")
    return mode


def save_data_state(batches, folder: str | os.PathLike, rank: int) -> Path | None:
    """Write this rank's data position into a checkpoint folder (`data_state_rank{rank}.json`); None (nothing
    written) for map-style data, whose position is the step count."""
    if not hasattr(batches, "state_dict"):
        return None
    path = Path(folder) / DATA_STATE_FILE.format(rank=rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(batches.state_dict(), indent=1))
    os.replace(tmp, path)
    return path


def read_data_states(folder: str | os.PathLike) -> dict[int, dict]:
    """All per-rank data states of a checkpoint folder, `{rank: state}` (empty if it has none)."""
    states = {}
    for path in sorted(Path(folder).glob("data_state_rank*.json")):
        try:
            state = json.loads(path.read_text())
            states[int(state["rank"])] = state
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"Checkpoint {folder}: cannot read the data state {path.name} ({err}).") from err
    return states


def load_data_state(batches, folder: str | os.PathLike, mode: str | None = None) -> str | None:
    """Restore the data position of `batches` from a checkpoint folder before the first batch is read.
    Returns what happened (`StreamingBatches.resume_from_states`), or None for map-style data."""
    if not hasattr(batches, "resume_from_states"):
        return None
    return batches.resume_from_states(read_data_states(folder), mode)


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
    and the number of micro-batches per epoch (None for streams).

    Map-style data: a DataLoader over `EpochBatchPlan`; its position is a function of `start_micro_batch` alone.
    Streamed data: a `StreamingBatches`, whose position is saved and restored with the checkpoint. Call sequence
    (every rank; `folder` is the checkpoint folder being written / resumed from)::

        batches, per_epoch = build_batches(..., start_micro_batch=start_step * accumulation)
        if resuming:
            load_data_state(batches, folder)  # before the first next(batches); no-op (None) for map-style
        ...
        # at a save, after the step's `accumulation` next(batches) calls, inside the staging folder that
        # `accelerator.save_state` wrote (between its barriers), on every rank:
        save_data_state(batches, staging_folder, rank)  # data_state_rank{rank}.json; no-op for map-style

    `load_data_state` reads every `data_state_rank*.json` of the folder: same world size -> this rank's state is
    loaded (`data.stream_resume`: "exact" or "fast", see `StreamingBatches`); another world size -> warning and
    every rank starts the next epoch; no data state (older checkpoint) -> replay of `start_micro_batch * batch_size`
    samples (slow). Streams ignore `data.num_workers` (no prefetch, so the state covers exactly the batches
    returned)."""
    transform = SeriesTransform(data, processor)
    workers = int(data["num_workers"])
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        plan = EpochBatchPlan(len(source), batch_size, world_size, rank, seed, start_micro_batch)
        loader = torch.utils.data.DataLoader(
            MapStyleSeries(source, transform), batch_sampler=plan, num_workers=workers, collate_fn=stack_series,
            persistent_workers=workers > 0, generator=loader_generator(seed),
        )
        return iter(loader), plan.per_epoch
    if workers:
        logger.info("data.num_workers is not used for streamed data (batches are assembled in the training process).")
    return StreamingBatches(
        source, transform, batch_size=batch_size, world_size=world_size, rank=rank, seed=seed,
        shuffle_buffer=int(data["shuffle_buffer"]), resume_mode=data.get("stream_resume") or "exact",
        skip=start_micro_batch * batch_size,
    ), None


__all__ = [
    "EpochBatchPlan",
    "NpySeriesFolder",
    "SeriesTransform",
    "StreamingBatches",
    "build_batches",
    "load_data_state",
    "make_processor",
    "open_source",
    "read_data_states",
    "save_data_state",
]
