"""TiMoForMaskedImageModeling: official parity, masking semantics, sparse compute, transfer, bad inputs."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from timo_hf import (
    TiMoConfig,
    TiMoForMaskedImageModeling,
    TiMoForSemanticSegmentation,
    TiMoModel,
    convert_original_checkpoint,
)
from timo_hf.convert_original import rename_pretraining_key
from timo_hf.modeling_timo_mim import patchify_units, unpatchify_units

from .conftest import load_golden


def tiny_mim_config(**overrides) -> TiMoConfig:
    kwargs = dict(
        hidden_sizes=[16, 32, 48, 64],
        num_heads=[2, 2, 4, 4],
        depths=[1, 1, 1, 1],
        attention_types=["dstga", "stga", "mhsa", "mhsa"],
        mim_decoder_hidden_size=32,
        mim_decoder_depth=1,
        mim_decoder_num_heads=2,
    )
    return TiMoConfig(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def golden():
    return load_golden("timo_official_mae_small.pt")


def golden_config(golden, target: str) -> TiMoConfig:
    c = golden["config"]
    return TiMoConfig(
        hidden_sizes=c["embed_dims"],
        num_heads=c["sa_num_heads"],
        depths=c["depths"],
        mlp_ratio=c["mlp_ratios"][0],
        attention_types=["dstga", "dstga", "mhsa", "mhsa"],  # the fine-tuning model; pre-training is all MHSA
        mim_decoder_hidden_size=c["decoder_embed_dim"],
        mim_decoder_depth=c["decoder_depth"],
        mim_decoder_num_heads=c["decoder_heads"],
        mim_target_normalization=target,
    )


# ---------------------------------------------------------------------------------------------- official parity
@pytest.mark.parametrize("case, target", [("norm_pix_False", "none"), ("norm_pix_True", "batch")])
def test_official_pretraining_model_is_reproduced(golden, case, target):
    model, report = convert_original_checkpoint(
        golden["state_dict"], golden_config(golden, target), task="pretraining", return_report=True
    )
    assert isinstance(model, TiMoForMaskedImageModeling) and not model.training
    assert list(report.dropped) == ["head.weight", "head.bias"] or set(report.dropped) == {"head.weight", "head.bias"}
    expected = golden[case]
    with torch.no_grad():
        outputs = model(golden["input"], bool_masked_pos=~expected["keep_mask_units"])
    batch_size, frames = golden["input"].shape[:2]
    prediction = outputs.logits.view(batch_size * frames, 7, 7, -1)  # official layout [B*T, 7, 7, 32*32*3]
    assert (outputs.last_hidden_state - expected["latent"]).abs().max() <= 1e-5
    assert (prediction - expected["pred"]).abs().max() <= 1e-5
    assert abs(outputs.loss.item() - expected["loss"].item()) <= 1e-5
    assert torch.equal(outputs.bool_masked_pos.view(batch_size * frames, 7, 7, 1), ~expected["pred_keep_mask"])


def test_pretraining_key_renaming():
    key_value = "timo.encoder.stages.1.layers.0.attention.key_value.weight"
    assert rename_pretraining_key("block2.0.attn.kv.weight") == key_value
    assert rename_pretraining_key("decoder_blocks.3.attn.q.bias") == "decoder.layers.3.attention.query.bias"
    assert rename_pretraining_key("decoder_blocks.0.norm2.weight") == "decoder.layers.0.layernorm_after.weight"
    assert rename_pretraining_key("decoder_pred.weight") == "decoder.prediction.weight"
    assert rename_pretraining_key("mask_token") == "decoder.mask_token"
    assert rename_pretraining_key("decoder_pos_embed") is None


# ---------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("frames, channels, height, width", [(1, 3, 64, 64), (4, 5, 64, 96), (2, 2, 96, 32)])
def test_any_number_of_frames_bands_and_unit_multiples(frames, channels, height, width):
    torch.manual_seed(0)
    model = TiMoForMaskedImageModeling(tiny_mim_config(num_channels=channels)).eval()
    pixel_values = torch.randn(2, frames, channels, height, width)
    outputs = model(pixel_values)
    num_units = frames * (height // 32) * (width // 32)
    num_visible = int(num_units * 0.25)
    assert outputs.reconstruction.shape == pixel_values.shape
    assert outputs.logits.shape == (2, num_units, channels * 32 * 32)
    assert outputs.bool_masked_pos.shape == (2, num_units)
    assert (~outputs.bool_masked_pos).sum(1).tolist() == [num_visible, num_visible]
    assert outputs.last_hidden_state.shape == (2, num_visible, 64)
    assert torch.isfinite(outputs.loss)


def test_noise_fixes_the_mask_and_keeps_the_smallest_scores():
    model = TiMoForMaskedImageModeling(tiny_mim_config()).eval()
    noise = torch.rand(2, 12)
    first = model(torch.randn(2, 3, 3, 64, 64), noise=noise).bool_masked_pos
    second = model(torch.randn(2, 3, 3, 64, 64), noise=noise).bool_masked_pos
    assert torch.equal(first, second)
    visible = noise.argsort(dim=1)[:, :3]
    assert not first.gather(1, visible).any() and first.sum() == 2 * 9


def test_units_are_ordered_frame_row_column_and_targets_channel_first():
    pixel_values = torch.arange(2 * 2 * 3 * 64 * 96, dtype=torch.float32).view(2, 2, 3, 64, 96)
    units = patchify_units(pixel_values, 32)
    # unit index t * (rows * cols) + row * cols + col; values (c, y, x)
    b, t, row, col = 1, 1, 1, 2
    expected = pixel_values[b, t, :, row * 32 : (row + 1) * 32, col * 32 : (col + 1) * 32].reshape(-1)
    assert torch.equal(units[b, t * 6 + row * 3 + col], expected)
    assert torch.equal(unpatchify_units(units, 2, 3, 64, 96), pixel_values)


def test_masked_pixels_are_invisible_to_the_encoder_and_visible_ones_are_not():
    torch.manual_seed(0)
    model = TiMoForMaskedImageModeling(tiny_mim_config()).eval()
    pixel_values = torch.randn(1, 3, 3, 64, 64)
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, [0, 5, 10]] = False  # frame 0 unit (0,0), frame 1 unit (0,1), frame 2 unit (1,0)
    changed_masked, changed_visible = pixel_values.clone(), pixel_values.clone()
    changed_masked[0, 0, :, 32:, 32:] = 100.0  # frame 0, unit (1, 1): masked
    changed_visible[0, 1, :, :32, 32:] = 100.0  # frame 1, unit (0, 1): visible
    with torch.no_grad():
        reference = model(pixel_values, bool_masked_pos=mask)
        masked_run = model(changed_masked, bool_masked_pos=mask)
        visible_run = model(changed_visible, bool_masked_pos=mask)
    assert torch.equal(reference.last_hidden_state, masked_run.last_hidden_state)
    assert torch.equal(reference.logits, masked_run.logits)
    assert not torch.allclose(reference.last_hidden_state, visible_run.last_hidden_state)


def test_a_lone_visible_unit_is_encoded_like_a_full_mhsa_model_on_its_crop():
    """Sparse path = dense all-MHSA TiMoModel on the unit alone: each unit downsampled on its own, zero-padded."""
    torch.manual_seed(0)
    config = tiny_mim_config()
    model = TiMoForMaskedImageModeling(config).eval()
    dense = TiMoModel(tiny_mim_config(attention_types=["mhsa"] * 4)).eval()
    dense.load_state_dict(model.timo.state_dict())
    pixel_values = torch.randn(1, 1, 3, 64, 64)
    mask = torch.tensor([[False, True, True, True]])
    with torch.no_grad():
        latent = model(pixel_values, bool_masked_pos=mask).last_hidden_state
        crop = dense(pixel_values[..., :32, :32]).last_hidden_state  # [1, 1, C4, 1, 1]
    torch.testing.assert_close(latent[0, 0], crop.flatten(), atol=1e-5, rtol=1e-5)


def test_loss_is_the_mse_on_masked_units_with_per_unit_normalised_targets():
    torch.manual_seed(0)
    model = TiMoForMaskedImageModeling(tiny_mim_config()).eval()
    pixel_values = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        outputs = model(pixel_values)
    target = patchify_units(pixel_values, 32)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = outputs.bool_masked_pos
    torch.testing.assert_close(outputs.loss, ((outputs.logits - target) ** 2)[mask].mean())


# ---------------------------------------------------------------------------------------------- compute
def test_encoder_blocks_only_see_visible_tokens():
    model = TiMoForMaskedImageModeling(tiny_mim_config()).eval()
    lengths = []
    hooks = [
        layer.register_forward_hook(lambda module, args, output: lengths.append(args[0].shape[1]))
        for stage in model.timo.encoder.stages
        for layer in stage.layers
    ]
    with torch.no_grad():
        model(torch.randn(2, 3, 3, 64, 64))  # 12 units, 3 visible
    for hook in hooks:
        hook.remove()
    assert lengths == [3 * 64, 3 * 16, 3 * 4, 3 * 1]  # 8x8, 4x4, 2x2, 1x1 tokens per visible unit


def test_pretraining_step_costs_a_fraction_of_the_full_image_step():
    """Counted FLOPs (forward + backward), eager attention so that every matmul is counted."""
    torch.manual_seed(0)
    config = tiny_mim_config(mim_decoder_depth=2)
    model = TiMoForMaskedImageModeling(config)
    full = TiMoModel(tiny_mim_config(attention_types=["mhsa"] * 4))
    for m in (model, full):
        m.set_attn_implementation("eager")
    pixel_values = torch.randn(1, 3, 3, 64, 64)  # 12 units, 3 visible; measured ratio 0.30

    def count(run) -> int:
        with FlopCounterMode(display=False) as counter:
            run().backward()
        return counter.get_total_flops()

    sparse = count(lambda: model(pixel_values).loss)
    dense = count(lambda: full(pixel_values).last_hidden_state.square().mean())
    assert sparse <= 0.4 * dense, (sparse, dense)


# ---------------------------------------------------------------------------------------------- transfer
def test_fine_tuning_models_load_every_shared_weight(tmp_path):
    torch.manual_seed(0)
    mim = TiMoForMaskedImageModeling(tiny_mim_config(num_labels=3))
    for parameter in mim.parameters():  # make every weight distinguishable from an initialisation
        parameter.data.add_(torch.randn_like(parameter))
    mim.save_pretrained(tmp_path)
    shared = {k: v for k, v in mim.timo.state_dict().items()}

    encoder, info = TiMoModel.from_pretrained(tmp_path, output_loading_info=True)
    offsets = {key for key in encoder.state_dict() if ".query_offset." in key}
    assert len(offsets) == 6  # the D-STGA stage: projection + BatchNorm (weight, bias, 2 statistics, counter)
    assert set(info["missing_keys"]) == offsets
    assert all(key.startswith("decoder.") for key in info["unexpected_keys"])
    state = encoder.state_dict()
    for key, value in shared.items():
        assert torch.equal(state[key], value), key

    segmenter, info = TiMoForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    new = set(info["missing_keys"]) - {f"timo.{key}" for key in offsets}
    assert new and all(k.startswith(("decode_head.", "classifier.")) for k in new), sorted(new)
    seg_state = segmenter.timo.state_dict()
    for key, value in shared.items():
        assert torch.equal(seg_state[key], value), key


def test_save_load_round_trip_and_auto_class(tmp_path):
    from transformers import AutoModelForMaskedImageModeling

    torch.manual_seed(0)
    model = TiMoForMaskedImageModeling(tiny_mim_config()).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedImageModeling.from_pretrained(tmp_path).eval()
    assert type(loaded) is TiMoForMaskedImageModeling
    pixel_values, noise = torch.randn(1, 3, 3, 64, 64), torch.rand(1, 12)
    with torch.no_grad():
        assert torch.equal(model(pixel_values, noise=noise).logits, loaded(pixel_values, noise=noise).logits)


# ---------------------------------------------------------------------------------------------- training details
def test_every_parameter_gets_a_gradient_and_checkpointing_changes_nothing():
    torch.manual_seed(0)
    model = TiMoForMaskedImageModeling(tiny_mim_config())
    pixel_values, noise = torch.randn(2, 3, 3, 64, 64), torch.rand(2, 12)
    model(pixel_values, noise=noise).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(pixel_values, noise=noise).loss.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name], msg=name)


def test_dense_experiment_pretrains_the_configured_attention():
    torch.manual_seed(0)
    model = TiMoForMaskedImageModeling(tiny_mim_config(mim_encoder_attention="as_configured"))
    assert model.timo.encoder.stages[0].layers[0].attention.attention_type == "dstga"
    outputs = model(torch.randn(2, 3, 3, 64, 64))
    outputs.loss.backward()
    assert outputs.last_hidden_state.shape == (2, 3, 64)
    assert model.timo.encoder.stages[0].layers[0].attention.query_offset.projection.weight.grad is not None


@pytest.mark.parametrize("mode", ["per_unit", "batch", "none"])
def test_target_modes_give_finite_losses(mode):
    torch.manual_seed(0)
    model = TiMoForMaskedImageModeling(tiny_mim_config(mim_target_normalization=mode))
    assert torch.isfinite(model(torch.rand(2, 3, 3, 64, 64)).loss)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    model = TiMoForMaskedImageModeling(tiny_mim_config()).eval()
    with pytest.raises(ValueError, match="multiples of config.mask_unit_size = 32, got 64x48"):
        model(torch.randn(1, 3, 3, 64, 48))
    with pytest.raises(ValueError, match=r"bool_masked_pos must have shape .*\(1, 12\)"):
        model(torch.randn(1, 3, 3, 64, 64), bool_masked_pos=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="leaves 0 of 12 units visible"):
        model(torch.randn(1, 3, 3, 64, 64), bool_masked_pos=torch.ones(1, 12, dtype=torch.bool))
    uneven = torch.ones(2, 12, dtype=torch.bool)
    uneven[0, :3], uneven[1, :2] = False, False
    with pytest.raises(ValueError, match="same number of visible units"):
        model(torch.randn(2, 3, 3, 64, 64), bool_masked_pos=uneven)
    with pytest.raises(ValueError, match=r"noise must have shape"):
        model(torch.randn(1, 3, 3, 64, 64), noise=torch.rand(1, 5))
    with pytest.raises(ValueError, match="cannot return output_hidden_states: its encoder carries the visible"):
        model(torch.randn(1, 3, 3, 64, 64), output_hidden_states=True)
    sparse = TiMoForMaskedImageModeling(tiny_mim_config(mask_ratio=0.9))
    with pytest.raises(ValueError, match="leaves 0 of 4 mask units visible"):
        sparse(torch.randn(1, 1, 3, 64, 64))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mask_unit_size", 30, "multiple of the stem stride 4"),
        ("mask_ratio", 1.0, r"mask_ratio must be in \[0, 1\)"),
        ("mim_encoder_attention", "stga", "STGA/D-STGA cannot run on the sparse visible units"),
        ("mim_target_normalization", "global", "mim_target_normalization must be one of"),
        ("mim_decoder_num_heads", 5, "multiple of 8 .* and of mim_decoder_num_heads 5"),
    ],
)
def test_bad_mim_configuration_is_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_mim_config(**{field: value})
