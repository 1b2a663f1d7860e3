"""Parquet export with an empty split, export folders named like a dataset, and the raw-file key of the cache."""

import warnings
from pathlib import Path

import pytest

from timo_hf.data import export_to_parquet, get_builder, load_timo_dataset


def build(name, root, cache_dir, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_timo_dataset(name, data_dir=root, cache_dir=cache_dir, return_summary=True, **options)


def rows(dataset) -> dict[str, int]:
    return {split: sum(1 for _ in part) for split, part in dataset.items()}


def test_an_empty_split_is_left_out_of_the_export_and_the_rest_loads(fresh_root, cache_dir, tmp_path):
    root = fresh_root("multisenge")
    test_tiles = {ref.group for ref in get_builder("multisenge", root).assign_splits()["test"]}
    for tile in test_tiles:  # every test sample loses its label: the build skips them all
        for label in (root / "ground_reference").glob(f"{tile}_*"):
            label.unlink()
    dataset, summary = build("multisenge", root, cache_dir)
    assert dataset["test"].num_rows == 0 and summary.num_skipped > 0
    with pytest.warns(UserWarning, match=r"splits \['test'\] have no rows and are left out"):
        folder = export_to_parquet(dataset, tmp_path / "export")
    assert not list((folder / "data").glob("test-*"))
    expected = {"train": dataset["train"].num_rows, "validation": dataset["validation"].num_rows}
    assert rows(load_timo_dataset(str(folder), cache_dir=cache_dir)) == expected
    assert rows(load_timo_dataset(str(folder), streaming=True)) == expected
    with pytest.raises(ValueError, match="every split .* is empty"):
        export_to_parquet(dataset["test"], tmp_path / "nothing")


def test_an_export_folder_named_like_a_dataset_loads_by_its_path(raw_roots, cache_dir, tmp_path, monkeypatch):
    dataset, _ = build("sen12flood", raw_roots["sen12flood"], cache_dir)
    monkeypatch.chdir(tmp_path)
    export_to_parquet(dataset, "sen12flood")
    expected = {split: part.num_rows for split, part in dataset.items()}
    for name in ("sen12flood", "./sen12flood"):
        assert rows(load_timo_dataset(name, cache_dir=cache_dir)) == expected
    raw, _ = build("sen12flood", raw_roots["sen12flood"], cache_dir)  # data_dir: the raw build, as before
    assert rows(raw) == expected


def test_the_cache_is_rebuilt_when_a_raw_file_changes(fresh_root, tmp_path):
    root = fresh_root("multisenge")
    cache_dir = str(root / ".cache")  # a cache inside the raw folder must not change the key
    label = next((root / "ground_reference").glob("*.tif"))
    saved = label.read_bytes()
    label.unlink()
    broken, summary = build("multisenge", root, cache_dir)
    assert summary.num_skipped == 1
    arrow_files = sorted(Path(cache_dir).rglob("*.arrow"))
    build("multisenge", root, cache_dir)  # nothing changed: the cache is reused
    assert sorted(Path(cache_dir).rglob("*.arrow")) == arrow_files
    label.write_bytes(saved)  # the user repairs the file the summary named
    repaired, summary = build("multisenge", root, cache_dir)
    assert summary.num_skipped == 0
    assert sum(rows(repaired).values()) == sum(rows(broken).values()) + 1
