"""Export built datasets to the Hub's Parquet layout, push that folder to the Hub, and read it back.

Layout written by :func:`export_to_parquet` (the same one ``Dataset.push_to_hub`` writes)::

    <output_dir>/data/<split>-00000-of-0000N.parquet   (shards of at most `max_shard_size` bytes of Arrow data)
    <output_dir>/README.md                             dataset card: YAML with dataset_info (features) and configs

Parquet files are written with ``pyarrow.parquet.write_table`` (``Dataset.to_parquet(compression=...)`` fails in
datasets 5.2); the Arrow schema metadata keeps the datasets features, so ``Array4D`` dtypes survive. Row groups
are sized to about `row_group_bytes` so streaming reads a few samples at a time. A split without rows (e.g. every
sample skipped as faulty) is left out with a warning: datasets 5 cannot load an empty split from Parquet (a 0-row
shard breaks the whole folder; a shard without row groups loads when streaming, but map-style loading refuses
the split).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData, HfApi


def _as_dict(dataset) -> datasets.DatasetDict:
    if isinstance(dataset, datasets.DatasetDict):
        return dataset
    if isinstance(dataset, datasets.Dataset):
        return datasets.DatasetDict({str(dataset.split or "train"): dataset})
    raise TypeError(f"export_to_parquet needs a datasets.Dataset or DatasetDict, got {type(dataset).__name__}")


def _non_empty(splits: datasets.DatasetDict) -> datasets.DatasetDict:
    """The splits that have rows; warns about the ones left out, raises when none is left."""
    empty = [split for split, part in splits.items() if part.num_rows == 0]
    if len(empty) == len(splits):
        raise ValueError(f"export_to_parquet: every split ({empty}) is empty; there is nothing to export")
    if empty:
        warnings.warn(f"export_to_parquet: splits {empty} have no rows and are left out of the export (datasets "
                      "cannot load an empty Parquet split)", stacklevel=3)
    return datasets.DatasetDict({split: part for split, part in splits.items() if split not in empty})


def _write_split(dataset: datasets.Dataset, folder: Path, split: str, max_shard_size: int, row_group_bytes: int,
                 compression: str) -> list[Path]:
    dataset = dataset.with_format(None)
    if dataset._indices is not None:  # a select/shuffle view: materialise it in row order
        dataset = dataset.flatten_indices()
    table = dataset.data.table
    num_shards = max(1, math.ceil(table.nbytes / max_shard_size))
    bytes_per_row = max(1, table.nbytes // max(1, table.num_rows))
    rows_per_group = max(1, row_group_bytes // bytes_per_row)
    bounds = [round(i * table.num_rows / num_shards) for i in range(num_shards + 1)]
    paths = []
    for index in range(num_shards):
        path = folder / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
        pq.write_table(table.slice(bounds[index], bounds[index + 1] - bounds[index]), path,
                       compression=compression, row_group_size=rows_per_group)
        paths.append(path)
    return paths


def _card(dataset: datasets.DatasetDict, title: str, files: list[Path]) -> DatasetCard:
    first = next(iter(dataset.values()))
    info = first.info.copy()
    info.splits = datasets.SplitDict()
    for split, part in dataset.items():
        info.splits.add(datasets.SplitInfo(name=split, num_examples=part.num_rows, num_bytes=part.data.nbytes))
    info.dataset_size = sum(part.data.nbytes for part in dataset.values())
    info.download_size = sum(path.stat().st_size for path in files)
    card_data = DatasetCardData()
    datasets.info.DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    MetadataConfigs({"default": {"data_files": [{"split": split, "path": f"data/{split}-*"} for split in dataset]}}
                    ).to_dataset_card_data(card_data)
    if info.license:
        card_data.license = "other" if " " in info.license else info.license.lower()
    columns = "\n".join(f"- `{name}`: {feature}" for name, feature in info.features.items())
    body = [f"# {title}", "", info.description or "", "",
            "Exported with `timo_hf.data.export_to_parquet`; load it with",
            "`timo_hf.data.load_timo_dataset(<this folder or repo id>)` or `datasets.load_dataset(...)`.", "",
            "## Columns", "", columns, ""]
    if info.homepage:
        body += ["## Source", "", info.homepage, ""]
    if info.license:
        body += ["## Licence", "", info.license, ""]
    if info.citation:
        body += ["## Citation", "", "```bibtex", info.citation, "```", ""]
    return DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body))


def export_to_parquet(dataset, output_dir, *, max_shard_size: int | str = "500MB", row_group_bytes: int = 64 << 20,
                      compression: str = "zstd", title: str | None = None) -> Path:
    """Write `dataset` (Dataset or DatasetDict) as a Hub-ready Parquet folder; returns `output_dir`. Splits without
    rows are left out with a warning (datasets cannot load them back)."""
    splits = _non_empty(_as_dict(dataset))
    output_dir = Path(output_dir)
    (output_dir / "data").mkdir(parents=True, exist_ok=True)
    for stale in (output_dir / "data").glob("*.parquet"):
        stale.unlink()
    shard_bytes = datasets.utils.py_utils.convert_file_size_to_int(max_shard_size)
    files = [path for split, part in splits.items()
             for path in _write_split(part, output_dir / "data", split, shard_bytes, row_group_bytes, compression)]
    name = title or next(iter(splits.values())).info.dataset_name or output_dir.name
    _card(splits, name, files).save(output_dir / "README.md")
    return output_dir


def is_export_folder(path) -> bool:
    """Whether `path` is a folder laid out as :func:`export_to_parquet` writes it (README.md + data/*.parquet)."""
    folder = Path(path)
    return (folder / "README.md").is_file() and any((folder / "data").glob("*.parquet"))


def push_to_hub(dataset_or_folder, repo_id: str, *, token: str | None = None, private: bool | None = None,
                revision: str | None = None, commit_message: str = "Upload dataset (timo_hf export)",
                **export_kwargs) -> str:
    """Upload an exported folder (or export `dataset_or_folder` first) to the dataset repo `repo_id`.

    Shards of an earlier upload that the new export does not contain are deleted in the same commit.
    Returns the commit URL.
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(dataset_or_folder) if isinstance(dataset_or_folder, (str, Path)) else \
            export_to_parquet(dataset_or_folder, tmp, **export_kwargs)
        if not is_export_folder(folder):
            raise FileNotFoundError(f"{folder} is not an export_to_parquet folder (README.md + data/*.parquet)")
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder, revision=revision,
                                   commit_message=commit_message, allow_patterns=["README.md", "data/*.parquet"],
                                   delete_patterns=["data/*.parquet"])
        return str(getattr(commit, "commit_url", commit))


def load_exported(path_or_repo_id: str, *, split: str | None = None, streaming: bool = False, **load_kwargs):
    """Read an export folder or Hub dataset repo with ``datasets.load_dataset`` (map-style or streaming)."""
    return datasets.load_dataset(str(path_or_repo_id), split=split, streaming=streaming, **load_kwargs)
