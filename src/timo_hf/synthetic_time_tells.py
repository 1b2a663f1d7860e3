""""Only time tells": a generated segmentation benchmark that no single frame can solve.

Each image is a grid of square parcels (`cell_size` px) observed at `T` dates. A parcel takes one brightness level
`0 .. T-1` per date (the same level in every pixel and band, times a fixed spectral signature shared by all
classes, plus Gaussian noise). Its class is how many *distinct* levels it goes through: by default two classes,
"stable" (one level at every date, like water or bare rock) and "changing" (a different level at every date, like
a crop through its season); `num_classes = K` uses 1, 2, ..., K-1 and T distinct levels. Which dates share a level
is a uniformly drawn surjection of the dates onto the distinct levels, and which levels they are is a uniformly
drawn injection into `0 .. T-1`.

Why a single frame carries no information: both draws are symmetric in the levels, so at every date the level of a
parcel is uniform over `0 .. T-1` whatever its class, and parcels are independent. The distribution of any single
frame (values, spatial arrangement, everything) is therefore the same for every labelling, and the best
single-frame prediction is chance (accuracy `1 / K`; mIoU `1 / (2K - 1)` for uniform guessing, 1/3 for K = 2).
Only comparing the dates of a parcel reveals its class. `tests/test_finetune.py` trains a tiny TiMo on it with
`training/finetune.py` (config `training/configs/time_tells_tiny.yaml`) and checks both sides.

Parcels are aligned to multiples of 4 px (the stem stride), so a model's stage-1 tokens never straddle two
parcels. The examples have the columns of the `timo_hf.data` builders (`sample_id`, `pixel_values` [T, C, H, W]
uint16, `dates`, `band_names`, `label` [H, W] uint8), so `training/finetune.py` and `TiMoImageProcessor` treat it
like a downloaded dataset:

    from timo_hf.synthetic_time_tells import make_time_tells
    splits = make_time_tells(num_samples={"train": 64, "validation": 16, "test": 32}, seed=0)

`python -m timo_hf.synthetic_time_tells <folder>` writes it as Parquet (`timo_hf.data.export_to_parquet`), which
`load_timo_dataset(<folder>)` reads back.
"""

from __future__ import annotations

import argparse
import datetime

import datasets
import numpy as np


BAND_NAMES = ("B4", "B3", "B2")
# Reflectance (x 1e4) of level 0 and the step per level, per band: one signature for every class.
BAND_BASE = (900.0, 1100.0, 1300.0)
BAND_STEP = (600.0, 500.0, 400.0)
DEFAULT_NUM_SAMPLES = {"train": 64, "validation": 16, "test": 32}


def class_names(num_frames: int, num_classes: int = 2) -> list[str]:
    counts = distinct_level_counts(num_frames, num_classes)
    names = [f"{count} levels" for count in counts]
    names[0], names[-1] = "stable (1 level)", f"changing ({num_frames} levels)"
    return names


def band_statistics(num_frames: int, noise: float) -> dict:
    """Exact per-band mean and std of the generated values (levels uniform over `0..T-1`, plus noise)."""
    levels = np.arange(num_frames)
    mean = [base + step * levels.mean() for base, step in zip(BAND_BASE, BAND_STEP)]
    std = [float(np.sqrt((step * levels.std()) ** 2 + (step * noise) ** 2)) for step in BAND_STEP]
    return {"band_names": list(BAND_NAMES), "image_mean": [float(m) for m in mean], "image_std": std}


def distinct_level_counts(num_frames: int, num_classes: int) -> list[int]:
    """Distinct levels of each class: `1, 2, ..., num_classes - 1` and `num_frames` for the last class."""
    return list(range(1, num_classes)) + [num_frames]


def parcel_levels(rng: np.random.Generator, classes: np.ndarray, num_frames: int, num_classes: int) -> np.ndarray:
    """`[T, *classes.shape]` levels: a parcel of class `k` takes `distinct_level_counts(...)[k]` distinct levels.

    Which frames share a level is a uniformly drawn surjection of the frames onto that many slots; which levels the
    slots get is a uniformly drawn injection into `0 .. T-1`. Both draws are symmetric in the levels, so at every
    frame the level is uniform over `0 .. T-1` whatever the class.
    """
    counts = distinct_level_counts(num_frames, num_classes)
    flat = classes.reshape(-1)
    levels = np.empty((num_frames, flat.size), dtype=np.int64)
    for index, k in enumerate(flat):
        while True:  # rejection sampling of a surjection frames -> counts[k] slots
            slots = rng.integers(0, counts[k], size=num_frames)
            if len(np.unique(slots)) == counts[k]:
                break
        levels[:, index] = rng.permutation(num_frames)[slots]
    return levels.reshape(num_frames, *classes.shape)


def generate_samples(count: int, *, size: int = 32, cell_size: int = 8, num_frames: int = 4, num_classes: int = 2,
                     noise: float = 0.1, seed: int = 0) -> dict[str, list]:
    """`count` samples as columns: `pixel_values` [T, 3, size, size] uint16, `label` [size, size] uint8, ..."""
    if size % cell_size or cell_size % 4:
        raise ValueError(f"size ({size}) must be a multiple of cell_size ({cell_size}), itself a multiple of 4.")
    if not 2 <= num_classes <= num_frames:
        raise ValueError(f"num_classes must be in [2, num_frames={num_frames}] (1 to T distinct levels), "
                         f"got {num_classes}.")
    rng = np.random.default_rng(seed)
    cells = size // cell_size
    base = np.asarray(BAND_BASE)[None, :, None, None]
    step = np.asarray(BAND_STEP)[None, :, None, None]
    dates = [(datetime.date(2021, 1, 1) + datetime.timedelta(days=30 * t)).isoformat() for t in range(num_frames)]
    columns = {"sample_id": [], "pixel_values": [], "dates": [], "band_names": [], "label": []}
    for index in range(count):
        classes = rng.integers(0, num_classes, size=(cells, cells))
        levels = parcel_levels(rng, classes, num_frames, num_classes)  # [T, cells, cells]
        levels = np.repeat(np.repeat(levels, cell_size, axis=1), cell_size, axis=2)  # [T, H, W]
        noise_values = rng.normal(0.0, noise, size=(num_frames, len(BAND_NAMES), size, size))
        values = base + step * (levels[:, None] + noise_values)
        columns["sample_id"].append(f"time_tells_{seed}_{index:05d}")
        columns["pixel_values"].append(np.clip(np.rint(values), 0, 65535).astype(np.uint16))
        columns["dates"].append(dates)
        columns["band_names"].append(list(BAND_NAMES))
        label = np.repeat(np.repeat(classes, cell_size, axis=0), cell_size, axis=1)
        columns["label"].append(label.astype(np.uint8))
    return columns


def make_time_tells(num_samples: dict[str, int] | None = None, *, size: int = 32, cell_size: int = 8,
                    num_frames: int = 4, num_classes: int = 2, noise: float = 0.1, seed: int = 0,
                    native_format: bool = True) -> datasets.DatasetDict:
    """The benchmark as a `DatasetDict` (default splits `DEFAULT_NUM_SAMPLES`), deterministic in `seed`.

    Each split is drawn from its own seed (`seed`, split index), so changing one split's size leaves the others
    unchanged. `native_format=True` returns numpy arrays in their stored dtype (`timo_hf.data.with_native_format`).
    """
    num_samples = dict(num_samples or DEFAULT_NUM_SAMPLES)
    features = datasets.Features(
        {
            "sample_id": datasets.Value("string"),
            "pixel_values": datasets.Array4D((None, len(BAND_NAMES), size, size), "uint16"),
            "dates": datasets.Sequence(datasets.Value("string")),
            "band_names": datasets.Sequence(datasets.Value("string")),
            "label": datasets.Array2D((size, size), "uint8"),
        }
    )
    info = datasets.DatasetInfo(
        features=features,
        description="'Only time tells': parcels whose classes differ only in how many levels they go through "
        f"(timo_hf.synthetic_time_tells; classes: {class_names(num_frames, num_classes)}).",
    )
    splits = {}
    for split_index, (split, count) in enumerate(num_samples.items()):
        columns = generate_samples(count, size=size, cell_size=cell_size, num_frames=num_frames,
                                   num_classes=num_classes, noise=noise,
                                   seed=int(np.random.SeedSequence([seed, split_index]).generate_state(1)[0]))
        splits[split] = datasets.Dataset.from_dict(columns, features=features, info=info)
    dataset = datasets.DatasetDict(splits)
    if native_format:
        from .data import with_native_format

        dataset = with_native_format(dataset)
    return dataset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the 'only time tells' benchmark as Parquet.")
    parser.add_argument("output_dir")
    parser.add_argument("--train", type=int, default=DEFAULT_NUM_SAMPLES["train"])
    parser.add_argument("--validation", type=int, default=DEFAULT_NUM_SAMPLES["validation"])
    parser.add_argument("--test", type=int, default=DEFAULT_NUM_SAMPLES["test"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--num-frames", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .data import export_to_parquet

    dataset = make_time_tells({"train": args.train, "validation": args.validation, "test": args.test},
                              size=args.size, num_frames=args.num_frames, num_classes=args.num_classes,
                              seed=args.seed, native_format=False)
    export_to_parquet(dataset, args.output_dir)
    print(f"wrote {args.output_dir}: " + ", ".join(f"{split} {len(part)}" for split, part in dataset.items()))


if __name__ == "__main__":
    main()
