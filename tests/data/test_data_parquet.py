"""Parquet export (Hub layout + card), round trip map-style and streaming, DDP sharding, push-to-Hub simulation."""

import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from timo_hf.data import export_to_parquet, load_timo_dataset, push_to_hub


def _assert_same_examples(expected, actual):
    expected, actual = list(expected), list(actual)
    assert [e["sample_id"] for e in expected] == [a["sample_id"] for a in actual]
    for e, a in zip(expected, actual):
        assert set(e) == set(a)
        for key in e:
            if isinstance(e[key], np.ndarray):
                assert a[key].dtype == e[key].dtype and a[key].shape == e[key].shape
                np.testing.assert_array_equal(a[key], e[key])
            else:
                assert a[key] == e[key], key


@pytest.fixture(scope="module")
def built(raw_roots, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return load_timo_dataset("kurosiwo", data_dir=raw_roots["kurosiwo"], cache_dir=cache)


def test_export_writes_the_hub_layout_and_card(built, tmp_path):
    out = export_to_parquet(built, tmp_path / "export", max_shard_size="100KB")
    files = sorted(path.name for path in (out / "data").iterdir())
    assert "train-00000-of-00002.parquet" in files and "test-00000-of-00001.parquet" in files
    assert len([name for name in files if name.startswith("train-")]) == 2  # 6 x 24 KB samples > 100 KB
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["configs"][0]["data_files"][0] == {"split": "train", "path": "data/train-*"}
    features = {item["name"]: item for item in meta["dataset_info"]["features"]}
    assert features["pixel_values"]["dtype"]["array4_d"] == {"shape": [None, 2, 32, 32], "dtype": "float32"}
    assert {split["name"]: split["num_examples"] for split in meta["dataset_info"]["splits"]} == \
           {name: len(part) for name, part in built.items()}
    assert "Kuro Siwo" in card and "Citation" in card and "bountos2024kurosiwo" in card
    table = pq.read_table(out / "data" / "test-00000-of-00001.parquet")
    assert b"huggingface" in table.schema.metadata  # datasets features travel in the schema metadata


def test_round_trip_map_style_and_streaming(built, tmp_path):
    out = export_to_parquet(built, tmp_path / "export", max_shard_size="100KB")
    loaded = load_timo_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert list(loaded) == list(built)
    for split in built:
        assert loaded[split].features == built[split].features
        _assert_same_examples(built[split], loaded[split])
    streamed = load_timo_dataset(str(out), split="train", streaming=True)
    _assert_same_examples(built["train"], streamed)


def test_streaming_raw_equals_map_style_and_splits_by_node(raw_roots, built):
    streamed = load_timo_dataset("kurosiwo", data_dir=raw_roots["kurosiwo"], split="train", streaming=True)
    _assert_same_examples(built["train"], streamed)
    parts = [list(load_timo_dataset("kurosiwo", data_dir=raw_roots["kurosiwo"], split="train", streaming=True,
                                    rank=rank, world_size=2)) for rank in range(2)]
    ids = [[example["sample_id"] for example in part] for part in parts]
    assert ids[0] and ids[1] and not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(example["sample_id"] for example in built["train"])


def test_parquet_streaming_splits_by_node(built, tmp_path):
    out = export_to_parquet(built, tmp_path / "export", max_shard_size="100KB")
    parts = [[example["sample_id"] for example in load_timo_dataset(str(out), split="train", streaming=True,
                                                                     rank=rank, world_size=2)] for rank in range(2)]
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(example["sample_id"] for example in built["train"])


class _FakeHubApi:
    """Offline stand-in for huggingface_hub.HfApi: a "repo" is a folder under a local fake hub."""

    hub: Path

    def __init__(self, token=None):
        self.calls = []

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        assert repo_type == "dataset"
        (self.hub / repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, repo_id, repo_type, folder_path, allow_patterns, delete_patterns, **kwargs):
        repo = self.hub / repo_id
        for pattern in delete_patterns:
            for stale in repo.glob(pattern):
                stale.unlink()
        for pattern in allow_patterns:
            for path in Path(folder_path).glob(pattern):
                target = repo / path.relative_to(folder_path)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
        return mock.Mock(commit_url=f"https://huggingface.co/datasets/{repo_id}/commit/0")


def test_push_to_hub_offline_simulation(built, tmp_path):
    """OFFLINE SIMULATION: HfApi is replaced by a fake that writes the upload into a local folder."""
    _FakeHubApi.hub = tmp_path / "hub"
    with mock.patch("timo_hf.data.parquet.HfApi", _FakeHubApi):
        url = push_to_hub(built, "user/kurosiwo-tiny", max_shard_size="100KB")
        assert url.endswith("/commit/0")
        # a second push with fewer shards removes the stale shard of the first one
        push_to_hub(export_to_parquet(built, tmp_path / "export"), "user/kurosiwo-tiny")
    repo = tmp_path / "hub" / "user" / "kurosiwo-tiny"
    assert sorted(path.name for path in (repo / "data").iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"]
    loaded = load_timo_dataset(str(repo), split="validation", cache_dir=str(tmp_path / "cache"))
    _assert_same_examples(built["validation"], loaded)
    with pytest.raises(FileNotFoundError, match="export_to_parquet folder"):
        push_to_hub(tmp_path, "user/nothing")
