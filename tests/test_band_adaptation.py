"""timo_hf.band_adaptation: a pre-trained TiMo carried over to another band set, band by band."""

import pytest
import torch

from timo_hf import (
    TiMoBackbone,
    TiMoConfig,
    TiMoForImageClassification,
    TiMoForMaskedImageModeling,
    TiMoForSemanticSegmentation,
    TiMoModel,
)
from timo_hf.band_adaptation import adapt_input_bands


TINY = dict(hidden_sizes=[16, 32, 48, 64], num_heads=[2, 2, 4, 4], depths=[1, 1, 1, 1], num_channels=3,
            num_labels=3, mim_decoder_hidden_size=32, mim_decoder_depth=1, mim_decoder_num_heads=2)
PRETRAINED = ["B4", "B3", "B2"]
TARGET = ["B02", "B3", "B8", "b4", "B11"]  # B2, B3 and B4 under other spellings, two bands the model never saw


def outputs(model, pixel_values):
    with torch.no_grad():
        if isinstance(model, TiMoForMaskedImageModeling):
            out = model(pixel_values, noise=torch.linspace(0, 1, 8).expand(2, 8))
            return out.last_hidden_state
        if isinstance(model, TiMoBackbone):
            return model(pixel_values).feature_maps[-1]
        return model(pixel_values)[0]


@pytest.mark.parametrize("model_class", [TiMoModel, TiMoBackbone, TiMoForSemanticSegmentation,
                                         TiMoForImageClassification, TiMoForMaskedImageModeling])
def test_zero_initialised_new_bands_leave_the_outputs_on_the_shared_bands_unchanged(model_class):
    torch.manual_seed(0)
    model = model_class(TiMoConfig(**TINY)).eval()
    rgb = torch.randn(2, 2, 3, 64, 64)  # B4, B3, B2
    before = outputs(model, rgb)

    report = adapt_input_bands(model, PRETRAINED, TARGET)

    assert report.to_dict() == {"kept": ["B02", "B3", "b4"], "new": ["B8", "B11"], "dropped": []}
    assert model.config.num_channels == 5 and model.get_input_embeddings().conv1.in_channels == 5
    extra = torch.randn(2, 2, 2, 64, 64) * 10  # whatever the new bands hold, they carry zero weight
    series = torch.stack([rgb[:, :, 2], rgb[:, :, 1], extra[:, :, 0], rgb[:, :, 0], extra[:, :, 1]], dim=2)
    torch.testing.assert_close(outputs(model, series), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_channels = 5"):
        outputs(model, rgb.flatten(1, 2))  # the 3-band input no longer fits


def test_masked_image_modelling_predicts_the_shared_bands_as_before():
    torch.manual_seed(0)
    model = TiMoForMaskedImageModeling(TiMoConfig(**TINY)).eval()
    noise = torch.linspace(0, 1, 8).expand(2, 8)
    rgb = torch.randn(2, 2, 3, 64, 64)
    with torch.no_grad():
        before = model(rgb, noise=noise).reconstruction
    adapt_input_bands(model, PRETRAINED, ["B2", "B3", "B8", "B4"], new_band_weights="random")
    assert model.timo.config.num_channels == 4 and model.decoder.prediction.out_features == 32 * 32 * 4
    series = torch.stack([rgb[:, :, 2], rgb[:, :, 1], torch.zeros_like(rgb[:, :, 0]), rgb[:, :, 0]], dim=2)
    with torch.no_grad():
        after = model(series, noise=noise).reconstruction
    for band, old_band in ((0, 2), (1, 1), (3, 0)):  # B2, B3, B4
        torch.testing.assert_close(after[:, :, band], before[:, :, old_band], rtol=1e-5, atol=1e-5)
    assert after[:, :, 2].abs().mean() > 0.01  # B8 comes from fresh prediction weights (zeros would give 0)


def test_weights_kept_dropped_and_initialised():
    torch.manual_seed(0)
    model = TiMoModel(TiMoConfig(**{**TINY, "num_channels": 4}))
    weight = model.get_input_embeddings().conv1.weight.detach().clone()

    report = adapt_input_bands(model, ["B2", "B3", "B4", "B8"], ["B8", "B5", "B2"], new_band_weights="random")

    assert report.to_dict() == {"kept": ["B8", "B2"], "new": ["B5"], "dropped": ["B3", "B4"]}
    adapted = model.get_input_embeddings().conv1.weight
    assert torch.equal(adapted[:, 0], weight[:, 3]) and torch.equal(adapted[:, 2], weight[:, 0])
    fan_out_std = (2.0 / (7 * 7 * TINY["hidden_sizes"][0])) ** 0.5  # the stem's own initialisation
    assert 0.7 < adapted[:, 1].std().item() / fan_out_std < 1.3
    assert adapted.requires_grad and model.get_input_embeddings().conv1.bias is None


def test_adapted_model_saves_and_loads(tmp_path):
    model = TiMoModel(TiMoConfig(**TINY)).eval()
    adapt_input_bands(model, PRETRAINED, TARGET)
    model.save_pretrained(tmp_path)
    loaded = TiMoModel.from_pretrained(tmp_path).eval()
    assert loaded.config.num_channels == 5
    series = torch.randn(1, 2, 5, 64, 64)
    torch.testing.assert_close(outputs(loaded, series), outputs(model, series), rtol=0, atol=0)


def test_bad_band_lists_are_refused():
    model = TiMoModel(TiMoConfig(**TINY))
    with pytest.raises(ValueError, match=r"lists 2 bands .* config.num_channels = 3"):
        adapt_input_bands(model, ["B4", "B3"], TARGET)
    with pytest.raises(ValueError, match=r"band_names names a band more than once: \['B4'\]"):
        adapt_input_bands(model, PRETRAINED, ["B4", "B04"])
    with pytest.raises(ValueError, match="non-empty list"):
        adapt_input_bands(model, PRETRAINED, "B4")
    with pytest.raises(ValueError, match="share no band with pretrained_bands"):
        adapt_input_bands(model, PRETRAINED, ["VV", "VH"])
    with pytest.raises(ValueError, match="new_band_weights must be one of"):
        adapt_input_bands(model, PRETRAINED, TARGET, new_band_weights="mean")
    assert model.config.num_channels == 3 and model.get_input_embeddings().conv1.in_channels == 3
