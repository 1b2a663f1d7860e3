"""Data throughput for a MultiSenGE-like sample (T=12, 10 bands, 256x256 uint16) vs a CPU training step of TiMo-Base.

Measures, on this machine:

1. building from raw GeoTIFFs (``MultiSenGE`` builder -> Arrow cache), samples/s;
2. reading the Parquet export map-style (native-dtype numpy format), samples/s;
3. reading the Parquet export streaming (``streaming=True``), samples/s;
4. TiMoImageProcessor on one sample (normalise + pad to a multiple of 32), samples/s;
5. a training step of TiMo-Base (forward, mean of the last hidden state as a stand-in loss, backward, AdamW
   step) on the same sample, batch 1, samples/s: the median of ``--train-steps`` steps after an untimed one (the
   first step also creates the optimizer's state and grows the process's memory);

and prints whether each reading path keeps up with the training step. Every number printed is measured by this
run; nothing is hard-coded. Usage::

    python benchmarks/data_throughput.py [--samples 8] [--size 256] [--frames 12] [--skip-model] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from timo_hf.data import export_to_parquet, get_builder, load_timo_dataset, with_native_format  # noqa: E402
from timo_hf.data.synthetic import write_multisenge  # noqa: E402
from timo_hf.image_processing_timo import TiMoImageProcessor  # noqa: E402


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def _read_all(dataset) -> int:
    count = 0
    for example in dataset:
        assert example["pixel_values"].dtype == np.uint16
        count += 1
    return count


def measure_data(workdir: Path, samples: int, size: int, frames: int, passes: int) -> dict:
    tiles = max(1, samples // 2)
    raw = write_multisenge(workdir / "raw", num_tiles=tiles, patches_per_tile=2 if samples > 1 else 1,
                           num_dates=frames, size=size)
    builder = get_builder("multisenge", raw, cache_dir=str(workdir / "cache"), split_fractions=(1, 0, 0))
    start = time.perf_counter()
    summary = builder.build()
    build_seconds = time.perf_counter() - start
    built = builder.as_dataset("train")
    num = summary.num_examples["train"]
    export = export_to_parquet(built, workdir / "export")
    map_style = load_timo_dataset(str(export), split="train", cache_dir=str(workdir / "cache-parquet"))
    _read_all(map_style)  # warm the page cache once
    start = time.perf_counter()
    read = sum(_read_all(map_style) for _ in range(passes))
    map_seconds = time.perf_counter() - start
    start = time.perf_counter()
    streamed = sum(_read_all(load_timo_dataset(str(export), split="train", streaming=True)) for _ in range(passes))
    stream_seconds = time.perf_counter() - start
    example = with_native_format(built)[0]
    processor = TiMoImageProcessor(normalization="s2_l2a_10", num_frames=frames)
    start = time.perf_counter()
    for _ in range(passes):
        processor(example)
    processor_seconds = time.perf_counter() - start
    return {
        "sample_shape": list(example["pixel_values"].shape),
        "samples": num,
        "build_from_geotiff_samples_per_s": _rate(num, build_seconds),
        "parquet_map_style_samples_per_s": _rate(read, map_seconds),
        "parquet_streaming_samples_per_s": _rate(streamed, stream_seconds),
        "image_processor_samples_per_s": _rate(passes, processor_seconds),
        "parquet_mb": sum(path.stat().st_size for path in export.rglob("*.parquet")) / 2**20,
    }


def measure_training_step(size: int, frames: int, steps: int) -> dict:
    from timo_hf import TiMoConfig, TiMoModel

    torch.manual_seed(0)
    model = TiMoModel(TiMoConfig.from_preset("base", num_channels=10)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixel_values = torch.randn(1, frames, 10, size, size)
    timings = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(pixel_values=pixel_values).last_hidden_state.float().mean()
        loss.backward()
        optimizer.step()
        timings.append(time.perf_counter() - start)
    step_seconds = statistics.median(timings[1:])
    return {"train_step_seconds": step_seconds, "train_samples_per_s": _rate(1, step_seconds),
            "torch_threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--passes", type=int, default=3, help="read passes over the export")
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps (after an untimed one)")
    parser.add_argument("--skip-model", action="store_true", help="do not time the TiMo-Base training step")
    parser.add_argument("--workdir", default=None, help="keep the raw data, cache and export here")
    parser.add_argument("--json", default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                   **measure_data(workdir, args.samples, args.size, args.frames, args.passes)}
    print(f"sample (T, C, H, W) = {tuple(results['sample_shape'])} uint16, {results['samples']} samples, "
          f"{results['machine']}")
    print(f"  build from raw GeoTIFFs      : {results['build_from_geotiff_samples_per_s']:8.2f} samples/s")
    print(f"  Parquet map-style read       : {results['parquet_map_style_samples_per_s']:8.2f} samples/s")
    print(f"  Parquet streaming read       : {results['parquet_streaming_samples_per_s']:8.2f} samples/s")
    print(f"  TiMoImageProcessor           : {results['image_processor_samples_per_s']:8.2f} samples/s")
    if not args.skip_model:
        results.update(measure_training_step(args.size, args.frames, args.train_steps))
        train = results["train_samples_per_s"]
        print(f"  TiMo-Base CPU training step  : {train:8.4f} samples/s "
              f"({results['train_step_seconds']:.1f} s/step, batch 1, {results['torch_threads']} threads)")
        for key in ("parquet_map_style_samples_per_s", "parquet_streaming_samples_per_s"):
            verdict = "keeps up" if results[key] >= train else "DOES NOT keep up"
            print(f"  {key.split('_samples')[0]:<28} {verdict} ({results[key] / train:.0f}x the training rate)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
