"""Per-band mean/std over a dataset, for TiMoImageProcessor's normalisation.

``python -m timo_hf.data.stats <dataset name | export folder | repo id> [--data-dir RAW] [--split train]
[--max-samples N] [--nodata 0] [--option key=value ...] [--output stats.json]`` streams the split and prints (or
writes) ``{"band_names": [...], "image_mean": [...], "image_std": [...], "pixel_count": [...], "num_samples": n}``;
``TiMoImageProcessor.from_statistics(<that file>)`` builds a processor from it.

Statistics are accumulated per band in float64 with Chan's parallel update (per-sample mean and M2 merged), so
uint16 reflectances over millions of pixels do not lose precision. NaN and the `nodata` value are excluded. A
band with a std of 0 (constant or without valid pixels) is reported with a warning naming it.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Iterable

import numpy as np


def _merge(count, mean, m2, count_b, mean_b, m2_b):
    total = count + count_b
    safe = np.where(total > 0, total, 1)
    delta = mean_b - mean
    mean = mean + delta * count_b / safe
    m2 = m2 + m2_b + delta**2 * count * count_b / safe
    return total, mean, m2


def _warn_degenerate_bands(band_names: list[str], count: np.ndarray, std: np.ndarray) -> None:
    """Warn about bands whose std is 0: TiMoImageProcessor refuses such statistics, since dividing by 0 would make
    NaN inputs that the valid mask still marks valid. A warning, not an error, so that one constant band (QA60,
    B10, an all-nodata band) does not waste a pass over the whole dataset: the other bands' statistics are sound."""
    empty = [name for name, pixels in zip(band_names, count) if pixels == 0]
    constant = [name for name, pixels, value in zip(band_names, count, std) if pixels > 0 and value == 0]
    for names, why in ((empty, "have no valid pixels"), (constant, "are constant")):
        if names:
            warnings.warn(f"bands {names} {why}: their std is 0, which TiMoImageProcessor refuses; leave them out "
                          "(from_statistics(..., band_names=[the other bands])) or set their std by hand",
                          stacklevel=3)


def compute_band_statistics(examples: Iterable[dict], *, nodata: float | None = None, max_samples: int | None = None,
                            column: str = "pixel_values") -> dict:
    """Mean/std per band of `column` ((T, C, H, W) arrays) over an iterable of examples (Dataset or streaming)."""
    count = mean = m2 = None
    band_names, num_samples = None, 0
    for example in examples:
        if max_samples is not None and num_samples >= max_samples:
            break
        pixels = np.asarray(example[column], dtype=np.float64)
        channels = np.moveaxis(pixels, -3, 0).reshape(pixels.shape[-3], -1)  # (C, T*H*W)
        valid = np.isfinite(channels) & ((channels != nodata) if nodata is not None else True)
        count_b = valid.sum(axis=1).astype(np.float64)
        mean_b = np.where(valid, channels, 0).sum(axis=1) / np.where(count_b > 0, count_b, 1)
        m2_b = np.where(valid, (channels - mean_b[:, None]) ** 2, 0).sum(axis=1)
        if count is None:
            count, mean, m2 = count_b, mean_b, m2_b
            band_names = list(example.get("band_names") or [f"band_{i}" for i in range(len(count_b))])
        else:
            count, mean, m2 = _merge(count, mean, m2, count_b, mean_b, m2_b)
        num_samples += 1
    if count is None:
        raise ValueError("no examples to compute statistics from")
    std = np.sqrt(m2 / np.where(count > 0, count, 1))
    _warn_degenerate_bands(band_names, count, std)
    return {"band_names": band_names, "image_mean": mean.tolist(), "image_std": std.tolist(),
            "pixel_count": count.astype(int).tolist(), "num_samples": num_samples, "nodata": nodata}


def main(argv=None) -> dict:
    from .loading import load_timo_dataset

    parser = argparse.ArgumentParser(description="Per-band mean/std of a TiMo dataset split.")
    parser.add_argument("name", help="dataset name (with --data-dir), export folder or Hub repo id")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--nodata", type=float, default=None)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="builder option; the value is parsed as JSON when possible (e.g. bands='[\"B4\"]')")
    parser.add_argument("--output", default=None, help="write the statistics JSON here (default: print)")
    args = parser.parse_args(argv)
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    dataset = load_timo_dataset(args.name, data_dir=args.data_dir, split=args.split, streaming=True, **options)
    stats = compute_band_statistics(dataset, nodata=args.nodata, max_samples=args.max_samples)
    text = json.dumps(stats, indent=1)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
    else:
        print(text)
    return stats


if __name__ == "__main__":
    main()
