"""Dataset names -> builder classes, and construction of a builder with validated options."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from importlib import metadata
from pathlib import Path

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


def _file_stats(folder: str, prefix: str, skip: str | None):
    """'relative path, size, mtime' of every file under `folder` (symlinked folders are not entered)."""
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda entry: entry.name):
            if entry.path == skip:
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from _file_stats(entry.path, f"{prefix}{entry.name}/", skip)
            else:
                stat = _stat(entry)
                yield f"{prefix}{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n"


def _stat(entry: os.DirEntry) -> os.stat_result:
    """The entry's stat, or its link's own for a broken symlink (which must not stop a load)."""
    try:
        return entry.stat()
    except OSError:
        return entry.stat(follow_symlinks=False)


def raw_fingerprint(data_dir, skip=None) -> str:
    """A short hash of the relative path, size and modification time of every file under `data_dir` (not under
    `skip`, e.g. a cache kept inside it): adding, removing, replacing or rewriting a file changes it. Costs one
    stat per file, about a second per 100,000 files."""
    digest = hashlib.sha256()
    skip = os.path.abspath(skip) if skip is not None else None
    for line in _file_stats(os.path.abspath(data_dir), "", skip):
        digest.update(line.encode())
    return digest.hexdigest()[:16]


def get_builder(name: str, data_dir, *, cache_dir: str | None = None, fingerprint: bool = True,
                **options) -> TiMoRawBuilder:
    """The builder of dataset `name` for the raw download in `data_dir` (see each builder's docstring).

    With `fingerprint` (default), the Arrow cache of a build is keyed by :func:`raw_fingerprint` of `data_dir` too,
    so a build after raw files changed does not reuse the old one; pass False where no cache is read (streaming).
    """
    key = canonical_name(name)
    if key is None:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {sorted(BUILDERS)}")
    if data_dir is None:
        raise ValueError(f"{name}: pass data_dir=<folder with the raw download>")
    unknown = sorted(set(options) - set(builder_options(key)))
    if unknown:
        raise ValueError(f"{name}: unknown options {unknown}; valid options: {builder_options(key)}")
    cache_key = _cache_hash()
    if fingerprint and Path(data_dir).is_dir():  # a missing folder is reported by the builder
        cache_key += "-" + raw_fingerprint(data_dir, skip=cache_dir)
    return BUILDERS[key](data_dir=str(data_dir), cache_dir=cache_dir, hash=cache_key, **options)
