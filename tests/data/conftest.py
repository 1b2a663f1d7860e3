"""Fixtures for the data tests: tiny raw copies of every layout, written by timo_hf.data.synthetic."""

import os
from pathlib import Path

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from timo_hf.data import write_synthetic  # noqa: E402


# Small but complete: several groups per split, a few dates, 32x32 pixels (24 where 10/20/60 m grids must nest).
SIZES = {
    "multisenge": dict(num_tiles=4, patches_per_tile=2, num_dates=3, size=32),
    "multiearth": dict(num_locations=5, images_per_month=2, size=32),
    "mtlcc": dict(num_tiles=6, num_dates=3, size=24),
    "sen12flood": dict(num_sequences=6, num_frames=3, size=32),
    "kurosiwo": dict(num_events=5, patches_per_event=2, size=32),
    "millionst": dict(num_locations=3, num_timestamps=10, size=24),
}


@pytest.fixture(scope="session")
def raw_roots(tmp_path_factory) -> dict[str, Path]:
    """One read-only synthetic raw download per dataset (shared by the tests that do not modify files)."""
    base = tmp_path_factory.mktemp("raw")
    roots = {name: write_synthetic(name, base / name, **kwargs) for name, kwargs in SIZES.items()}
    roots["millionst_npy"] = write_synthetic("millionst", base / "millionst_npy", layout="npy",
                                             **SIZES["millionst"])
    return roots


@pytest.fixture
def fresh_root(tmp_path):
    """Write a private raw copy of one dataset (for tests that break files)."""

    def make(name: str, **overrides) -> Path:
        kwargs = {**SIZES[name.split("_")[0]], **overrides}
        return write_synthetic(name.split("_")[0], tmp_path / "raw" / name, **kwargs)

    return make


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "cache")
