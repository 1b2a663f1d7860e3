"""`python -m timo_hf.demo` (`make demo`): TiMo end to end on a generated Sentinel-2 time series, offline, on CPU.

1. data: a 6-date, 10-band Sentinel-2-like time series of two areas around Toulouse with a land-cover reference
   (`timo_hf.demo_scene`: real UTM georeferencing, plausible reflectances, crops that differ only by season);
2. pre-training: masked image modelling of a tiny TiMo on unlabelled crops of both areas (`training/pretrain.py`);
3. fine-tuning: land-cover segmentation on labelled patches of the first area, written in the MultiSenGE raw layout
   and read by `timo_hf.data` (`training/finetune.py`, which also evaluates its held-out test patches);
4. `timo predict` on the whole second area, a scene several tiles wide: class map COG + probabilities + quicklook;
5. the map is scored against the second area's reference labels.

The outputs (GeoTIFF, quicklook PNG, loss curves, metrics) are listed at the end. `--quick` runs the same path on
tiny sizes (the test suite does). Everything is written under `--output-dir` (default `demo_output`), which a
re-run replaces.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import yaml

from .demo_scene import CLASSES, band_statistics, write_npy_series, write_patches_multisenge, write_scene


REPOSITORY = Path(__file__).resolve().parents[2]
TRAINING = REPOSITORY / "training"
MARKER = ".timo-demo"
MODEL_BANDS = ("B2", "B3", "B4", "B8")  # the model sees blue, green, red and near infrared
TRAINING_ORIGIN, TARGET_ORIGIN = (362000.0, 4838000.0), (371000.0, 4829000.0)  # UTM 31N, around Toulouse


@dataclass(frozen=True)
class Sizes:
    """How big each stage is: the full demo and the `--quick` one differ only here."""

    train_columns: int  # pseudo-tiles (spatial split groups) of the fine-tuning area
    train_rows: int
    patch: int
    target: tuple[int, int]  # (height, width) of the scene mapped by `timo predict`
    tile: int
    overlap: int
    pretrain_series: int
    pretrain_steps: int
    pretrain_batch: int
    finetune_epochs: int
    finetune_batch: int


FULL = Sizes(train_columns=10, train_rows=5, patch=64, target=(384, 448), tile=128, overlap=32, pretrain_series=96,
             pretrain_steps=150, pretrain_batch=8, finetune_epochs=20, finetune_batch=8)
QUICK = Sizes(train_columns=4, train_rows=1, patch=32, target=(96, 112), tile=64, overlap=16, pretrain_series=8,
              pretrain_steps=2, pretrain_batch=4, finetune_epochs=1, finetune_batch=2)

MODEL_CONFIG = {
    "num_channels": len(MODEL_BANDS),
    "hidden_sizes": [16, 32, 48, 64],
    "num_heads": [2, 2, 4, 4],
    "depths": [1, 1, 1, 1],
    "attention_types": ["dstga", "dstga", "mhsa", "mhsa"],
}


class Stages:
    """Numbered progress lines with elapsed time."""

    def __init__(self, total: int):
        self.total, self.index, self.started = total, 0, time.perf_counter()

    def start(self, title: str) -> None:
        self.index += 1
        print(f"\n[{self.index}/{self.total}] {title}  (at {self.elapsed()})", flush=True)

    def elapsed(self) -> str:
        seconds = int(time.perf_counter() - self.started)
        return f"{seconds // 60}m{seconds % 60:02d}s"


def prepare_output(folder: Path) -> Path:
    """An empty output folder; a previous demo's folder (with its marker file) is replaced, anything else refused."""
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).is_file():
            raise SystemExit(f"demo: {folder} exists and was not written by the demo; choose another --output-dir")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("written by python -m timo_hf.demo; a re-run replaces this folder\n")
    return folder


def run_script(script: str, config: dict, config_path: Path) -> None:
    """Run `training/<script>` on a YAML config written next to the outputs (so the run can be repeated by hand)."""
    if not (TRAINING / script).is_file():
        raise SystemExit(f"demo: {TRAINING / script} not found; the demo runs from a clone of the repository "
                         "(pip install -e . then make demo)")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, str(TRAINING / script), "--config", str(config_path)]
    print("$ " + " ".join(command), flush=True)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    subprocess.run(command, check=True, env=environment)


def pretrain_config(sizes: Sizes, series: Path, statistics: dict, output: Path) -> dict:
    return {
        "model": {"config": {**MODEL_CONFIG, "mask_unit_size": 16, "mim_decoder_hidden_size": 32,
                             "mim_decoder_depth": 1, "mim_decoder_num_heads": 2}},
        "data": {"source": "npy", "path": str(series), "num_frames": 3, "band_names": list(MODEL_BANDS),
                 "normalization": {"mean": statistics["image_mean"], "std": statistics["image_std"]}},
        "training": {"output_dir": str(output), "max_steps": sizes.pretrain_steps,
                     "per_device_batch_size": sizes.pretrain_batch, "lr": 1.5e-3, "warmup_steps": 10,
                     "save_steps": 10**6, "logging_steps": 5, "seed": 0},
    }


def finetune_config(sizes: Sizes, patches: Path, statistics_path: Path, pretrained: Path, output: Path,
                    cache: Path) -> dict:
    return {
        "model": {"task": "segmentation", "pretrained": str(pretrained),
                  "config": {"uper_hidden_size": 16, "temporal_fusion": "max", "classifier_dropout": 0.0}},
        "data": {"source": "timo", "name": "multisenge", "path": str(patches), "cache_dir": str(cache),
                 "options": {"bands": list(MODEL_BANDS)}, "class_names": list(CLASSES),
                 "normalization_statistics": str(statistics_path), "processor": {"temporal_sampling": "all"}},
        "training": {"output_dir": str(output), "num_epochs": sizes.finetune_epochs,
                     "per_device_batch_size": sizes.finetune_batch, "lr": 2e-3, "scheduler": "cosine",
                     "warmup_epochs": min(2, sizes.finetune_epochs - 1) if sizes.finetune_epochs > 1 else 0,
                     "metric_for_best": "mean_iou", "logging_steps": 2, "num_quicklooks": 2, "seed": 0},
    }


def score_map(map_path: Path, reference_path: Path) -> dict:
    """Overall accuracy, mean IoU and per-class IoU of the predicted map against the reference labels."""
    from .metrics.confusion import compute_scores, confusion_matrix

    with rasterio.open(map_path) as predicted, rasterio.open(reference_path) as reference:
        prediction, truth = predicted.read(1).astype(np.int64), reference.read(1).astype(np.int64)
        nodata = predicted.nodata
    scored = prediction != nodata
    matrix = confusion_matrix(prediction[scored], truth[scored], num_labels=len(CLASSES))
    scores = compute_scores(matrix)
    return {
        "overall_accuracy": float(scores["overall_accuracy"]), "mean_iou": float(scores["mean_iou"]),
        "per_class_iou": {name: None if math.isnan(float(value)) else float(value)
                          for name, value in zip(CLASSES, scores["per_category_iou"])},
        "scored_pixels": int(scored.sum()), "nodata_pixels": int((~scored).sum()),
        "confusion_matrix": np.asarray(matrix).tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="demo_output",
                        help="where everything is written (default: demo_output)")
    parser.add_argument("--quick", action="store_true", help="the same path on tiny sizes (seconds, for tests)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    out = prepare_output(Path(args.output_dir).resolve())
    stages = Stages(5)

    stages.start("generating a Sentinel-2 L2A time series (6 dates, 10 bands) of two areas with land-cover labels")
    train_height, train_width = sizes.train_rows * sizes.patch, sizes.train_columns * sizes.patch
    training_area = write_scene(out / "data" / "training_area", height=train_height, width=train_width, seed=0,
                                origin=TRAINING_ORIGIN, area="training")
    target = write_scene(out / "data" / "target_scene", height=sizes.target[0], width=sizes.target[1], seed=1,
                         origin=TARGET_ORIGIN, area="target", swath_edge=True)
    patches = write_patches_multisenge(training_area, out / "data" / "finetune_patches", sizes.patch)
    series = write_npy_series([training_area, target], out / "data" / "pretrain_series", sizes.patch, MODEL_BANDS,
                              sizes.pretrain_series)
    statistics = band_statistics(training_area, MODEL_BANDS)
    statistics_path = out / "data" / "band_statistics.json"
    statistics_path.write_text(json.dumps(statistics, indent=2))
    print(f"training area {train_width}x{train_height} px -> {patches} labelled patches of {sizes.patch} px "
          f"(MultiSenGE layout); target scene {sizes.target[1]}x{sizes.target[0]} px; {series} unlabelled series "
          f"for pre-training; classes: {', '.join(CLASSES)}")

    stages.start(f"pre-training a tiny TiMo by masked image modelling ({sizes.pretrain_steps} steps)")
    pretrain_dir = out / "runs" / "pretrain"
    run_script("pretrain.py", pretrain_config(sizes, out / "data" / "pretrain_series", statistics, pretrain_dir),
               out / "configs" / "pretrain.yaml")

    stages.start(f"fine-tuning for land-cover segmentation ({sizes.finetune_epochs} epochs)")
    finetune_dir = out / "runs" / "finetune"
    run_script("finetune.py", finetune_config(sizes, out / "data" / "finetune_patches", statistics_path,
                                              pretrain_dir / "model", finetune_dir, out / "cache"),
               out / "configs" / "finetune.yaml")

    stages.start(f"timo predict over the whole target scene ({sizes.target[1]}x{sizes.target[0]} px, "
                 f"tiles of {sizes.tile} px)")
    from .cli import main as timo

    prediction = out / "prediction"
    prediction.mkdir()
    command = ["predict", "--model", str(finetune_dir / "model"), "--inputs", str(out / "data" / "target_scene"),
               "--out", str(prediction / "map.tif"), "--probabilities", "--tile-size", str(sizes.tile),
               "--overlap", str(sizes.overlap), "--summary-json", str(prediction / "summary.json")]
    print("$ timo " + " ".join(command), flush=True)
    if timo(command) != 0:
        raise SystemExit("demo: timo predict failed")

    stages.start("scoring the map against the target scene's reference labels")
    metrics = {"map_vs_reference": score_map(prediction / "map.tif", target.labels)}
    results_path = finetune_dir / "results.json"
    if results_path.is_file():
        metrics["finetune_results"] = json.loads(results_path.read_text()).get("test")
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2))
    from .inference.quicklook import class_colormap, write_quicklook

    write_quicklook(target.labels, prediction / "reference.png", list(CLASSES), class_colormap(len(CLASSES)),
                    title="reference land cover of the target scene")

    scores = metrics["map_vs_reference"]
    print(f"\nDemo finished in {stages.elapsed()}. Map vs reference: overall accuracy "
          f"{scores['overall_accuracy']:.3f}, mean IoU {scores['mean_iou']:.3f} "
          f"(IoU {', '.join(f'{k} {v:.2f}' for k, v in scores['per_class_iou'].items() if v is not None)})")
    listing = [
        ("class map GeoTIFF (COG)", prediction / "map.tif"),
        ("class probabilities", prediction / "map_probabilities.tif"),
        ("quicklook PNG", prediction / "map.png"),
        ("reference quicklook", prediction / "reference.png"),
        ("pre-training loss curve", pretrain_dir / "loss_curve.png"),
        ("fine-tuning loss curve", finetune_dir / "loss_curve.png"),
        ("metrics (map vs reference)", metrics_path),
        ("fine-tuning results", results_path),
        ("fine-tuned model", finetune_dir / "model"),
        ("input scene (6 GeoTIFFs)", out / "data" / "target_scene"),
    ]
    for label, path in listing:
        print(f"  {label:<28} {path}{'' if path.exists() else '  (missing)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
