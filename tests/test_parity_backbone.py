"""The converted official backbone reproduces the authors' code (../shared/golden/timo_official_small.pt)."""

import pytest
import torch

from timo_hf import TiMoConfig, convert_original_checkpoint

from .conftest import config_from_official, load_golden


@pytest.fixture(scope="module")
def golden():
    return load_golden("timo_official_small.pt")


def config_of(golden) -> TiMoConfig:
    return config_from_official(golden["config"], num_channels=golden["config"]["in_chans"])


def max_errors(model, pixel_values, expected):
    with torch.no_grad():
        stages = model.compute_feature_maps(pixel_values)[1:]
    assert [tuple(s.shape) for s in stages] == [tuple(e.shape) for e in expected]
    return [(s - e).abs().max().item() for s, e in zip(stages, expected)]


def test_conversion_reports_the_dropped_head(golden):
    model, report = convert_original_checkpoint(golden["state_dict"], config_of(golden), return_report=True)
    assert set(report.dropped) == {"head.weight", "head.bias"}
    assert len(report.renamed) == len(golden["state_dict"]) - 2
    assert not model.training


@pytest.mark.parametrize(
    "input_key, output_key", [("input", "outputs"), ("input_T4", "outputs_T4")], ids=["T3", "T4-lower-median"]
)
def test_eval_fp32_stage_outputs(golden, input_key, output_key):
    model = convert_original_checkpoint(golden["state_dict"], config_of(golden))
    assert max(max_errors(model, golden[input_key], golden[output_key])) <= 1e-5


def test_eval_fp64_stage_outputs(golden):
    model = convert_original_checkpoint(golden["state_dict"], config_of(golden)).double()
    assert max(max_errors(model, golden["input"].double(), golden["outputs_fp64"])) <= 1e-10


def test_train_mode_uses_batch_statistics(golden):
    model = convert_original_checkpoint(golden["state_dict"], config_of(golden)).train()
    assert max(max_errors(model, golden["input"], golden["outputs_train_mode"])) <= 1e-5


def test_official_initialisation_outputs(golden):
    model = convert_original_checkpoint(golden["state_dict_official_init"], config_of(golden))
    assert max(max_errors(model, golden["input"], golden["outputs_default_init"])) <= 1e-5
