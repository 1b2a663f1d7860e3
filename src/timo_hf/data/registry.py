"""Dataset names -> builder classes, and construction of a builder with validated options."""

from __future__ import annotations

import dataclasses
import re
from importlib import metadata

from .base import TiMoRawBuilder
from .kurosiwo import KuroSiwo
from .millionst import MillionST
from .mtlcc import MTLCC
from .multiearth import MultiEarth
from .multisenge import MultiSenGE
from .sen12flood import Sen12Flood


BUILDERS: dict[str, type[TiMoRawBuilder]] = {
    "millionst": MillionST,
    "multiearth": MultiEarth,
    "multisenge": MultiSenGE,
    "mtlcc": MTLCC,
    "sen12flood": Sen12Flood,
    "kurosiwo": KuroSiwo,
}
_ALIASES = {"multiearthdeforestation": "multiearth", "multiearthdeforest": "multiearth", "sen12floods": "sen12flood"}
_BASE_FIELDS = {"name", "version", "data_dir", "data_files", "description"}


def canonical_name(name: str) -> str | None:
    """'MultiSenGE', 'kuro_siwo', 'SEN12-FLOOD' -> registry key; None when the name is not a known dataset."""
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    key = _ALIASES.get(key, key)
    return key if key in BUILDERS else None


def builder_options(name: str) -> list[str]:
    """The options `get_builder` accepts for dataset `name`."""
    config_class = BUILDERS[canonical_name(name)].BUILDER_CONFIG_CLASS
    return sorted(field.name for field in dataclasses.fields(config_class) if field.name not in _BASE_FIELDS)


def _cache_hash() -> str:
    try:
        return "timo-hf-" + metadata.version("timo-hf")
    except metadata.PackageNotFoundError:
        return "timo-hf-dev"


def get_builder(name: str, data_dir, *, cache_dir: str | None = None, **options) -> TiMoRawBuilder:
    """The builder of dataset `name` for the raw download in `data_dir` (see each builder's docstring)."""
    key = canonical_name(name)
    if key is None:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {sorted(BUILDERS)}")
    if data_dir is None:
        raise ValueError(f"{name}: pass data_dir=<folder with the raw download>")
    unknown = sorted(set(options) - set(builder_options(key)))
    if unknown:
        raise ValueError(f"{name}: unknown options {unknown}; valid options: {builder_options(key)}")
    return BUILDERS[key](data_dir=str(data_dir), cache_dir=cache_dir, hash=_cache_hash(), **options)
