"""Task heads: TiMoForImageClassification and TiMoForSemanticSegmentation (shapes, fusion, losses, bad input)."""

import math

import pytest
import torch
from torch.nn import functional as F
from transformers import Trainer, TrainingArguments, UperNetConfig, UperNetForSemanticSegmentation

from timo_hf import TiMoBackbone, TiMoConfig
from timo_hf.modeling_timo import (
    TiMoConvModule,
    TiMoForImageClassification,
    TiMoForSemanticSegmentation,
    resize,
)


NUM_LABELS = 3


def make_config(tiny_config_kwargs, **overrides) -> TiMoConfig:
    return TiMoConfig(**{**tiny_config_kwargs, "num_labels": NUM_LABELS, **overrides})


def build(model_class, config, seed=0):
    torch.manual_seed(seed)
    return model_class(config).eval()


def all_parameters_have_gradients(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]


# --- image classification


def test_mean_pooling_logits_and_loss(tiny_config_kwargs):
    model = build(TiMoForImageClassification, make_config(tiny_config_kwargs))
    pixel_values, labels = torch.randn(2, 3, 3, 64, 64), torch.tensor([0, 2])
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels, output_hidden_states=True)
        pooled = model.timo(pixel_values).pooler_output
    assert outputs.logits.shape == (2, NUM_LABELS)
    assert torch.allclose(outputs.logits, model.classifier(pooled))
    assert torch.allclose(outputs.loss, F.cross_entropy(outputs.logits, labels))
    assert len(outputs.hidden_states) == 5 and outputs.hidden_states[-1].shape == (2, 3, 64, 2, 2)


def test_per_frame_logits_average_to_the_pooled_logits(tiny_config_kwargs):
    """The classifier is linear, so the per-frame logits averaged over frames equal the mean-pooled logits."""
    per_frame = build(TiMoForImageClassification, make_config(tiny_config_kwargs, classifier_pooling="per_frame"))
    pooled = TiMoForImageClassification(make_config(tiny_config_kwargs)).eval()
    pooled.load_state_dict(per_frame.state_dict())
    pixel_values, labels = torch.randn(2, 3, 3, 64, 64), torch.tensor([[0, 1, 2], [2, 2, 1]])
    with torch.no_grad():
        frame_outputs = per_frame(pixel_values, labels=labels)
        mean_logits = pooled(pixel_values).logits
    assert frame_outputs.logits.shape == (2, 3, NUM_LABELS)
    assert torch.allclose(frame_outputs.logits.mean(dim=1), mean_logits, atol=1e-6)
    expected_loss = F.cross_entropy(frame_outputs.logits.reshape(6, NUM_LABELS), labels.reshape(6))
    assert torch.allclose(frame_outputs.loss, expected_loss)


def test_classifier_trains_every_parameter(tiny_config_kwargs):
    model = build(TiMoForImageClassification, make_config(tiny_config_kwargs)).train()
    model(torch.randn(2, 3, 3, 32, 32), labels=torch.tensor([1, 0])).loss.backward()
    assert all_parameters_have_gradients(model) == []


# --- semantic segmentation


@pytest.mark.parametrize("height, width", [(64, 64), (50, 70), (33, 47)])
def test_max_fusion_logits_have_the_input_size(tiny_config_kwargs, height, width):
    model = build(TiMoForSemanticSegmentation, make_config(tiny_config_kwargs))
    labels = torch.randint(0, NUM_LABELS, (2, height, width))
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 3, height, width), labels=labels)
    assert outputs.logits.shape == (2, NUM_LABELS, height, width)
    assert torch.allclose(outputs.loss, F.cross_entropy(outputs.logits, labels))
    assert outputs.hidden_states is None


def test_per_frame_segmentation_logits_and_loss(tiny_config_kwargs):
    model = build(TiMoForSemanticSegmentation, make_config(tiny_config_kwargs, temporal_fusion="none"))
    labels = torch.randint(0, NUM_LABELS, (2, 3, 40, 56))
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 3, 40, 56), labels=labels, output_hidden_states=True)
    assert outputs.logits.shape == (2, 3, NUM_LABELS, 40, 56)
    expected = F.cross_entropy(outputs.logits.flatten(0, 1), labels.flatten(0, 1))
    assert torch.allclose(outputs.loss, expected)
    assert len(outputs.hidden_states) == 5


def test_max_fusion_is_the_frame_maximum_of_the_decoder_features(tiny_config_kwargs):
    """Max fusion = classifier(max over frames of the per-frame UperNet features resized to the input); with one
    frame it agrees with the per-frame model."""
    fused = build(TiMoForSemanticSegmentation, make_config(tiny_config_kwargs))
    per_frame = TiMoForSemanticSegmentation(make_config(tiny_config_kwargs, temporal_fusion="none")).eval()
    per_frame.load_state_dict(fused.state_dict())
    features = {}
    fused.decode_head.register_forward_hook(lambda module, args, output: features.update(decoded=output))
    pixel_values = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        logits = fused(pixel_values).logits
        resized = resize(features["decoded"], (64, 64))
        expected = fused.classifier(resized.view(2, 3, -1, 64, 64).amax(dim=1))
        single_fused, single_frames = fused(pixel_values[:, :1]).logits, per_frame(pixel_values[:, :1]).logits
    assert torch.allclose(logits, expected)
    torch.testing.assert_close(single_fused, single_frames[:, 0])


def test_per_frame_logits_equal_the_official_resize_first_order(tiny_config_kwargs):
    """Per-frame output classifies on the decoder grid, then resizes the class maps; the official head resizes the
    features first. Bilinear resizing, Dropout2d (same masks: they are drawn per channel) and the 1x1 classifier
    commute, so both orders give the same logits, also at a size that is not a multiple of the grid."""
    model = build(TiMoForSemanticSegmentation, make_config(tiny_config_kwargs, temporal_fusion="none")).double()
    model.dropout.train()
    features = {}
    model.decode_head.register_forward_hook(lambda module, args, output: features.update(decoded=output))
    pixel_values = torch.randn(2, 3, 3, 60, 68, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(1)
        logits = model(pixel_values).logits
        torch.manual_seed(1)
        official = model.classifier(model.dropout(resize(features["decoded"], (60, 68))))
    torch.testing.assert_close(logits, official.view(2, 3, NUM_LABELS, 60, 68), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert not torch.allclose(logits, model.eval()(pixel_values).logits)  # the dropout masks did matter


def test_ignore_index_pixels_do_not_count(tiny_config_kwargs):
    model = build(TiMoForSemanticSegmentation, make_config(tiny_config_kwargs))
    pixel_values = torch.randn(1, 2, 3, 32, 32)
    labels = torch.randint(0, NUM_LABELS, (1, 32, 32))
    labels[:, :16] = 255
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels)
    kept = labels != 255
    expected = F.cross_entropy(outputs.logits.permute(0, 2, 3, 1)[kept], labels[kept])
    assert torch.allclose(outputs.loss, expected, atol=1e-6)


@pytest.mark.parametrize("model_class", [TiMoForSemanticSegmentation, TiMoForImageClassification])
def test_fully_ignored_labels_give_a_zero_loss_that_backpropagates(tiny_config_kwargs, model_class):
    model = build(model_class, make_config(tiny_config_kwargs)).train()
    labels = torch.full((1, 32, 32), 255) if model_class is TiMoForSemanticSegmentation else torch.tensor([-100])
    loss = model(torch.randn(1, 2, 3, 32, 32), labels=labels).loss
    assert loss.item() == 0.0
    loss.backward()


def test_segmentation_trains_every_parameter(tiny_config_kwargs):
    model = build(TiMoForSemanticSegmentation, make_config(tiny_config_kwargs, temporal_fusion="none")).train()
    model(torch.randn(2, 2, 3, 32, 48), labels=torch.randint(0, NUM_LABELS, (2, 2, 32, 48))).loss.backward()
    assert all_parameters_have_gradients(model) == []


@pytest.mark.parametrize("fusion", ["max", "none"])
def test_training_on_a_single_map_is_refused_with_the_cause_and_works_with_the_heads_norms_frozen(
    tiny_config_kwargs, fusion
):
    # One sample of one frame: the pyramid pooling's 1x1 map holds one value per channel for BatchNorm.
    model = build(TiMoForSemanticSegmentation, make_config(tiny_config_kwargs, temporal_fusion=fusion)).train()
    pixel_values, labels = torch.randn(1, 1, 3, 64, 64), torch.randint(0, NUM_LABELS, (1, 1, 64, 64))
    labels = labels if fusion == "none" else labels[:, 0]
    with pytest.raises(ValueError, match=r"cannot train on a batch of one map.*shape \(1, 64, 1, 1\)"):
        model(pixel_values, labels=labels)
    for module in model.decode_head.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    model(pixel_values, labels=labels).loss.backward()
    assert all_parameters_have_gradients(model) == []


def test_uper_width_and_pool_scales_follow_the_config(tiny_config_kwargs):
    model = TiMoForSemanticSegmentation(make_config(tiny_config_kwargs, uper_hidden_size=24, uper_pool_scales=[1, 3]))
    head = model.decode_head
    assert [block.conv.out_channels for block in head.pyramid_pooling.blocks] == [24, 24]
    assert head.bottleneck.conv.in_channels == 64 + 2 * 24
    assert [conv.conv.in_channels for conv in head.lateral_convs] == [16, 32, 48]
    assert head.fpn_bottleneck.conv.in_channels == 4 * 24
    assert model.classifier.in_channels == 24
    default = TiMoForSemanticSegmentation(make_config(tiny_config_kwargs)).decode_head
    assert default.fpn_bottleneck.conv.out_channels == 64  # C4, as official


def test_segmentation_head_uses_the_official_initialisation(tiny_config_kwargs):
    model = TiMoForSemanticSegmentation(make_config(tiny_config_kwargs))
    conv_modules = [m for m in model.decode_head.modules() if isinstance(m, TiMoConvModule)]
    assert len(conv_modules) == 4 + 1 + 3 + 3 + 1
    for module in conv_modules:
        fan_in = module.conv.weight[0].numel()
        assert module.conv.weight.abs().max() <= math.sqrt(6.0 / fan_in)  # Kaiming uniform, ReLU gain
        assert module.conv.weight.abs().max() > 0.5 * math.sqrt(6.0 / fan_in)
        assert torch.equal(module.conv.bias, torch.zeros_like(module.conv.bias))
        assert torch.equal(module.batch_norm.weight, torch.ones_like(module.batch_norm.weight))
    weight = model.classifier.weight
    bound = math.sqrt(6.0 / (weight.shape[0] + weight.shape[1]))  # Xavier uniform
    assert weight.abs().max() <= bound and weight.abs().max() > 0.5 * bound
    assert torch.equal(model.classifier.bias, torch.zeros_like(model.classifier.bias))


@pytest.mark.parametrize("model_class", [TiMoForImageClassification, TiMoForSemanticSegmentation])
def test_trainer_scales_the_mean_loss_for_gradient_accumulation(tmp_path, tiny_config_kwargs, model_class):
    """The heads return a batch-mean loss and ignore `num_items_in_batch`, so the Trainer must not treat their
    `**kwargs` as loss kwargs (it would then skip dividing the loss by the accumulation steps)."""
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, gradient_accumulation_steps=2)
    trainer = Trainer(model=model_class(make_config(tiny_config_kwargs)), args=args)
    assert trainer.model_accepts_loss_kwargs is False


# --- 4-D input for generic tooling


@pytest.mark.parametrize("model_class", [TiMoForImageClassification, TiMoForSemanticSegmentation])
def test_heads_accept_flattened_time_and_channels(tiny_config_kwargs, model_class):
    model = build(model_class, make_config(tiny_config_kwargs))
    pixel_values = torch.randn(2, 3, 3, 40, 40)
    with torch.no_grad():
        five_d = model(pixel_values).logits
        four_d = model(pixel_values.flatten(1, 2)).logits
    assert torch.equal(five_d, four_d)


@pytest.mark.parametrize("model_class", [TiMoForImageClassification, TiMoForSemanticSegmentation])
def test_heads_return_tuples_when_the_config_says_so(tiny_config_kwargs, model_class):
    """`return_dict=False` (in the config, as `from_pretrained(..., return_dict=False)` sets it, or in the call)
    gives `(loss, logits, ...)` tuples equal to the output's fields."""
    model = build(model_class, make_config(tiny_config_kwargs))
    pixel_values = torch.randn(2, 3, 3, 64, 64)
    labels = torch.randint(0, NUM_LABELS, (2,) if model_class is TiMoForImageClassification else (2, 64, 64))
    with torch.no_grad():
        expected = model(pixel_values, labels=labels)
        in_call = model(pixel_values, labels=labels, return_dict=False)
        model.config.return_dict = False
        from_config = model(pixel_values, labels=labels)
    for output in (in_call, from_config):
        assert isinstance(output, tuple)
        assert torch.equal(output[0], expected.loss) and torch.equal(output[1], expected.logits)


def test_transformers_upernet_wraps_the_backbone_with_flattened_input(tiny_config_kwargs):
    """transformers' UperNetForSemanticSegmentation runs on TiMoBackbone when fed [B, T*C, H, W]: it segments every
    frame (logits [B*T, K, H, W], frame-major), without temporal fusion; 5-D input is rejected by its resize."""
    backbone_config = TiMoConfig(out_features=["stage1", "stage2", "stage3", "stage4"], **tiny_config_kwargs)
    config = UperNetConfig(
        backbone_config=backbone_config,
        num_labels=NUM_LABELS,
        hidden_size=16,
        auxiliary_in_channels=48,
        auxiliary_channels=8,
    )
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(config).eval()
    assert isinstance(model.backbone, TiMoBackbone)
    labels = torch.randint(0, NUM_LABELS, (2 * 3, 40, 48))
    with torch.no_grad():
        outputs = model(torch.randn(2, 3 * 3, 40, 48), labels=labels)
    assert outputs.logits.shape == (2 * 3, NUM_LABELS, 40, 48)
    assert torch.isfinite(outputs.loss)
    with pytest.raises(ValueError):
        model(torch.randn(2, 3, 3, 40, 48))


# --- bad input


def test_missing_num_labels_is_refused(tiny_config_kwargs):
    config = TiMoConfig(**tiny_config_kwargs)
    config.id2label = None
    for model_class in (TiMoForImageClassification, TiMoForSemanticSegmentation):
        with pytest.raises(ValueError, match="num_labels"):
            model_class(config)
    with pytest.raises(ValueError, match="num_labels >= 2"):
        TiMoForSemanticSegmentation(TiMoConfig(num_labels=1, **tiny_config_kwargs))


def test_classification_labels_of_minus_100_are_ignored(tiny_config_kwargs):
    """Cross-entropy's default ignore index, which the processor gives padded frames: a batch whose padded frames
    stay in (no frame_mask) scores the labelled frames only."""
    model = build(TiMoForImageClassification, make_config(tiny_config_kwargs, classifier_pooling="per_frame"))
    labels = torch.tensor([[0, 1, -100], [2, -100, -100]])
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 3, 32, 32), labels=labels)
    labelled = labels != -100
    assert torch.allclose(outputs.loss, F.cross_entropy(outputs.logits[labelled], labels[labelled]))


@pytest.mark.parametrize(
    "pooling, labels, message",
    [
        ("mean", torch.zeros(2, 3, dtype=torch.long), r"shape \(2,\), got \(2, 3\)"),
        ("per_frame", torch.zeros(2, dtype=torch.long), r"shape \(2, 3\), got \(2,\)"),
        ("mean", torch.tensor([0, 3]), r"in \[0, 2\] or the ignore index -100, got values from 0 to 3"),
        ("mean", torch.tensor([-1, 1]), r"in \[0, 2\] or the ignore index -100, got values from -1 to 1"),
        ("mean", torch.tensor([0.0, 1.0]), "integer class indices"),
    ],
)
def test_bad_classification_labels(tiny_config_kwargs, pooling, labels, message):
    model = build(TiMoForImageClassification, make_config(tiny_config_kwargs, classifier_pooling=pooling))
    with pytest.raises(ValueError, match=message):
        model(torch.randn(2, 3, 3, 32, 32), labels=labels)


@pytest.mark.parametrize(
    "fusion, labels, message",
    [
        ("max", torch.zeros(2, 3, 32, 32, dtype=torch.long), r"shape \(2, 32, 32\), got \(2, 3, 32, 32\)"),
        ("max", torch.zeros(2, 32, 31, dtype=torch.long), r"shape \(2, 32, 32\), got \(2, 32, 31\)"),
        ("none", torch.zeros(2, 32, 32, dtype=torch.long), r"shape \(2, 3, 32, 32\), got \(2, 32, 32\)"),
        ("max", torch.full((2, 32, 32), 3), r"\[0, 2\] or the ignore index 255, got values from 3 to 3"),
        ("max", torch.full((2, 32, 32), -1), "got values from -1 to -1"),
    ],
)
def test_bad_segmentation_labels(tiny_config_kwargs, fusion, labels, message):
    model = build(TiMoForSemanticSegmentation, make_config(tiny_config_kwargs, temporal_fusion=fusion))
    with pytest.raises(ValueError, match=message):
        model(torch.randn(2, 3, 3, 32, 32), labels=labels)


def test_segmentation_input_smaller_than_one_stage4_cell_is_refused(tiny_config_kwargs):
    model = build(TiMoForSemanticSegmentation, make_config(tiny_config_kwargs))
    with pytest.raises(ValueError, match=r"at least 32x32 pixels, got 31x64"):
        model(torch.randn(1, 2, 3, 31, 64))


def test_flattened_input_with_the_wrong_band_count_is_refused(tiny_config_kwargs):
    model = build(TiMoForSemanticSegmentation, make_config(tiny_config_kwargs))
    with pytest.raises(ValueError, match="num_channels = 3"):
        model(torch.randn(1, 8, 32, 32))
