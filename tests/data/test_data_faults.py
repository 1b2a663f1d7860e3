"""Faulty raw samples are skipped with a warning and counted (never replaced by zeros); strict=True raises."""

import json
import shutil

import numpy as np
import pytest

from timo_hf.data import FaultKind, SampleError, SkippedSampleWarning, get_builder, load_timo_dataset
from timo_hf.data.synthetic import write_tif


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _build_expecting_skip(name, root, cache_dir, sample_id, kind, **options):
    """Build with strict=False: one warning naming the sample, one summary entry, the sample absent."""
    with pytest.warns(SkippedSampleWarning, match=sample_id.replace("/", ".")):
        ds, summary = load_timo_dataset(name, data_dir=root, cache_dir=cache_dir, return_summary=True, **options)
    assert [(item.sample_id, item.kind) for item in summary.skipped] == [(sample_id, kind)]
    assert summary.counts_by_kind() == {kind: 1}
    ids = [example["sample_id"] for split in ds.values() for example in split]
    assert sample_id not in ids and len(ids) == sum(summary.num_examples.values())
    for split in ds.values():
        for example in split:
            assert all(frame.any() for frame in example["pixel_values"])  # nothing zero-filled
    with pytest.raises(SampleError) as raised:
        get_builder(name, root, cache_dir=cache_dir + "-strict", strict=True, **options).build()
    assert raised.value.kind == kind and raised.value.sample_id == sample_id
    return ds, summary


def test_corrupt_geotiff(fresh_root, cache_dir):
    root = fresh_root("multisenge")
    meta = json.loads((root / "labels" / "31TGN_257_257.json").read_text())
    _truncate(root / "s2" / meta["corresponding_s2"].split(";")[0])
    _build_expecting_skip("multisenge", root, cache_dir, "31TGN_257_257", FaultKind.CORRUPT_FILE)


def test_file_that_is_not_a_geotiff(fresh_root, cache_dir):
    root = fresh_root("kurosiwo")
    patch = sorted((root / "1111012" / "01").iterdir())[0]
    next(patch.glob("SL1_IVH_*.tif")).write_bytes(b"this is not a tiff")
    _build_expecting_skip("kurosiwo", root, cache_dir, f"1111012/01/{patch.name}", FaultKind.CORRUPT_FILE)


def test_missing_band_file(fresh_root, cache_dir):
    root = fresh_root("sen12flood")
    entry = json.loads((root / "S2list.json").read_text())["3"]
    (root / entry["folder"] / f"{entry['2']['filename']}_B03.tif").unlink()
    _build_expecting_skip("sen12flood", root, cache_dir, "seq3", FaultKind.MISSING_BAND)


def test_missing_band_file_multiearth(fresh_root, cache_dir):
    root = fresh_root("multiearth", write_netcdf=False)
    victim = sorted((root / "sent2").glob("Sentinel2_B3_*_2021_06_03.tiff"))[0]
    lon, lat = victim.name.split("_")[2:4]
    victim.unlink()
    _build_expecting_skip("multiearth", root, cache_dir, f"{lon}_{lat}_2021-06", FaultKind.MISSING_BAND)


def test_missing_timestamps(fresh_root, cache_dir):
    root = fresh_root("kurosiwo")
    patch = sorted((root / "1111023" / "01").iterdir())[1]
    for path in patch.glob("SL2_*.tif"):
        path.unlink()
    _build_expecting_skip("kurosiwo", root, cache_dir, f"1111023/01/{patch.name}", FaultKind.MISSING_TIMESTAMPS)


def test_missing_timestamps_millionst(fresh_root, cache_dir):
    root = fresh_root("millionst", num_locations=2, size=12)
    shutil.rmtree(sorted((root / "000001").iterdir())[4])  # 9 of the 10 acquisitions left
    _build_expecting_skip("millionst", root, cache_dir, "000001", FaultKind.MISSING_TIMESTAMPS)


def test_shape_mismatch_between_dates(fresh_root, cache_dir):
    root = fresh_root("multisenge")
    meta = json.loads((root / "labels" / "31UFP_0_514.json").read_text())
    write_tif(root / "s2" / meta["corresponding_s2"].split(";")[1], np.ones((10, 30, 32), dtype=np.uint16))
    _build_expecting_skip("multisenge", root, cache_dir, "31UFP_0_514", FaultKind.SHAPE_MISMATCH)


def test_missing_label(fresh_root, cache_dir):
    root = fresh_root("mtlcc")
    (root / "data" / "1007" / "y.tif").unlink()
    _build_expecting_skip("mtlcc", root, cache_dir, "1007", FaultKind.MISSING_LABEL)


def test_missing_label_flag(fresh_root, cache_dir):
    root = fresh_root("sen12flood")
    listing = json.loads((root / "S2list.json").read_text())
    del listing["4"]["1"]["FLOODING"]
    (root / "S2list.json").write_text(json.dumps(listing))
    _build_expecting_skip("sen12flood", root, cache_dir, "seq4", FaultKind.MISSING_LABEL)


def test_summary_survives_the_cache_and_streaming_reports_live(fresh_root, cache_dir):
    root = fresh_root("multisenge")
    (root / "ground_reference" / "31TGM_GR_0_0.tif").unlink()
    with pytest.warns(SkippedSampleWarning):
        first = get_builder("multisenge", root, cache_dir=cache_dir).build()
    again = get_builder("multisenge", root, cache_dir=cache_dir).build()  # restored from the Arrow cache
    assert again.to_dict() == first.to_dict() and again.num_skipped == 1
    builder = get_builder("multisenge", root, cache_dir=cache_dir)
    with pytest.warns(SkippedSampleWarning):
        streamed = list(builder.as_streaming_dataset("train"))
    assert len(streamed) == first.num_examples["train"]
    assert [item.sample_id for item in builder.summary.skipped] == ["31TGM_0_0"]


def test_parallel_build_merges_reports(fresh_root, cache_dir):
    root = fresh_root("multisenge")
    (root / "ground_reference" / "31TGN_GR_0_257.tif").unlink()
    summary = get_builder("multisenge", root, cache_dir=cache_dir).build(num_proc=2)
    assert summary.num_skipped == 1 and summary.num_examples == {"train": 3, "validation": 2, "test": 2}
