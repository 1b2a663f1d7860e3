"""TiMoImageProcessor: bands by name, normalisation, temporal sampling/padding, nodata, spatial ops, save/load."""

import json

import numpy as np
import pytest
import torch

from timo_hf.data import compute_band_statistics, load_timo_dataset
from timo_hf.data.stats import main as stats_main
from timo_hf.image_processing_timo import NORMALIZATION_PRESETS, TiMoImageProcessor


def _series(t=5, c=3, h=20, w=20, seed=0):
    return np.random.default_rng(seed).integers(100, 3000, size=(t, c, h, w)).astype(np.uint16)


DATES = ["2020-01-01", "2020-01-11", "2020-02-01", "2020-03-01", "2020-03-02"]


def test_band_selection_by_name_and_normalisation():
    image = _series(t=2, c=4)
    processor = TiMoImageProcessor(band_names=["B4", "B3", "B2"], image_mean=[10, 20, 30], image_std=[2, 4, 5])
    out = processor(image, band_names=["B02", "B03", "B04", "B08"], return_tensors="np")
    assert out["pixel_values"].shape == (1, 2, 3, 32, 32) and out["pixel_values"].dtype == np.float32
    expected = (image[:, [2, 1, 0]].astype(np.float32) - np.array([10, 20, 30])[:, None, None]) / \
        np.array([2, 4, 5])[:, None, None]
    np.testing.assert_allclose(out["pixel_values"][0, :, :, :20, :20], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="not in the input bands"):
        processor(image, band_names=["B02", "B03", "B05", "B08"])
    with pytest.raises(ValueError, match="expects"):
        processor(image)  # 4 bands, no names: ambiguous


def test_presets_state_their_source_and_match_band_counts():
    for name, preset in NORMALIZATION_PRESETS.items():
        assert preset["source"]
        if preset["band_names"] is not None:
            assert len(preset["band_names"]) == len(preset["image_mean"]) == len(preset["image_std"]), name
    assert len(NORMALIZATION_PRESETS["s2_l2a_10"]["band_names"]) == 10
    assert len(NORMALIZATION_PRESETS["s2_l2a_13"]["band_names"]) == 13
    processor = TiMoImageProcessor(normalization="rgb_uint8")
    out = processor(np.full((1, 3, 32, 32), 255, np.uint8), return_tensors="np")
    np.testing.assert_allclose(out["pixel_values"], 1.0)  # TiMo pre-training: x / 255
    scale = TiMoImageProcessor(normalization="reflectance_1e4")
    assert scale(np.full((1, 13, 32, 32), 5000, np.uint16), return_tensors="np")["pixel_values"].max() == \
        pytest.approx(0.5)


@pytest.mark.parametrize("mode, expected", [("first", [0, 1, 2]), ("evenly_spaced", [0, 2, 4])])
def test_deterministic_temporal_sampling(mode, expected):
    image = np.arange(5, dtype=np.float32)[:, None, None, None] * np.ones((5, 1, 32, 32), np.float32)
    out = TiMoImageProcessor(num_frames=3, temporal_sampling=mode)(image, return_tensors="np")
    assert out["pixel_values"][0, :, 0, 0, 0].tolist() == expected


def test_random_sampling_is_seeded_and_chronological():
    image = np.arange(8, dtype=np.float32)[:, None, None, None] * np.ones((8, 1, 32, 32), np.float32)
    first = TiMoImageProcessor(num_frames=3, temporal_sampling="random", seed=7)
    second = TiMoImageProcessor(num_frames=3, temporal_sampling="random", seed=7)
    draws = [first(image, return_tensors="np")["pixel_values"][0, :, 0, 0, 0].tolist() for _ in range(4)]
    assert draws == [second(image, return_tensors="np")["pixel_values"][0, :, 0, 0, 0].tolist() for _ in range(4)]
    assert all(draw == sorted(draw) and len(set(draw)) == 3 for draw in draws)
    assert len({tuple(draw) for draw in draws}) > 1  # successive calls draw different frames
    again = first(image, seed=3, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(again, first(image, seed=3, return_tensors="np")["pixel_values"])


def test_padding_frames_and_temporal_positions():
    images = [_series(t=2), _series(t=4, seed=1)]
    dates = [DATES[:2], DATES[1:5]]
    index = TiMoImageProcessor(num_frames=5)(images, dates=dates)
    assert index["pixel_values"].shape == (2, 5, 3, 32, 32)
    assert index["frame_mask"].tolist() == [[True, True, False, False, False], [True, True, True, True, False]]
    assert index["temporal_positions"][0].tolist() == [0, 1, 2, 3, 4]  # official: frame index
    assert (index["pixel_values"][0, 2:] == 0).all() and not index["valid_mask"][0, 2:].any()
    days = TiMoImageProcessor(num_frames=5, temporal_encoding="days")(images, dates=dates)
    assert days["temporal_positions"].tolist() == [[0, 10, 0, 0, 0], [0, 21, 50, 51, 0]]
    with pytest.raises(ValueError, match="dates"):
        TiMoImageProcessor(temporal_encoding="days")(images)


def test_dates_shared_by_a_batch_or_given_per_sample():
    images = [_series(t=3), _series(t=3, seed=1)]
    days = TiMoImageProcessor(temporal_encoding="days")
    shared = days(images, dates=DATES[:3])["temporal_positions"].tolist()
    assert shared == [[0, 10, 31], [0, 10, 31]]
    assert days(images, dates=[DATES[:3], DATES[2:]])["temporal_positions"].tolist() == [[0, 10, 31], [0, 29, 30]]


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        ([_series(), _series(seed=1)], {"dates": [DATES]}, "dates has 1 entries for 2 samples"),
        ([_series(), _series(seed=1)], {"labels": [np.zeros((20, 20))]}, "labels has 1 entries for 2 samples"),
        (_series(t=5), {"dates": DATES[:4]}, "sample 0 has 5 frames but 4 dates"),
        (_series(t=5), {"dates": DATES[:4] + ["2020-13-01"]}, "sample 0: dates must be ISO dates"),
        (_series(t=3), {"dates": [DATES[1], DATES[0], DATES[2]]}, "sample 0: frames must be in chronological order"),
        (_series()[0], {}, r"images has shape \(3, 20, 20\).*image\[None\]"),
        ([_series(), _series()[0]], {}, r"sample 1 has shape \(3, 20, 20\)"),
        (_series()[:0], {}, "sample 0 has no frames"),
        (_series().astype(np.complex64), {}, "sample 0 has dtype complex64"),
    ],
    ids=["dates-per-batch", "labels-per-batch", "date-count", "bad-date", "unsorted-dates", "one-frame",
         "one-frame-in-batch", "no-frames", "complex"],
)
def test_bad_inputs_raise_value_errors_naming_the_problem(images, kwargs, message):
    """Dates are checked whenever given (also for the default frame-index encoding), and a per-sample argument of
    the wrong length raises instead of silently dropping samples."""
    with pytest.raises(ValueError, match=message):
        TiMoImageProcessor()(images, **kwargs)


def test_frames_without_enough_valid_pixels_are_dropped_before_sampling(tmp_path):
    """min_valid_fraction: an out-of-swath date (all nodata) and a cloudy one (70% nodata) leave the series; the
    dates, per-frame labels and temporal sampling follow the frames kept."""
    image = _series(t=5, c=2, h=10, w=10).astype(np.float32)
    image[1] = -9999  # all nodata
    image[3, 0, :7] = np.nan  # 70% of the pixels missing in one band
    labels = np.arange(5)
    processor = TiMoImageProcessor(nodata_value=-9999, min_valid_fraction=0.5, temporal_encoding="days")
    out = processor(image, dates=DATES, labels=labels, return_tensors="np")
    assert out["frame_mask"].tolist() == [[True, True, True]]
    assert out["labels"].tolist() == [[0, 2, 4]]
    assert out["temporal_positions"].tolist() == [[0, 31, 61]]  # 2020-01-01, 2020-02-01, 2020-03-02
    np.testing.assert_array_equal(out["valid_mask"][0, :, :10, :10], True)
    sampled = TiMoImageProcessor(nodata_value=-9999, min_valid_fraction=0.5, num_frames=2,
                                 temporal_sampling="evenly_spaced")(image, labels=labels, return_tensors="np")
    assert sampled["labels"].tolist() == [[0, 4]]
    image[:, 1, 1:] = np.nan  # no frame keeps half its pixels: the most valid one (frame 3 is worse) stays
    image[2, 1, 1] = 0
    assert processor(image, dates=DATES, labels=labels, return_tensors="np")["labels"].tolist() == [[2]]
    processor.save_pretrained(tmp_path)
    assert TiMoImageProcessor.from_pretrained(tmp_path).min_valid_fraction == 0.5
    with pytest.raises(ValueError, match="min_valid_fraction must be in"):
        TiMoImageProcessor(min_valid_fraction=0.0)


def test_nodata_and_nan_become_fill_value_with_a_valid_mask():
    image = _series(t=2, c=2, h=32, w=32).astype(np.float32)
    image[0, 1, 3, 4] = np.nan
    image[1, 0, 5, 6] = -9999
    out = TiMoImageProcessor(nodata_value=-9999, fill_value=-1.0, image_mean=100.0, image_std=10.0)(
        image, return_tensors="np")
    valid = out["valid_mask"][0]
    assert not valid[0, 3, 4] and not valid[1, 5, 6] and valid.sum() == 2 * 32 * 32 - 2
    assert out["pixel_values"][0, 0, 1, 3, 4] == -1.0 and out["pixel_values"][0, 1, 0, 5, 6] == -1.0
    assert np.isfinite(out["pixel_values"]).all()


def test_resize_crop_and_pad_to_multiple_of_32_with_labels():
    image, label = _series(t=2, h=50, w=70), np.arange(50 * 70).reshape(50, 70) % 7
    out = TiMoImageProcessor(size=(60, 80), crop_size=40, random_crop=True, seed=0)(image, labels=label)
    assert out["pixel_values"].shape == (1, 2, 3, 64, 64)
    assert out["valid_mask"][0, :, :40, :40].all() and not out["valid_mask"][0, :, 40:].any()
    assert out["labels"].shape == (1, 64, 64) and (out["labels"][0, 40:] == 255).all()
    assert set(out["labels"][0, :40, :40].unique().tolist()) <= set(range(7))
    exact = TiMoImageProcessor()(image, labels=label, return_tensors="np")  # no resize: labels untouched
    np.testing.assert_array_equal(exact["labels"][0, :50, :70], label)
    assert exact["pixel_values"].shape[-2:] == (64, 96)


def test_per_frame_labels_follow_the_sampled_frames():
    image = np.arange(4, dtype=np.float32)[:, None, None, None] * np.ones((4, 1, 32, 32), np.float32)
    out = TiMoImageProcessor(num_frames=2, temporal_sampling="evenly_spaced")(
        [image, image[:1]], labels=[[0, 1, 0, 1], [1]], return_tensors="np")
    assert out["labels"].tolist() == [[0, 1], [1, -100]]


def test_dataset_examples_and_save_load_round_trip(raw_roots, tmp_path):
    ds = load_timo_dataset("multisenge", data_dir=raw_roots["multisenge"], cache_dir=str(tmp_path / "c"), split="train")
    options = dict(normalization="s2_rgb", num_frames=3, temporal_sampling="random", seed=1,
                   temporal_encoding="days", size=40)
    processor = TiMoImageProcessor(**options)
    batch = processor([ds[0], ds[1]])
    assert isinstance(batch["pixel_values"], torch.Tensor) and batch["pixel_values"].shape == (2, 3, 3, 64, 64)
    assert batch["labels"].shape == (2, 64, 64)
    processor.save_pretrained(tmp_path / "proc")
    saved = json.loads((tmp_path / "proc" / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "TiMoImageProcessor" and saved["band_names"] == ["B4", "B3", "B2"]
    loaded = TiMoImageProcessor.from_pretrained(tmp_path / "proc")
    assert loaded.to_dict() == processor.to_dict()
    reloaded = loaded([ds[0], ds[1]])  # same seed -> same first draw as the original processor's first call
    for key in batch:
        torch.testing.assert_close(reloaded[key], batch[key])


def test_statistics_command_and_from_statistics(raw_roots, tmp_path):
    ds = load_timo_dataset("multisenge", data_dir=raw_roots["multisenge"], cache_dir=str(tmp_path / "c"), split="train")
    stats = compute_band_statistics(ds)
    pixels = np.concatenate([np.moveaxis(example["pixel_values"], 1, 0).reshape(10, -1) for example in ds], axis=1)
    np.testing.assert_allclose(stats["image_mean"], pixels.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(stats["image_std"], pixels.std(axis=1), rtol=1e-9)
    assert stats["band_names"] == ds[0]["band_names"] and stats["num_samples"] == len(ds)
    out = tmp_path / "stats.json"
    cli = stats_main(["multisenge", "--data-dir", str(raw_roots["multisenge"]), "--split", "train",
                      "--output", str(out), "--option", 'bands=["B4", "B3", "B2"]'])
    assert json.loads(out.read_text()) == cli and cli["band_names"] == ["B4", "B3", "B2"]
    np.testing.assert_allclose(cli["image_mean"], np.asarray(stats["image_mean"])[[2, 1, 0]], rtol=1e-9)
    processor = TiMoImageProcessor.from_statistics(out)
    normalised = processor(ds[0]["pixel_values"], band_names=ds[0]["band_names"], return_tensors="np")
    assert processor.band_names == ["B4", "B3", "B2"] and normalised["pixel_values"].shape[2] == 3


def test_processor_output_runs_through_the_model():
    from timo_hf import TiMoConfig, TiMoModel

    model = TiMoModel(TiMoConfig(hidden_sizes=[16, 32, 48, 64], num_heads=[2, 2, 4, 4], depths=[1, 1, 1, 1],
                                 num_channels=3)).eval()
    processor = TiMoImageProcessor(normalization="s2_rgb", num_frames=4, temporal_encoding="days")
    batch = processor([_series(t=3, c=4, h=40, w=40)], dates=[DATES[:3]], band_names=["B2", "B3", "B4", "B8"])
    with torch.no_grad():
        out = model(pixel_values=batch["pixel_values"], temporal_positions=batch["temporal_positions"])
    assert out.last_hidden_state.shape[:2] == (1, 4) and torch.isfinite(out.last_hidden_state).all()
