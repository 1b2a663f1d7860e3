"""Shared test fixtures: tiny configurations and access to the official golden outputs in ../shared."""

import os
from pathlib import Path

import pytest
import torch

from timo_hf import TiMoConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def load_golden(name: str) -> dict:
    """Load `../shared/golden/<name>`, skipping the test where the clone has no ../shared (users' clones)."""
    path = SHARED_GOLDEN / name
    if not path.is_file():
        pytest.skip(f"official golden file {path} not available (only CI and developers have ../shared)")
    return torch.load(path, weights_only=True)


def config_from_official(official: dict, **fields) -> TiMoConfig:
    """TiMoConfig of an official backbone description (`embed_dims`, `sa_num_heads`, `depths`, `local`, ...)
    as stored in the golden files; `local` codes are 0 MHSA, 1 STGA, 2 D-STGA."""
    return TiMoConfig(
        hidden_sizes=official["embed_dims"],
        num_heads=official["sa_num_heads"],
        depths=official["depths"],
        attention_types=[{0: "mhsa", 1: "stga", 2: "dstga"}[int(code)] for code in official["local"]],
        mlp_ratio=official["mlp_ratios"][0],
        qkv_bias=official["qkv_bias"],
        **fields,
    )


@pytest.fixture
def tiny_config_kwargs() -> dict:
    """Smallest configuration that exercises all three attention types."""
    return dict(
        hidden_sizes=[16, 32, 48, 64],
        num_heads=[2, 2, 4, 4],
        depths=[1, 1, 1, 1],
        attention_types=["dstga", "stga", "mhsa", "mhsa"],
    )
