"""`make demo` (`python -m timo_hf.demo`): the shortened path, end to end, with its outputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from timo_hf.demo import main as demo_main
from timo_hf.demo_scene import BANDS, CLASSES, DATES, land_cover, render


@pytest.mark.slow
def test_quick_demo_runs_the_whole_path(tmp_path):
    out = tmp_path / "demo"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "timo_hf.demo", "--quick", "--output-dir", str(out)],
                            capture_output=True, text=True, env=environment, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = result.stdout
    for stage in range(1, 6):
        assert f"[{stage}/5]" in printed
    assert "Demo finished" in printed and "(missing)" not in printed

    prediction = out / "prediction"
    scene = sorted((out / "data" / "target_scene").glob("*.tif"))
    assert len(scene) == len(DATES)
    with rasterio.open(prediction / "map.tif") as predicted, rasterio.open(scene[0]) as source:
        assert predicted.crs == source.crs and predicted.transform == source.transform
        assert (predicted.height, predicted.width) == (source.height, source.width)
        assert predicted.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        classes = predicted.read(1)
        first_date_missing = source.read_masks(1) == 0
    assert (classes[first_date_missing] == 255).all() and first_date_missing.any()  # the swath edge
    assert (classes[~first_date_missing] < len(CLASSES)).all()
    summary = json.loads((prediction / "summary.json").read_text())
    assert summary["tiles"] > 1  # the scene is larger than a tile
    for png in (prediction / "map.png", prediction / "reference.png", out / "runs" / "pretrain" / "loss_curve.png",
                out / "runs" / "finetune" / "loss_curve.png"):
        assert png.read_bytes()[:4] == b"\x89PNG", png
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["map_vs_reference"]["overall_accuracy"] <= 1.0
    assert metrics["map_vs_reference"]["scored_pixels"] + metrics["map_vs_reference"]["nodata_pixels"] == classes.size
    assert str(prediction / "map.tif") in printed and str(out / "metrics.json") in printed


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "precious.txt").write_text("do not delete")
    with pytest.raises(SystemExit, match="not written by the demo"):
        demo_main(["--quick", "--output-dir", str(tmp_path)])
    assert (tmp_path / "precious.txt").is_file()


def test_generated_series_has_seasonal_change_that_separates_the_crops():
    classes, parcels = land_cover(96, 96, seed=3)
    series = render(classes, parcels, DATES, seed=3).astype(float)  # [T, 10, H, W] reflectance x 1e4
    assert series.shape == (len(DATES), len(BANDS), 96, 96) and 300 < np.median(series) < 4000
    red, nir = series[:, BANDS.index("B4")], series[:, BANDS.index("B8")]
    ndvi = (nir - red) / (nir + red)
    winter, summer = (classes == CLASSES.index("winter crop")), (classes == CLASSES.index("summer crop"))
    winter_curve, summer_curve = ndvi[:, winter].mean(axis=1), ndvi[:, summer].mean(axis=1)
    assert winter_curve.argmax() < summer_curve.argmax()  # winter crops green up months earlier
    assert winter_curve[1] - summer_curve[1] > 0.2 and summer_curve[4] - winter_curve[4] > 0.2
    assert ndvi[:, classes == CLASSES.index("water")].mean() < 0
