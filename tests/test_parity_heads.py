"""Converted official heads reproduce the authors' code (../shared/golden/timo_official_heads_small.pt), and the
conversion maps the official Base checkpoints' key names and shapes (../shared/spec/official-keys/)."""

import re

import pytest
import torch

from timo_hf import TiMoConfig, convert_original_checkpoint
from timo_hf.convert_original import TASKS, ConversionReport

from .conftest import SHARED_GOLDEN, config_from_official, load_golden


OFFICIAL_KEYS = SHARED_GOLDEN.parent / "spec" / "official-keys"


@pytest.fixture(scope="module")
def golden():
    return load_golden("timo_official_heads_small.pt")


def segmentation_config(golden, fusion: str) -> TiMoConfig:
    seg = golden["seg"]
    return config_from_official(
        seg["backbone_config"], num_channels=seg["in_chans"], num_labels=seg["classes"], temporal_fusion=fusion
    )


def classification_config(golden, pooling: str) -> TiMoConfig:
    official = golden["cls"]["config"]
    return config_from_official(
        official,
        num_channels=official["in_chans"],
        num_labels=official["num_classes"],
        classifier_pooling=pooling,
    )


@pytest.mark.parametrize("fusion, key", [("max", "logits_MultiSenGE"), ("none", "logits_MultiEarthDeforest")])
def test_segmentation_logits_match_the_official_framework(golden, fusion, key):
    seg = golden["seg"]
    model, report = convert_original_checkpoint(
        seg["state_dict"], segmentation_config(golden, fusion), task="segmentation", return_report=True
    )
    assert not model.training
    with torch.no_grad():
        logits = model(seg["input"]).logits
    expected = seg[key]
    if fusion == "none":  # official per-frame logits are [B*T, K, H, W], frame-major
        logits = logits.flatten(0, 1)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-4
    assert report.dropped.keys() == {"encoder.head.weight", "encoder.head.bias"}
    assert len(report.renamed) == len(seg["state_dict"]) - 2


@pytest.mark.parametrize("pooling, key", [("mean", "logits_returntp_False"), ("per_frame", "logits_returntp_True")])
def test_classifier_logits_match_the_official_classifier(golden, pooling, key):
    cls = golden["cls"]
    model, report = convert_original_checkpoint(
        cls["state_dict"], classification_config(golden, pooling), task="classification", return_report=True
    )
    with torch.no_grad():
        outputs = model(cls["input"], output_hidden_states=True)
    expected = cls[key]
    logits = outputs.logits.flatten(0, 1) if pooling == "per_frame" else outputs.logits
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-5
    last_stage = outputs.hidden_states[-1].flatten(0, 1)
    assert (last_stage - cls["forward_features_last"]).abs().max().item() <= 1e-5


def test_classification_conversion_drops_only_the_unused_offset_branches(golden):
    """local [1, 2, 0, 0], depths [1, 1, 2, 1]: only block2.0 is D-STGA; the other 4 blocks' offsets are dropped."""
    cls = golden["cls"]
    model, report = convert_original_checkpoint(
        cls["state_dict"], classification_config(golden, "mean"), task="classification", return_report=True
    )
    dropped_blocks = {re.match(r"block\d+\.\d+", key).group() for key in report.dropped}
    assert dropped_blocks == {"block1.0", "block3.0", "block3.1", "block4.0"}
    assert len(report.dropped) == 4 * 6 and all("cheap_operation" in key for key in report.dropped)
    assert report.renamed["block2.0.attn.cheap_operation.0.weight"] == (
        "timo.encoder.stages.1.layers.0.attention.query_offset.projection.weight"
    )
    assert report.renamed["head.weight"] == "classifier.weight"
    assert torch.equal(model.classifier.weight, cls["state_dict"]["head.weight"])


def test_conversion_reports_config_mismatches(golden):
    seg = golden["seg"]
    config = segmentation_config(golden, "max")
    config.attention_types = ["stga", "stga", "mhsa", "mhsa"]  # the checkpoint's stage 2 is D-STGA
    with pytest.raises(ValueError, match="no place for.*query_offset"):
        convert_original_checkpoint(seg["state_dict"], config, task="segmentation")
    state_dict = dict(seg["state_dict"])
    state_dict["decoder.conv_seg.weight"] = torch.zeros(1)  # an mmseg key the official framework does not have
    with pytest.raises(ValueError, match="no timo_hf counterpart.*decoder.conv_seg.weight"):
        convert_original_checkpoint(state_dict, segmentation_config(golden, "max"), task="segmentation")


# --- Base checkpoints: names and shapes from the official key lists, on the meta device (no memory)


def official_key_shapes(file_name: str, section: str) -> dict:
    path = OFFICIAL_KEYS / file_name
    if not path.is_file():
        pytest.skip(f"official key list {path} not available (only CI and developers have ../shared)")
    shapes, inside = {}, False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            inside = line.startswith(section)
        elif inside and line and not line.startswith("#"):
            key, shape = line.split("\t")
            shapes[key] = tuple(int(size) for size in re.findall(r"\d+", shape))
    return shapes


@pytest.mark.parametrize(
    "task, file_name, section, overrides, num_dropped",
    [
        (
            "segmentation",
            "official_segmentation_keys.txt",
            "## TiMo_base, classes=14, in_chans=10",
            dict(num_channels=10, num_labels=14),
            2,  # encoder.head.*
        ),
        (
            "classification",
            "official_classification_keys.txt",
            "## TiMo_cls TiMo_base, num_classes=2, in_chans=3",
            dict(num_channels=3, num_labels=2),
            (18 + 2) * 6,  # offset branches of the 20 MHSA blocks of stages 3-4
        ),
    ],
)
def test_base_checkpoint_names_and_shapes_convert(task, file_name, section, overrides, num_dropped):
    official = official_key_shapes(file_name, section)
    model_class, convert = TASKS[task]
    with torch.device("meta"):
        model = model_class(TiMoConfig.from_preset("base", **overrides))
        state_dict = {key: torch.empty(shape) for key, shape in official.items()}
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    report = ConversionReport()
    converted = convert(state_dict, report)
    assert set(official) == set(report.renamed) | set(report.dropped)
    dropped = {key for key in report.renamed if key in report.droppable and report.renamed[key] not in expected}
    assert len(report.dropped) + len(dropped) == num_dropped
    kept = {report.renamed[key]: tuple(converted[report.renamed[key]].shape) for key in report.renamed}
    kept = {key: shape for key, shape in kept.items() if key in expected}
    assert kept == expected
