"""`frame_mask`: series of different lengths in one batch give each sample the outputs it gets alone."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from timo_hf import TiMoBackbone, TiMoConfig, TiMoModel
from timo_hf.image_processing_timo import TiMoImageProcessor
from timo_hf.modeling_timo import TiMoForImageClassification, TiMoForSemanticSegmentation


NUM_LABELS = 3
# Sample 0 padded at the end, sample 1 complete, sample 2 without its second frame (a cloudy date left out).
FRAME_MASK = torch.tensor([[True, True, False, False], [True, True, True, True], [True, False, True, True]])


def build(model_class, tiny_config_kwargs, **overrides):
    torch.manual_seed(0)
    config = TiMoConfig(**{**tiny_config_kwargs, "num_labels": NUM_LABELS, "decoder_hidden_size": 16, **overrides})
    return model_class(config).eval()


def pixels(batch=3, frames=4, size=64):
    return torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_each_sample_gets_what_it_gets_alone_and_zeros_at_left_out_frames(tiny_config_kwargs):
    """D-STGA, STGA and MHSA stages (the tiny config has all three): medians, temporal attention and attention over
    all frames see the kept frames only."""
    model, pixel_values = build(TiMoModel, tiny_config_kwargs), pixels()
    with torch.no_grad():
        outputs = model(pixel_values, frame_mask=FRAME_MASK, output_hidden_states=True)
        padded = model(pixel_values).last_hidden_state
        for sample, kept in enumerate(FRAME_MASK):
            alone = model(pixel_values[sample : sample + 1, kept], output_hidden_states=True)
            for masked, single in zip(outputs.hidden_states, alone.hidden_states):
                assert torch.equal(masked[sample, kept], single[0])
                assert not masked[sample, ~kept].any()
            assert torch.allclose(outputs.pooler_output[sample], alone.pooler_output[0], atol=1e-6)
            if not kept.all():  # without the mask the left-out frames change the kept ones
                assert not torch.allclose(padded[sample, kept], alone.last_hidden_state[0], atol=1e-3)
    assert torch.equal(outputs.frame_mask, FRAME_MASK)
    assert model(pixel_values, frame_mask=torch.ones(3, 4, dtype=torch.bool)).frame_mask is None


def test_temporal_positions_follow_the_kept_frames(tiny_config_kwargs):
    model, pixel_values = build(TiMoModel, tiny_config_kwargs), pixels()
    days = torch.tensor([[0.0, 5.0, 0.0, 0.0], [0.0, 10.0, 20.0, 30.0], [0.0, 12.0, 24.0, 40.0]])
    with torch.no_grad():
        masked = model(pixel_values, temporal_positions=days, frame_mask=FRAME_MASK).last_hidden_state
        alone = model(pixel_values[2:, FRAME_MASK[2]], temporal_positions=days[2:, FRAME_MASK[2]]).last_hidden_state
    assert torch.equal(masked[2, FRAME_MASK[2]], alone[0])


@pytest.mark.parametrize("fusion", ["max", "none"])
def test_segmentation_fuses_and_scores_the_kept_frames_only(tiny_config_kwargs, fusion):
    model, pixel_values = build(TiMoForSemanticSegmentation, tiny_config_kwargs, temporal_fusion=fusion), pixels()
    labels = torch.randint(0, NUM_LABELS, (3, 64, 64) if fusion == "max" else (3, 4, 64, 64))
    if fusion == "none":
        labels[~FRAME_MASK] = 255  # the processor's padding label
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels, frame_mask=FRAME_MASK)
        alone_logits, alone_labels = [], []
        for sample, kept in enumerate(FRAME_MASK):
            logits = model(pixel_values[sample : sample + 1, kept]).logits[0]
            masked = outputs.logits[sample] if fusion == "max" else outputs.logits[sample, kept]
            assert torch.allclose(masked, logits, atol=1e-5)  # the head's convolutions batch the frames differently
            if fusion == "none":
                assert not outputs.logits[sample, ~kept].any()
            alone_logits.append(logits if fusion == "none" else logits[None])
            alone_labels.append(labels[sample, kept] if fusion == "none" else labels[sample : sample + 1])
    expected = F.cross_entropy(torch.cat(alone_logits), torch.cat(alone_labels), ignore_index=255)
    assert torch.allclose(outputs.loss, expected, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "per_frame"])
def test_classification_pools_and_scores_the_kept_frames_only(tiny_config_kwargs, pooling):
    model, pixel_values = build(TiMoForImageClassification, tiny_config_kwargs, classifier_pooling=pooling), pixels()
    labels = torch.randint(0, NUM_LABELS, (3,) if pooling == "mean" else (3, 4))
    if pooling == "per_frame":
        labels[~FRAME_MASK] = -100  # the processor's padding label, out of the class range
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels, frame_mask=FRAME_MASK)
        alone = [model(pixel_values[sample : sample + 1, kept]).logits[0] for sample, kept in enumerate(FRAME_MASK)]
    if pooling == "mean":
        assert torch.allclose(outputs.logits, torch.stack(alone), atol=1e-6)
        expected = F.cross_entropy(torch.stack(alone), labels)
    else:
        assert torch.allclose(outputs.logits[FRAME_MASK], torch.cat(alone), atol=1e-6)
        assert not outputs.logits[~FRAME_MASK].any()
        expected = F.cross_entropy(torch.cat(alone), labels[FRAME_MASK])
    assert torch.allclose(outputs.loss, expected, atol=1e-6)


def test_training_step_reaches_the_kept_frames_only(tiny_config_kwargs):
    model = build(TiMoForSemanticSegmentation, tiny_config_kwargs).train()
    pixel_values = pixels().requires_grad_(True)
    model(pixel_values, labels=torch.randint(0, NUM_LABELS, (3, 64, 64)), frame_mask=FRAME_MASK).loss.backward()
    grad = pixel_values.grad.abs().sum(dim=(2, 3, 4))
    assert (grad[FRAME_MASK] > 0).all() and not grad[~FRAME_MASK].any()
    assert all(p.grad is not None for p in model.parameters())


def test_backbone_maps_are_zero_at_left_out_frames(tiny_config_kwargs):
    backbone = build(TiMoBackbone, tiny_config_kwargs, out_features=["stage1", "stage4"])
    with torch.no_grad():
        maps = backbone(pixels(), frame_mask=FRAME_MASK).feature_maps
    assert [tuple(m.shape[:2]) for m in maps] == [(12, 16), (12, 64)]
    for feature_map in maps:
        kept = feature_map.flatten(1).abs().sum(1) > 0
        assert torch.equal(kept, FRAME_MASK.flatten())


def test_processor_batches_of_different_lengths_run_as_single_series(tiny_config_kwargs):
    """What the processor pads, the model leaves out: a batch of a 2-date and a 4-date series."""
    model = build(TiMoModel, tiny_config_kwargs)
    rng = np.random.default_rng(0)
    series = [rng.integers(100, 3000, (frames, 3, 64, 64)).astype(np.uint16) for frames in (2, 4)]
    processor = TiMoImageProcessor(image_mean=1000.0, image_std=500.0)
    batch = processor(series)
    assert batch["frame_mask"].tolist() == [[True, True, False, False], [True] * 4]
    with torch.no_grad():
        together = model(**batch).last_hidden_state
        first = model(**processor(series[0])).last_hidden_state
    assert torch.equal(together[0, :2], first[0])


@pytest.mark.parametrize(
    "frame_mask, message",
    [
        (FRAME_MASK.int(), "boolean tensor .* torch.int32"),
        (FRAME_MASK[:, :3], r"shape \[batch, time\] = \(3, 4\) .* got \(3, 3\)"),
        (torch.tensor([[True] * 4, [False] * 4, [True] * 4]), r"keeps no frame of sample\(s\) \[1\]"),
    ],
    ids=["dtype", "shape", "empty-sample"],
)
def test_bad_frame_masks_raise_value_errors_naming_the_problem(tiny_config_kwargs, frame_mask, message):
    with pytest.raises(ValueError, match=message):
        build(TiMoModel, tiny_config_kwargs)(pixels(), frame_mask=frame_mask)


def test_masked_image_modelling_refuses_a_mask_that_leaves_frames_out(tiny_config_kwargs):
    from timo_hf import TiMoForMaskedImageModeling

    model = build(TiMoForMaskedImageModeling, tiny_config_kwargs)
    pixel_values = pixels()
    with torch.no_grad():
        whole = model(pixel_values, noise=torch.zeros(3, 16), frame_mask=torch.ones(3, 4, dtype=torch.bool)).loss
        assert torch.equal(whole, model(pixel_values, noise=torch.zeros(3, 16)).loss)
        with pytest.raises(ValueError, match="reconstructs whole series: frame_mask leaves frames out"):
            model(pixel_values, frame_mask=FRAME_MASK)


def test_trainer_with_the_processor_as_collator_leaves_padding_out(tmp_path, tiny_config_kwargs):
    """The transformers path: `Trainer` with `TiMoImageProcessor` as the data collator batches a 2-date and a 4-date
    series; its evaluation loss is the mean of the two series' losses alone."""
    from transformers import Trainer, TrainingArguments

    model = build(TiMoForSemanticSegmentation, tiny_config_kwargs)
    rng = np.random.default_rng(0)
    examples = [{"pixel_values": rng.integers(100, 3000, (frames, 3, 64, 64)).astype(np.uint16),
                 "label": rng.integers(0, NUM_LABELS, (64, 64))} for frames in (2, 4)]
    processor = TiMoImageProcessor(image_mean=1000.0, image_std=500.0)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=2)
    trainer = Trainer(model=model, args=args, eval_dataset=examples, data_collator=processor)
    eval_loss = trainer.evaluate()["eval_loss"]
    with torch.no_grad():
        alone = [model(**processor([example])).loss.item() for example in examples]
    assert eval_loss == pytest.approx(sum(alone) / 2, abs=1e-5)
