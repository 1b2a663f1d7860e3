""""Only time tells": a generated segmentation benchmark that no single frame can solve.

Each image is a grid of square parcels (`cell_size` px). Every parcel belongs to one of `num_classes` classes and
follows its class's temporal pattern: a fixed ordering of the brightness levels `0 .. T-1` over the `T` frames
(class `k`'s template is the `k`-th permutation of the levels that starts with 0, in lexicographic order, so no
two templates are cyclic shifts of each other), read from a random starting frame (a uniform cyclic shift drawn
per parcel). Every pixel of a parcel has the parcel's level in every band (a fixed spectral signature, identical
for all classes) plus Gaussian noise.

Why a single frame carries no information: at any frame `t`, the level of a parcel of class `k` is
`template_k[(t + shift) % T]` with `shift` uniform, i.e. uniform over `0 .. T-1` whatever `k` is, and parcels
are independent. So the distribution of any single frame (values, spatial arrangement, everything) is the same
for every labelling, and the best single-frame prediction is chance (accuracy `1 / num_classes`, mIoU about
`1 / (2 * num_classes - 1)` for uniform guessing). The class is only readable from the order of the levels over
time, which is what TiMo's temporal attention has to learn. `tests/test_finetune.py` trains a tiny TiMo on it with
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
import itertools

import datasets
import numpy as np


BAND_NAMES = ("B4", "B3", "B2")
# Reflectance (x 1e4) of level 0 and the step per level, per band: one signature for every class.
BAND_BASE = (900.0, 1100.0, 1300.0)
BAND_STEP = (600.0, 500.0, 400.0)
DEFAULT_NUM_SAMPLES = {"train": 64, "validation": 16, "test": 32}


def class_templates(num_frames: int, num_classes: int) -> np.ndarray:
    """`[num_classes, num_frames]` level orderings: permutations of `0..T-1` starting with 0, lexicographic.

    Starting with 0 picks one representative per cyclic-shift class, so the classes stay distinct under the random
    shift; there are `(T - 1)!` of them.
    """
    templates = [(0, *rest) for rest in itertools.permutations(range(1, num_frames))]
    if not 2 <= num_classes <= len(templates):
        raise ValueError(
            f"num_classes must be in [2, {len(templates)}] for num_frames={num_frames} ((T-1)! distinct temporal "
            f"patterns), got {num_classes}."
        )
    return np.asarray(templates[:num_classes], dtype=np.int64)


def class_names(num_frames: int, num_classes: int) -> list[str]:
    return ["levels " + "-".join(str(level) for level in row) for row in class_templates(num_frames, num_classes)]


def band_statistics(num_frames: int, noise: float) -> dict:
    """Exact per-band mean and std of the generated values (levels uniform over `0..T-1`, plus noise)."""
    levels = np.arange(num_frames)
    mean = [base + step * levels.mean() for base, step in zip(BAND_BASE, BAND_STEP)]
    std = [float(np.sqrt((step * levels.std()) ** 2 + (step * noise) ** 2)) for step in BAND_STEP]
    return {"band_names": list(BAND_NAMES), "image_mean": [float(m) for m in mean], "image_std": std}


def generate_samples(count: int, *, size: int = 32, cell_size: int = 8, num_frames: int = 4, num_classes: int = 4,
                     noise: float = 0.15, seed: int = 0) -> dict[str, list]:
    """`count` samples as columns: `pixel_values` [T, 3, size, size] uint16, `label` [size, size] uint8, ..."""
    if size % cell_size or cell_size % 4:
        raise ValueError(f"size ({size}) must be a multiple of cell_size ({cell_size}), itself a multiple of 4.")
    templates = class_templates(num_frames, num_classes)
    rng = np.random.default_rng(seed)
    cells = size // cell_size
    base = np.asarray(BAND_BASE)[None, :, None, None]
    step = np.asarray(BAND_STEP)[None, :, None, None]
    dates = [(datetime.date(2021, 1, 1) + datetime.timedelta(days=30 * t)).isoformat() for t in range(num_frames)]
    columns = {"sample_id": [], "pixel_values": [], "dates": [], "band_names": [], "label": []}
    for index in range(count):
        classes = rng.integers(0, num_classes, size=(cells, cells))
        shifts = rng.integers(0, num_frames, size=(cells, cells))
        frames = (np.arange(num_frames)[:, None, None] + shifts[None]) % num_frames  # [T, cells, cells]
        levels = templates[classes[None], frames]  # [T, cells, cells]
        levels = np.repeat(np.repeat(levels, cell_size, axis=1), cell_size, axis=2)  # [T, H, W]
        values = base + step * (levels[:, None] + rng.normal(0.0, noise, size=(num_frames, len(BAND_NAMES), size, size)))
        columns["sample_id"].append(f"time_tells_{seed}_{index:05d}")
        columns["pixel_values"].append(np.clip(np.rint(values), 0, 65535).astype(np.uint16))
        columns["dates"].append(dates)
        columns["band_names"].append(list(BAND_NAMES))
        label = np.repeat(np.repeat(classes, cell_size, axis=0), cell_size, axis=1)
        columns["label"].append(label.astype(np.uint8))
    return columns


def make_time_tells(num_samples: dict[str, int] | None = None, *, size: int = 32, cell_size: int = 8,
                    num_frames: int = 4, num_classes: int = 4, noise: float = 0.15, seed: int = 0,
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
        description="'Only time tells': parcels whose classes differ only in the temporal order of their levels "
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
    parser.add_argument("--num-classes", type=int, default=4)
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
