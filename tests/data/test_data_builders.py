"""Every raw-data builder on its synthetic layout: shapes, dtypes, dates, labels, geo-metadata and splits."""

import json

import numpy as np
import pytest
import rasterio

from timo_hf.data import builder_options, get_builder, load_timo_dataset, write_synthetic
from timo_hf.data.synthetic import MTLCC_CLASSES


def _all_examples(dataset_dict):
    return [example for split in dataset_dict.values() for example in split]


def _check_common(example, num_bands, size, dtype):
    pixels = example["pixel_values"]
    assert pixels.dtype == np.dtype(dtype)
    assert pixels.shape[1:] == (num_bands, size, size)
    assert len(example["dates"]) == pixels.shape[0]
    assert example["dates"] == sorted(example["dates"])
    assert len(example["band_names"]) == num_bands
    assert pixels.any()  # real data, not a zero placeholder


def _split_ids(dataset_dict):
    return {split: [example["sample_id"] for example in part] for split, part in dataset_dict.items()}


def test_multisenge(raw_roots, cache_dir):
    ds = load_timo_dataset("MultiSenGE", data_dir=raw_roots["multisenge"], cache_dir=cache_dir)
    examples = _all_examples(ds)
    assert len(examples) == 8
    for example in examples:
        _check_common(example, 10, 32, "uint16")
        assert example["pixel_values"].shape[0] == 3
        assert example["label"].dtype == np.uint8 and example["label"].shape == (32, 32)
        assert "UTM zone 31N" in example["crs"] and len(example["transform"]) == 6
        assert 0 < example["center_lon"] < 10 and 40 < example["center_lat"] < 55
    example = ds["train"][0]
    tile, x, y = example["sample_id"].split("_")
    with rasterio.open(raw_roots["multisenge"] / "ground_reference" / f"{tile}_GR_{x}_{y}.tif") as src:
        raw_label = src.read(1)
    np.testing.assert_array_equal(example["label"][raw_label > 0], raw_label[raw_label > 0] - 1)
    assert (example["label"][raw_label == 0] == 255).all()  # no-data -> ignore, explicitly
    first = f"{tile}_{example['dates'][0].replace('-', '')}_S2_{x}_{y}.tif"
    with rasterio.open(raw_roots["multisenge"] / "s2" / first) as src:
        np.testing.assert_array_equal(example["pixel_values"][0], src.read())
        assert example["transform"] == list(src.transform)[:6]
    # 4 sorted tiles -> blocks of round(4*8/14)=2, round(4*3/14)=1 and the rest
    tiles = {split: sorted({sid[:5] for sid in ids}) for split, ids in _split_ids(ds).items()}
    assert tiles == {"train": ["31TGM", "31TGN"], "validation": ["31UFP"], "test": ["31UFQ"]}


def test_multisenge_official_tile_split_and_band_selection(tmp_path, cache_dir):
    root = write_synthetic("multisenge", tmp_path / "raw", num_tiles=14, patches_per_tile=1, num_dates=2, size=32)
    builder = get_builder("multisenge", root, cache_dir=cache_dir, bands=("B4", "B3", "B2"), split_mode="official")
    splits = {name: [ref.group for ref in refs] for name, refs in builder.assign_splits().items()}
    tiles = sorted(path.stem[:5] for path in (root / "labels").glob("*.json"))
    assert splits == {"train": tiles[:8], "validation": tiles[8:11], "test": tiles[11:]}
    builder.build()
    example = builder.as_dataset("test").with_format("numpy", columns=["pixel_values"], dtype=None)[0]
    assert example["pixel_values"].shape[1] == 3
    full = load_timo_dataset("multisenge", data_dir=root, cache_dir=cache_dir, split="test")[0]
    np.testing.assert_array_equal(example["pixel_values"], full["pixel_values"][:, [2, 1, 0]])


def test_multiearth_tiff_and_netcdf_agree(raw_roots, cache_dir):
    tiff = load_timo_dataset("multiearth", data_dir=raw_roots["multiearth"], cache_dir=cache_dir, source="tiff")
    netcdf = load_timo_dataset("multiearth", data_dir=raw_roots["multiearth"], cache_dir=cache_dir, source="netcdf")
    assert _split_ids(tiff) == _split_ids(netcdf)
    for a, b in zip(_all_examples(tiff), _all_examples(netcdf)):
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
        np.testing.assert_array_equal(a["label"], b["label"])
        assert (a["dates"], a["label_date"], a["center_lon"], a["center_lat"]) == \
               (b["dates"], b["label_date"], b["center_lon"], b["center_lat"])
    examples = _all_examples(tiff)
    assert len(examples) == 10  # 5 locations x 2 monthly masks
    for example in examples:
        _check_common(example, 3, 32, "uint16")
        assert example["band_names"] == ["B4", "B3", "B2"]
        assert example["crs"] is None and example["transform"] is None
        # date matching: every frame lies in the mask's month
        assert all(date[:7] == example["label_date"][:7] for date in example["dates"])
        lon, lat, _ = example["sample_id"].split("_")
        assert (example["center_lon"], example["center_lat"]) == (float(lon), float(lat))
        assert set(np.unique(example["label"])) <= {0, 1}


def test_multiearth_fewer_dates_than_requested_and_per_frame_pairing(raw_roots, cache_dir):
    ds = load_timo_dataset("multiearth", data_dir=raw_roots["multiearth"], cache_dir=cache_dir, split="train",
                           num_frames=5, window_months=1)
    lengths = sorted({len(example["dates"]) for example in ds})
    assert lengths == [2, 4]  # first month: only 2 images exist (< 5 requested); second month: 2 + 2 from before
    per_frame = load_timo_dataset("multiearth", data_dir=raw_roots["multiearth"], cache_dir=cache_dir,
                                  split="train", pairing="per_frame", num_frames=3)
    for example in per_frame:
        assert example["label"].shape == (3, 32, 32) and len(example["dates"]) == 3
        assert "_" in example["sample_id"] and example["sample_id"].count("_") == 1  # one example per location
    with pytest.raises(ValueError, match="pairing"):
        get_builder("multiearth", raw_roots["multiearth"], cache_dir=cache_dir, pairing="weekly")


def test_mtlcc(raw_roots, cache_dir):
    root = raw_roots["mtlcc"]
    ds = load_timo_dataset("mtlcc", data_dir=root, cache_dir=cache_dir)
    for example in _all_examples(ds):
        _check_common(example, 13, 24, "uint16")
        assert example["band_names"][:4] == ["B4", "B3", "B2", "B8"] and example["band_names"][-1] == "B10"
        assert example["label"].max() < len(MTLCC_CLASSES)
    # official tileid files: train_fold0 -> train, test_fold0 -> validation, eval -> test
    expected = {split: sorted((root / "tileids" / f"{name}.tileids").read_text().split())
                for split, name in (("train", "train_fold0"), ("validation", "test_fold0"), ("test", "eval"))}
    assert _split_ids(ds) == expected
    example = ds["train"][0]
    folder = root / "data" / example["sample_id"]
    stamp = example["dates"][1].replace("-", "")
    with rasterio.open(folder / f"{stamp}_10m.tif") as src:
        np.testing.assert_array_equal(example["pixel_values"][1, :4], src.read())
    with rasterio.open(folder / f"{stamp}_20m.tif") as src:  # nearest upsampling of the 20 m grid (official)
        np.testing.assert_array_equal(example["pixel_values"][1, 4:10], src.read().repeat(2, axis=1).repeat(2, axis=2))
    with rasterio.open(folder / "y.tif") as src:
        raw = src.read(1)
    index = {class_id: row for row, (class_id, _) in enumerate(MTLCC_CLASSES)}
    np.testing.assert_array_equal(example["label"], np.vectorize(index.get)(raw))
    limited = load_timo_dataset("mtlcc", data_dir=root, cache_dir=cache_dir, split="train", num_frames=2)
    assert limited[0]["dates"] == example["dates"][:2]  # num_frames keeps the first k chronologically


def test_sen12flood_per_frame_labels_and_splits(raw_roots, cache_dir):
    root = raw_roots["sen12flood"]
    ds = load_timo_dataset("sen12flood", data_dir=root, cache_dir=cache_dir)
    listing = json.loads((root / "S2list.json").read_text())
    for example in _all_examples(ds):
        _check_common(example, 3, 32, "uint16")
        assert example["band_names"] == ["B04", "B03", "B02"]
        entry = listing[example["sample_id"].removeprefix("seq")]
        by_date = {item["date"]: int(item["FLOODING"]) for key, item in entry.items() if key.isdigit()}
        assert example["label"] == [by_date[date] for date in example["dates"]]
        assert "WGS 84" in example["crs"]
    ids = _split_ids(ds)
    assert sorted(sum(ids.values(), [])) == sorted(f"seq{key}" for key in listing)
    assert not set(ids["validation"]) & set(ids["test"])  # sound split: validation != test
    official = get_builder("sen12flood", root, cache_dir=cache_dir, split_mode="official").assign_splits()
    assert [ref.sample_id for ref in official["validation"]] == [ref.sample_id for ref in official["test"]]
    assert len(official["train"]) == len(listing)  # the first 30 sequences (all 6 here) -> train


def test_kurosiwo_frames_labels_and_event_split(raw_roots, cache_dir):
    ds = load_timo_dataset("kurosiwo", data_dir=raw_roots["kurosiwo"], cache_dir=cache_dir)
    for example in _all_examples(ds):
        _check_common(example, 2, 32, "float32")
        assert example["pixel_values"].shape[0] == 3
        assert np.isnan(example["pixel_values"][:, :, -2:]).all()  # no-data kept as stored
        assert set(np.unique(example["label"])) <= {0, 1, 2, 255}
        assert (example["label"][-2:] == 255).all()  # invalid in MK0_MNA -> ignore
        assert "Pseudo-Mercator" in example["crs"]
    events = {split: {sample_id.split("/")[0] for sample_id in ids} for split, ids in _split_ids(ds).items()}
    assert not (events["train"] & events["validation"] or events["train"] & events["test"]
                or events["validation"] & events["test"])
    explicit = get_builder("kurosiwo", raw_roots["kurosiwo"], cache_dir=cache_dir,
                           event_splits={"train": ["1111001"], "validation": ["1111012"], "test": ["1111023"]})
    assert {name: {ref.group for ref in refs} for name, refs in explicit.assign_splits().items()} == \
           {"train": {"1111001"}, "validation": {"1111012"}, "test": {"1111023"}}


def test_millionst_geotiff_resamples_onto_10m_grid(raw_roots, cache_dir):
    root = raw_roots["millionst"]
    ds = load_timo_dataset("millionst", data_dir=root, cache_dir=cache_dir)
    assert list(ds) == ["train"] and len(ds["train"]) == 3
    example = ds["train"][0]
    _check_common(example, 12, 24, "uint16")
    assert example["pixel_values"].shape[0] == 10
    assert json.loads(example["metadata"])["acquisitions"]
    acquisition = sorted((root / example["sample_id"]).iterdir())[0]
    with rasterio.open(acquisition / "B4.tif") as src:  # 10 m band: untouched
        np.testing.assert_array_equal(example["pixel_values"][0, 3], src.read(1))
    with rasterio.open(acquisition / "B5.tif") as src:  # 20 m band: bilinear onto the 10 m grid
        coarse = src.read(1).astype(float)
        assert src.shape == (12, 12)
    fine = example["pixel_values"][0, 4].astype(float)
    assert np.abs(fine.reshape(12, 2, 12, 2).mean(axis=(1, 3)) - coarse).mean() < 0.05 * coarse.mean()
    nearest = load_timo_dataset("millionst", data_dir=root, cache_dir=cache_dir, split="train", resampling="nearest")
    np.testing.assert_array_equal(nearest[0]["pixel_values"][0, 4], coarse.repeat(2, 0).repeat(2, 1))


def test_millionst_npy_csv_layout_is_reordered_chronologically(raw_roots, cache_dir):
    root = raw_roots["millionst_npy"]
    ds = load_timo_dataset("millionst", data_dir=root, cache_dir=cache_dir, split="train")
    example = ds[0]
    _check_common(example, 3, 24, "uint8")
    raw = np.load(root / f"{example['sample_id']}.npy")
    rows = (root / "millionst.csv").read_text().splitlines()[1:]
    stamps = next(row.split(",")[1:] for row in rows if int(row.split(",")[0]) == int(example["sample_id"]))
    order = np.argsort([stamp[:8] for stamp in stamps], kind="stable")
    np.testing.assert_array_equal(example["pixel_values"], raw[order])


def test_image_size_option_resamples_every_sample(raw_roots, cache_dir):
    ds = load_timo_dataset("sen12flood", data_dir=raw_roots["sen12flood"], cache_dir=cache_dir, split="train",
                           image_size=(16, 16))
    assert ds[0]["pixel_values"].shape[-2:] == (16, 16)
    assert ds[0]["transform"][0] == pytest.approx(2 * 0.0001)  # transform describes the resampled grid


def test_clear_errors(raw_roots, tmp_path, cache_dir):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_timo_dataset("not-a-dataset", data_dir=tmp_path)
    with pytest.raises(ValueError, match="data_dir"):
        load_timo_dataset("multisenge")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_timo_dataset("multisenge", data_dir=tmp_path / "missing", cache_dir=cache_dir)
    with pytest.raises(FileNotFoundError, match="no samples"):
        load_timo_dataset("multisenge", data_dir=tmp_path, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="unknown options.*valid options"):
        load_timo_dataset("multisenge", data_dir=raw_roots["multisenge"], cache_dir=cache_dir, colour="red")
    with pytest.raises(ValueError, match="unknown bands"):
        load_timo_dataset("multisenge", data_dir=raw_roots["multisenge"], cache_dir=cache_dir, bands=["B99"])
    assert "sensor" in builder_options("multiearth") and "strict" in builder_options("mtlcc")


def test_official_listdir_splits_are_available_as_an_option(raw_roots, cache_dir):
    kuro = get_builder("kurosiwo", raw_roots["kurosiwo"], cache_dir=cache_dir, split_mode="official").assign_splits()
    assert [len(refs) for refs in kuro.values()] == [6, 2, 2]  # 60/20/20 of the 10 patch folders
    assert len({ref.sample_id for refs in kuro.values() for ref in refs}) == 10
    earth = get_builder("multiearth", raw_roots["multiearth"], cache_dir=cache_dir, split_mode="official")
    splits = earth.assign_splits()
    assert len(splits["train"]) == 10 and not splits["validation"] and not splits["test"]  # first 78 locations
    with pytest.raises(ValueError, match="no official split"):
        get_builder("millionst", raw_roots["millionst"], cache_dir=cache_dir, split_mode="official").assign_splits()


@pytest.mark.parametrize("sensor, bands", [("landsat8", ["SR_B4", "SR_B3", "SR_B2"]), ("sent1", ["VV", "VH"])])
def test_multiearth_other_sensors_parse_band_names(tmp_path, cache_dir, sensor, bands):
    root = write_synthetic("multiearth", tmp_path / "raw", sensor=sensor, num_locations=3, size=16)
    for source in ("tiff", "netcdf"):
        ds = load_timo_dataset("multiearth", data_dir=root, cache_dir=cache_dir, sensor=sensor, source=source,
                               split="train")
        assert ds[0]["band_names"] == bands and ds[0]["pixel_values"].shape[1:] == (len(bands), 16, 16)
