"""The fixture generator: deterministic, real files, and content a model can learn from."""

import hashlib

import numpy as np
import rasterio

from timo_hf.data import load_timo_dataset, write_synthetic


def _digest(root):
    return hashlib.sha256(b"".join(path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file())).hexdigest()


def test_same_seed_writes_the_same_bytes(tmp_path):
    first = write_synthetic("sen12flood", tmp_path / "a", num_sequences=2, size=16)
    second = write_synthetic("sen12flood", tmp_path / "b", num_sequences=2, size=16)
    third = write_synthetic("sen12flood", tmp_path / "c", num_sequences=2, size=16, seed=1)
    assert _digest(first) == _digest(second) != _digest(third)


def test_geotiffs_are_georeferenced(raw_roots):
    path = next((raw_roots["mtlcc"] / "data").rglob("*_20m.tif"))
    with rasterio.open(path) as src:
        assert src.crs.to_epsg() == 32632 and src.transform.a == 20.0 and src.count == 6


def test_labels_are_learnable_from_pixels(raw_roots, tmp_path):
    """A nearest-centroid classifier on per-pixel temporal profiles beats chance by far (spatial + temporal cues)."""
    ds = load_timo_dataset("multisenge", data_dir=raw_roots["multisenge"], cache_dir=str(tmp_path / "c"), split="train")
    example = ds[0]
    features = example["pixel_values"].astype(np.float32).reshape(-1, 32 * 32).T  # (pixels, T*C)
    labels = example["label"].reshape(-1)
    keep = labels != 255
    features, labels = features[keep], labels[keep]
    classes = np.unique(labels)
    centroids = np.stack([features[labels == c].mean(axis=0) for c in classes])
    predicted = classes[np.argmin(((features[:, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    assert len(classes) > 1 and (predicted == labels).mean() > 0.9


def test_the_command_passes_other_writer_options(tmp_path, capsys):
    from timo_hf.data.synthetic import main

    main(["millionst", str(tmp_path), "--size", "24", "--set", "layout=npy", "--set", "num_locations=2"])
    series = sorted(tmp_path.glob("*.npy"))
    assert [path.name for path in series] == ["000000.npy", "000001.npy"]
    assert np.load(series[0]).shape == (10, 3, 24, 24) and str(tmp_path) in capsys.readouterr().out
