"""TiMoConfig: presets, validation, backbone fields and serialisation."""

import pytest
import torch

from timo_hf import TiMoConfig, TiMoModel


def test_presets_follow_the_official_variants():
    base = TiMoConfig.from_preset("base")
    assert base.hidden_sizes == [128, 256, 512, 1024]
    assert base.num_heads == [4, 8, 16, 32]
    assert base.depths == [2, 2, 18, 2]
    assert base.attention_types == ["dstga", "dstga", "mhsa", "mhsa"]
    assert TiMoConfig.from_preset("large").hidden_sizes == [384, 768, 960, 1536]
    huge = TiMoConfig.from_preset("TiMo-Huge", num_channels=10)
    assert huge.depths == [3, 3, 22, 3] and huge.num_channels == 10
    with pytest.raises(ValueError, match="Unknown TiMo preset"):
        TiMoConfig.from_preset("gigantic")


# Exact counts of the official backbone without its unused 1000-class head (official-timo.md 5.1).
@pytest.mark.parametrize(
    "preset, expected", [("base", 90_198_920), ("large", 296_904_264), ("huge", 672_481_932)]
)
def test_parameter_counts_match_the_official_backbone(preset, expected):
    with torch.device("meta"):
        model = TiMoModel(TiMoConfig.from_preset(preset))
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(depths=[1, 1, 1]), "same length"),
        (dict(num_heads=[3, 8, 16, 32]), "not divisible"),
        (dict(attention_types=["dstga", "window", "mhsa", "mhsa"]), "unknown attention_types"),
        (dict(num_channels=0), "num_channels must be >= 1"),
        (dict(position_embedding_type="learned"), "position_embedding_type"),
        (dict(classifier_pooling="max"), "classifier_pooling"),
        (dict(temporal_fusion="mean"), "temporal_fusion"),
    ],
)
def test_inconsistent_configs_are_refused_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        TiMoConfig(**overrides)


def test_backbone_fields_and_round_trip(tmp_path):
    config = TiMoConfig(out_features=["stage1", "stage3"], num_channels=10)
    assert config.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert config.out_indices == [1, 3]
    config.save_pretrained(tmp_path)
    reloaded = TiMoConfig.from_pretrained(tmp_path)
    assert reloaded.out_features == ["stage1", "stage3"]
    assert reloaded.to_dict() == config.to_dict()


def test_attention_type_names_are_case_insensitive():
    assert TiMoConfig(attention_types=["DSTGA", "STGA", "MHSA", "mhsa"]).attention_types == [
        "dstga",
        "stga",
        "mhsa",
        "mhsa",
    ]


# The paper's 91M / 298M / 675M count the official backbone with its 1000-class head: the same as TiMo with a
# 1000-way linear classifier on the pooled last stage.
@pytest.mark.parametrize(
    "preset, expected", [("base", 91_223_920), ("large", 298_441_264), ("huge", 674_530_932)]
)
def test_parameter_counts_with_a_1000_class_head_match_the_paper(preset, expected):
    from timo_hf import TiMoForImageClassification

    with torch.device("meta"):
        model = TiMoForImageClassification(TiMoConfig.from_preset(preset, num_labels=1000))
    assert sum(p.numel() for p in model.parameters()) == expected
