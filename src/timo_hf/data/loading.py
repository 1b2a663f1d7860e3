"""`load_timo_dataset`: one entry point for raw downloads, exported Parquet folders and Hub dataset repos."""

from __future__ import annotations

from pathlib import Path

from datasets.distributed import split_dataset_by_node

from .faults import BuildSummary
from .formatting import with_native_format
from .parquet import is_export_folder, load_exported
from .registry import BUILDERS, canonical_name, get_builder


def _looks_like_hub_id(name: str) -> bool:
    parts = str(name).split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def _by_node(dataset, rank: int, world_size: int):
    if hasattr(dataset, "keys"):  # DatasetDict / IterableDatasetDict
        return type(dataset)({split: split_dataset_by_node(part, rank, world_size) for split, part in dataset.items()})
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


def load_timo_dataset(
    name: str,
    data_dir: str | Path | None = None,
    split: str | None = None,
    streaming: bool = False,
    *,
    cache_dir: str | None = None,
    num_proc: int | None = None,
    download_mode: str | None = None,
    format: str | None = "numpy",
    rank: int | None = None,
    world_size: int | None = None,
    return_summary: bool = False,
    **options,
):
    """Load a TiMo dataset as a ``datasets.Dataset`` (``split`` given), a ``DatasetDict``, or their streaming versions.

    * ``name`` a dataset name (``"multiearth"``, ``"multisenge"``, ``"mtlcc"``, ``"sen12flood"``, ``"kurosiwo"``,
      ``"millionst"``; case and punctuation ignored) with ``data_dir`` = the raw download: the package's builder
      reads it (``**options`` are the builder's options, see ``timo_hf.data.builder_options(name)``). Map-style
      builds an Arrow cache (``cache_dir``, ``num_proc`` workers), rebuilt when a raw file changed (it is keyed by
      the path, size and time of every file under ``data_dir``); ``streaming=True`` reads the raw files lazily.
    * ``name`` a folder written by :func:`export_to_parquet`, or a Hub dataset repo id: read with
      ``datasets.load_dataset`` (``**options`` are passed to it, e.g. ``revision``). An export folder whose path is
      also a dataset name (``"sen12flood"`` in the working directory) is read as the export when no ``data_dir`` is
      given.

    ``format="numpy"`` returns array columns as numpy arrays in their stored dtype and the other columns as Python
    objects (see ``timo_hf.data.formatting``); ``format=None`` leaves datasets' default (Python lists).
    ``rank``/``world_size`` apply ``datasets.distributed.split_dataset_by_node`` (for DDP, typically streaming).
    ``return_summary=True`` returns ``(dataset, BuildSummary)``: what a raw build skipped and why (None for exports;
    with ``streaming=True`` the summary fills while the dataset is iterated in this process).
    """
    summary: BuildSummary | None = None
    key = canonical_name(name)
    # A local export folder named like a dataset ("./sen12flood") is the export, unless data_dir asks for a raw build
    if key is not None and not (data_dir is None and is_export_folder(name)):
        builder = get_builder(key, data_dir, cache_dir=cache_dir, fingerprint=not streaming, **options)
        if streaming:
            dataset = builder.as_streaming_dataset(split=split)
        else:
            builder.build(num_proc=num_proc, download_mode=download_mode)
            dataset = builder.as_dataset(split=split)
        summary = builder.summary
    elif Path(name).is_dir() or _looks_like_hub_id(name):
        if data_dir is not None:
            raise ValueError(f"data_dir is only for raw downloads of {sorted(BUILDERS)}; {name!r} is an export/repo")
        dataset = load_exported(str(name), split=split, streaming=streaming, cache_dir=cache_dir, **options)
    else:
        raise ValueError(f"unknown dataset {name!r}: not one of {sorted(BUILDERS)}, not an existing export folder "
                         "and not a Hub repo id ('owner/name')")
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size (or neither)")
    if world_size is not None:
        dataset = _by_node(dataset, rank, world_size)
    if format == "numpy":
        dataset = with_native_format(dataset)
    elif format is not None:
        dataset = dataset.with_format(format)
    return (dataset, summary) if return_summary else dataset
