"""Carry a pre-trained TiMo over to another set of spectral bands, band by band.

The official fine-tuning code drops the stem convolution whenever the band count differs from the pre-training's,
so a model pre-trained on RGB and fine-tuned on 10 Sentinel-2 bands loses its pre-trained first layer. Matched by
name instead, the bands both sets share keep their pre-trained filters, bands the model never saw start at zero
(the adapted model then responds to the shared bands exactly as before) or at the model's own initialisation, and
bands the new set lacks are dropped. The input layers are the stem convolution and, in a masked-image-modelling
model, the decoder's pixel prediction (one row per channel, row and column of a unit).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from .image_processing_timo import canonical_band


NEW_BAND_WEIGHTS = ("zeros", "random")


@dataclass(frozen=True)
class BandAdaptation:
    """What `adapt_input_bands` did: the bands whose pre-trained weights were kept, those newly initialised and the
    pre-trained ones dropped, each in the order of the list they come from."""

    kept: tuple[str, ...]
    new: tuple[str, ...]
    dropped: tuple[str, ...]

    def to_dict(self) -> dict[str, list[str]]:
        return {"kept": list(self.kept), "new": list(self.new), "dropped": list(self.dropped)}


def _checked_names(names, what: str) -> list[str]:
    if isinstance(names, str) or not names:
        raise ValueError(f"{what} must be a non-empty list of band names, got {names!r}.")
    canonical = [canonical_band(name) for name in names]
    repeated = sorted({name for name in canonical if canonical.count(name) > 1})
    if repeated:
        raise ValueError(f"{what} names a band more than once: {repeated} (in {list(names)}).")
    return canonical


def _remap_rows(old: torch.Tensor, fresh: torch.Tensor, sources: list[int | None], zero_new: bool) -> torch.Tensor:
    """`fresh` (`[C', k, ...]`, the layer's own initialisation) with channel `i` replaced by `old[sources[i]]` where
    that band was pre-trained, and zeroed where it is new and `zero_new`."""
    rows = []
    for index, source in enumerate(sources):
        if source is not None:
            rows.append(old[source])
        else:
            rows.append(torch.zeros_like(fresh[index]) if zero_new else fresh[index])
    return torch.stack(rows)


def adapt_input_bands(
    model: PreTrainedModel, pretrained_bands, band_names, new_band_weights: str = "zeros"
) -> BandAdaptation:
    """Re-shape `model`'s input layers in place from the bands it was pre-trained on to `band_names`.

    Args:
        model: any TiMo model (`TiMoModel`, `TiMoBackbone`, a task head or `TiMoForMaskedImageModeling`) whose
            `config.num_channels` equals `len(pretrained_bands)`.
        pretrained_bands: the model's bands in the order its stem expects them (e.g. `["B4", "B3", "B2"]` for the
            official pre-training); names are matched case-insensitively with leading zeros ignored (`B04` = `B4`).
        band_names: the bands of the new inputs, in their order.
        new_band_weights: `"zeros"` (bands absent from the pre-training start with zero weights, so the adapted
            model's outputs on the shared bands are those of the pre-trained model) or `"random"` (the model's
            own initialisation for them).

    Returns:
        A `BandAdaptation` naming the kept, new and dropped bands. `config.num_channels` of the model (and of the
        models it wraps) becomes `len(band_names)`.
    """
    if new_band_weights not in NEW_BAND_WEIGHTS:
        raise ValueError(f"new_band_weights must be one of {NEW_BAND_WEIGHTS}, got {new_band_weights!r}.")
    source = _checked_names(pretrained_bands, "pretrained_bands")
    target = _checked_names(band_names, "band_names")
    if len(source) != model.config.num_channels:
        raise ValueError(
            f"pretrained_bands lists {len(source)} bands ({list(pretrained_bands)}) but the model takes "
            f"config.num_channels = {model.config.num_channels}."
        )
    sources = [source.index(name) if name in source else None for name in target]
    if all(index is None for index in sources):
        raise ValueError(f"band_names {list(band_names)} share no band with pretrained_bands {list(pretrained_bands)}: "
                         "there is nothing to carry over (initialise a new stem instead).")
    zero_new = new_band_weights == "zeros"

    stem = model.get_input_embeddings().conv1
    conv = nn.Conv2d(len(target), stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False)
    conv.to(device=stem.weight.device, dtype=stem.weight.dtype)
    model._init_weights(conv)
    with torch.no_grad():
        weight = _remap_rows(stem.weight.transpose(0, 1), conv.weight.transpose(0, 1), sources, zero_new)
        conv.weight.copy_(weight.transpose(0, 1))
    conv.weight.requires_grad_(stem.weight.requires_grad)
    model.get_input_embeddings().conv1 = conv

    decoder = getattr(model, "decoder", None)
    if decoder is not None:  # TiMoForMaskedImageModeling predicts every channel of a unit
        _adapt_prediction(model, decoder, len(source), sources, zero_new)

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config.num_channels = len(target)
    return BandAdaptation(
        kept=tuple(band for band, index in zip(band_names, sources) if index is not None),
        new=tuple(band for band, index in zip(band_names, sources) if index is None),
        dropped=tuple(band for band, name in zip(pretrained_bands, source) if name not in target),
    )


def _adapt_prediction(model, decoder, num_source: int, sources: list[int | None], zero_new: bool) -> None:
    """The decoder's `Linear(width, C * unit * unit)`, outputs ordered (channel, row, column), for the new bands."""
    old = decoder.prediction
    per_channel = old.out_features // num_source
    fresh = nn.Linear(old.in_features, per_channel * len(sources))
    fresh.to(device=old.weight.device, dtype=old.weight.dtype)
    model._init_weights(fresh)
    with torch.no_grad():
        for name in ("weight", "bias"):
            previous = getattr(old, name).reshape(num_source, per_channel, -1)
            target = getattr(fresh, name)
            rows = _remap_rows(previous, target.reshape(len(sources), per_channel, -1), sources, zero_new)
            target.copy_(rows.reshape(target.shape))
    decoder.prediction = fresh
