"""convert_original_checkpoint and `timo convert`: key handling, errors and the command line."""

import pytest
import torch

from timo_hf import TiMoConfig, TiMoModel, convert_original_checkpoint
from timo_hf.cli import main as timo_main
from timo_hf.convert_original import rename_backbone_key

from .conftest import load_golden
from .test_parity_backbone import config_of


@pytest.fixture(scope="module")
def golden():
    return load_golden("timo_official_small.pt")


@pytest.mark.parametrize(
    "official, converted",
    [
        ("patch_embed1.conv.0.weight", "embeddings.stem.conv1.weight"),
        ("patch_embed1.conv.1.running_var", "embeddings.stem.batch_norm.running_var"),
        ("patch_embed3.proj.bias", "encoder.stages.2.downsample.projection.bias"),
        ("block1.1.attn.kv.weight", "encoder.stages.0.layers.1.attention.key_value.weight"),
        ("block2.0.attn.cheap_operation.1.num_batches_tracked",
         "encoder.stages.1.layers.0.attention.query_offset.norm.num_batches_tracked"),
        ("block4.0.mlp.fc2.weight", "encoder.stages.3.layers.0.mlp.fc2.weight"),
        ("norm4.weight", "encoder.stages.3.layernorm.weight"),
        ("pos_embed", None),
    ],
)
def test_key_renaming(official, converted):
    assert rename_backbone_key(official) == converted


def test_loads_a_pth_file_with_model_key_and_ddp_prefix(tmp_path, golden):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {f"module.{k}": v for k, v in golden["state_dict"].items()}, "epoch": 3}, path)
    model = convert_original_checkpoint(path, config_of(golden))
    assert isinstance(model, TiMoModel)
    assert torch.equal(model.embeddings.stem.conv1.weight, golden["state_dict"]["patch_embed1.conv.0.weight"])


def test_loads_a_checkpoint_saved_as_the_official_training_scripts_save_it(tmp_path, golden):
    """model / optimizer / epoch / scaler / args, the args an argparse.Namespace (official-timo.md 2.4)."""
    import argparse

    weights = golden["state_dict"]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    path = tmp_path / "checkpoint-99.pth"
    torch.save({"model": weights, "optimizer": optimizer.state_dict(), "epoch": 99, "scaler": {"scale": 65536.0},
                "args": argparse.Namespace(model="TiMo_base", blr=1.5e-4, mask_ratio=0.75)}, path)
    model = convert_original_checkpoint(path, config_of(golden))
    assert torch.equal(model.embeddings.stem.conv1.weight, weights["patch_embed1.conv.0.weight"])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a checkpoint", "Could not read .*garbage.pth as a PyTorch checkpoint"),
        (torch.zeros(3), "not an official TiMo state dict"),
        ({"model": {"w": torch.zeros(1)}, "hook": print}, "Could not read .* Unsupported global"),
    ],
    ids=["corrupt", "a-tensor", "foreign-object"],
)
def test_unreadable_checkpoints_raise_value_errors_naming_the_file(tmp_path, golden, content, message):
    path = tmp_path / "garbage.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        convert_original_checkpoint(path, config_of(golden))


def test_unknown_official_keys_are_listed(golden):
    state_dict = dict(golden["state_dict"], **{"block1.0.attn.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no timo_hf counterpart.*block1.0.attn.extra.weight"):
        convert_original_checkpoint(state_dict, config_of(golden))


def test_missing_weights_are_listed(golden):
    state_dict = {k: v for k, v in golden["state_dict"].items() if not k.startswith("norm4.")}
    with pytest.raises(ValueError, match="lacks .*encoder.stages.3.layernorm.bias"):
        convert_original_checkpoint(state_dict, config_of(golden))


def test_a_config_that_does_not_fit_is_reported(golden):
    config = config_of(golden)
    wrong = TiMoConfig(**{**config.to_dict(), "num_channels": 4})
    with pytest.raises(ValueError, match="(?s)Shape mismatch.*embeddings.stem.conv1.weight"):
        convert_original_checkpoint(golden["state_dict"], wrong)


def test_bad_checkpoint_arguments(tmp_path, golden):
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_original_checkpoint(tmp_path / "missing.pth", config_of(golden))
    with pytest.raises(ValueError, match="Unknown conversion task"):
        convert_original_checkpoint(golden["state_dict"], config_of(golden), task="detection")


@pytest.fixture
def official_files(tmp_path, golden):
    """The golden official checkpoint saved as the official scripts do, and its TiMoConfig as a JSON file."""
    checkpoint = tmp_path / "official.pth"
    torch.save({"model": golden["state_dict"]}, checkpoint)
    config_file = tmp_path / "config.json"
    config_of(golden).to_json_file(config_file)
    return checkpoint, config_file


def test_timo_convert_command(tmp_path, golden, official_files, capsys):
    checkpoint, config_file = official_files
    out = tmp_path / "converted"
    assert timo_main(["convert", str(checkpoint), str(out), "--config", str(config_file)]) == 0
    printed = capsys.readouterr().out
    assert "dropped head.weight" in printed
    model = TiMoModel.from_pretrained(out).eval()
    with torch.no_grad():
        stage4 = model.compute_feature_maps(golden["input"])[-1]
    assert (stage4 - golden["outputs"][3]).abs().max() <= 1e-5


def test_timo_convert_saves_the_image_processor_of_a_normalization_preset(tmp_path, official_files, capsys):
    from timo_hf import TiMoImageProcessor

    checkpoint, config_file = official_files
    out = tmp_path / "converted"
    assert timo_main(["convert", str(checkpoint), str(out), "--config", str(config_file),
                      "--normalization", "rgb_uint8"]) == 0
    processor = TiMoImageProcessor.from_pretrained(out)
    assert processor.band_names == ["B4", "B3", "B2"] and processor.image_std == [255.0] * 3
    assert timo_main(["convert", str(checkpoint), str(tmp_path / "wrong"), "--config", str(config_file),
                      "--normalization", "s2_l2a_10"]) == 2
    assert "names 10 bands" in capsys.readouterr().err and not (tmp_path / "wrong").exists()


def test_timo_convert_reports_errors(tmp_path, capsys):
    code = timo_main(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "out"), "--preset", "base"])
    assert code == 2
    assert "not found" in capsys.readouterr().err
