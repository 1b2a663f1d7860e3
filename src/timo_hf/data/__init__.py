"""Raw-data builders, Parquet export and streaming for MillionST and the TiMo benchmark datasets.

Quick start::

    from timo_hf.data import load_timo_dataset, export_to_parquet

    ds = load_timo_dataset("multisenge", data_dir="/data/MultiSenGE")          # DatasetDict, raw GeoTIFFs -> Arrow
    train = load_timo_dataset("multisenge", data_dir="/data/MultiSenGE", split="train", streaming=True)
    export_to_parquet(ds, "multisenge-parquet")                                  # Hub layout + dataset card
    again = load_timo_dataset("multisenge-parquet", split="train")              # identical arrays and metadata

Each builder's docstring (``timo_hf.data.MultiSenGE`` etc.) states source, raw layout, bands, classes, split
rule, licence and citation. ``timo_hf.data.synthetic`` writes tiny copies of every raw layout.
"""

import importlib

from .base import RawSample, SampleRef, TiMoBuilderConfig, TiMoRawBuilder
from .faults import BuildSummary, FaultKind, SampleError, SkippedSample, SkippedSampleWarning
from .formatting import with_native_format
from .kurosiwo import KuroSiwo
from .loading import load_timo_dataset
from .millionst import MillionST
from .mtlcc import MTLCC
from .multiearth import MultiEarth
from .multisenge import MultiSenGE
from .parquet import export_to_parquet, load_exported, push_to_hub
from .registry import BUILDERS, builder_options, canonical_name, get_builder
from .sen12flood import Sen12Flood


# Modules that also run as `python -m timo_hf.data.<module>` are imported on first use, not here (runpy warns when
# such a module is already imported by its package).
_LAZY = {"compute_band_statistics": ".stats", "write_synthetic": ".synthetic"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUILDERS",
    "BuildSummary",
    "FaultKind",
    "KuroSiwo",
    "MTLCC",
    "MillionST",
    "MultiEarth",
    "MultiSenGE",
    "RawSample",
    "SampleError",
    "SampleRef",
    "Sen12Flood",
    "SkippedSample",
    "SkippedSampleWarning",
    "TiMoBuilderConfig",
    "TiMoRawBuilder",
    "builder_options",
    "canonical_name",
    "compute_band_statistics",
    "export_to_parquet",
    "get_builder",
    "load_exported",
    "load_timo_dataset",
    "push_to_hub",
    "with_native_format",
    "write_synthetic",
]
