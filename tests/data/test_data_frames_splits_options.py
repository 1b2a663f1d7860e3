"""Builders: num_frames below min_frames, Kuro Siwo frame choice and official split, the schema probe past faulty
samples, and the checks of builder options."""

import shutil
import warnings

import numpy as np
import pytest

from timo_hf.data import FaultKind, get_builder, load_timo_dataset


def stream(name, root, **options) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(load_timo_dataset(name, data_dir=root, split="train", streaming=True, **options))


def assert_latest_or_first_frames(short: list[dict], full: list[dict], count: int, latest: bool) -> None:
    window = slice(-count, None) if latest else slice(0, count)
    assert [example["sample_id"] for example in short] == [example["sample_id"] for example in full]
    for example, reference in zip(short, full):
        assert example["dates"] == reference["dates"][window]
        np.testing.assert_array_equal(example["pixel_values"], reference["pixel_values"][window])


# ---------------------------------------------------------------------------------------------- num_frames
@pytest.mark.parametrize("layout", ["millionst", "millionst_npy"])
def test_millionst_num_frames_below_min_frames_keeps_the_first_dates(raw_roots, cache_dir, layout):
    root = raw_roots[layout]
    short, summary = load_timo_dataset("millionst", data_dir=root, cache_dir=cache_dir, split="train", num_frames=3,
                                       return_summary=True)
    assert summary.num_skipped == 0 and short.num_rows == 3
    assert_latest_or_first_frames(list(short), stream("millionst", root), 3, latest=False)


def test_min_frames_counts_the_dates_available_before_num_frames(raw_roots):
    with pytest.raises(FileNotFoundError, match="10 dates found, at least 11 required"):
        stream("millionst", raw_roots["millionst_npy"], num_frames=3, min_frames=11)


def test_multiearth_min_frames_counts_the_dates_available_before_num_frames(raw_roots):
    """Every synthetic location has 2 dated images: `min_frames=2` keeps them all with `num_frames=1`, `min_frames=3`
    skips them all, whatever `num_frames` keeps."""
    kept = stream("multiearth", raw_roots["multiearth"], num_frames=1, min_frames=2)
    assert kept and all(len(example["dates"]) == 1 for example in kept)
    with pytest.raises(FileNotFoundError, match="2 dates found, at least 3 required"):
        stream("multiearth", raw_roots["multiearth"], num_frames=1, min_frames=3)


@pytest.mark.parametrize("count", [2, 1])
def test_kurosiwo_num_frames_keeps_the_flood_image_and_the_latest_pre_event_images(raw_roots, count):
    full = stream("kurosiwo", raw_roots["kurosiwo"])
    assert all(len(example["dates"]) == 3 for example in full)
    assert_latest_or_first_frames(stream("kurosiwo", raw_roots["kurosiwo"], num_frames=count), full, count,
                                  latest=True)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_frames=0), "num_frames must be a whole number of dates >= 1"),
        (dict(min_frames=-1), "min_frames must be a whole number of dates >= 1"),
        (dict(num_frames=2.5), "num_frames must be a whole number"),
        (dict(image_size=(0, 32)), r"image_size must be \(height, width\)"),
        (dict(image_size=(32, 32, 3)), r"image_size must be \(height, width\)"),
    ],
    ids=["num_frames-0", "min_frames-negative", "num_frames-float", "image_size-0", "image_size-3d"],
)
def test_invalid_frame_counts_and_sizes_are_refused(raw_roots, options, message):
    with pytest.raises(ValueError, match=message):
        get_builder("sen12flood", raw_roots["sen12flood"], **options)


# ---------------------------------------------------------------------------------------------- option types
def test_an_int_image_size_is_a_square_and_a_single_band_name_is_one_band(raw_roots):
    resized = stream("sen12flood", raw_roots["sen12flood"], image_size=16)[0]
    assert resized["pixel_values"].shape[-2:] == (16, 16)
    red = stream("sen12flood", raw_roots["sen12flood"], bands="B04")[0]
    assert red["band_names"] == ["B04"] and red["pixel_values"].shape[1] == 1


def test_millionst_on_a_wrong_folder_says_which_layout_it_expected(raw_roots):
    with pytest.raises(FileNotFoundError, match=r"expected <location>/<YYYYMMDD...>/<band>.tif under .* found "
                                                r"\['ground_reference', 'labels', 's2'\]"):
        get_builder("millionst", raw_roots["multisenge"])


# ---------------------------------------------------------------------------------------------- schema probe
def add_unlabelled_tiles(root, count: int) -> None:
    """Kuro Siwo's unlabelled tiles (<actid>/00/<xx>/<grid>/: SAR and MK0_MNA, no MK0_MLU), which sort first."""
    event = min(path.name for path in root.iterdir())
    patch = next((root / event / "01").iterdir())
    for index in range(count):
        tile = root / event / "00" / f"{index:02x}" / f"{index:02x}ffff{index:04d}"
        shutil.copytree(patch, tile)
        for label in tile.glob("MK0_MLU_*"):
            label.unlink()


def test_the_schema_probe_passes_over_faulty_samples_that_the_build_skips(fresh_root, cache_dir):
    root = fresh_root("kurosiwo", num_events=2, patches_per_event=3)
    add_unlabelled_tiles(root, 20)
    with pytest.warns(UserWarning, match="no MK0_MLU"):
        dataset, summary = load_timo_dataset("kurosiwo", data_dir=root, cache_dir=cache_dir, return_summary=True)
    assert sum(part.num_rows for part in dataset.values()) == 6
    assert summary.counts_by_kind() == {FaultKind.MISSING_LABEL: 20}


def test_a_dataset_where_no_sample_reads_fails_listing_the_first_faults(fresh_root):
    root = fresh_root("kurosiwo", num_events=2, patches_per_event=3)
    for label in root.rglob("MK0_MLU_*"):
        label.unlink()
    with pytest.raises(FileNotFoundError, match=r"none of the 6 samples .* could be read(.|\n)*"
                                                r"\[missing_label\] sample 1111001/01/"):
        get_builder("kurosiwo", root)


# ---------------------------------------------------------------------------------------------- splits
def test_kurosiwo_official_split_finds_the_patches_of_the_hf_layout(raw_roots, tmp_path):
    source = raw_roots["kurosiwo"]
    root = tmp_path / "hf"
    for patch in sorted(path.parent for path in source.rglob("MK0_MLU_*.tif")):
        event, aoi, grid = patch.relative_to(source).parts
        shutil.copytree(patch, root / "data" / event / aoi / "00" / grid)
    splits = get_builder("kurosiwo", root, split_mode="official").assign_splits()
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [6, 2, 2]
    assert len({ref.sample_id for refs in splits.values() for ref in refs}) == 10


def test_a_split_rule_that_puts_no_sample_in_any_split_raises(raw_roots):
    builder = get_builder("kurosiwo", raw_roots["kurosiwo"], event_splits={"train": ["999"]})
    with pytest.raises(ValueError, match="puts none of the 10 samples found .* in a split; check the split options"):
        builder.assign_splits()
