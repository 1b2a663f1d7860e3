"""TiMo masked image modelling: the Hiera/MAE-style pre-training objective of the official code, generalised.

Data flow: `pixel_values [B, T, C, H, W]` is cut into mask units of `mask_unit_size` pixels
(`L = T * (H / unit) * (W / unit)` units per sample, ordered frame, then row, then column); `mask_ratio` of them are
masked, drawn jointly over all frames. The pixels of masked units are zeroed and the stem runs on the full frames;
from stage 1 on only the visible units are carried: their tokens attend to each other with MHSA in every stage,
and each unit is downsampled on its own (zero padding at unit borders), so a 32-px unit ends as one token. The
decoder puts a learned mask token in every masked slot, adds a sin-cos position encoding of the unit grid, runs
MHSA blocks and predicts the `unit * unit * C` pixels of every unit; the loss is the MSE on the masked units.
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_timo import TiMoConfig
from .frame_masks import check_frame_mask
from .modeling_timo import (
    UNSUPPORTED_OUTPUTS,
    TiMoLayer,
    TiMoModel,
    TiMoPositionEncoding,
    TiMoPreTrainedModel,
    as_frames,
    check_extra_kwargs,
    check_inputs,
)


# Masked image modelling does not return stage maps either: from stage 1 on its encoder carries the visible units only.
MIM_UNSUPPORTED_OUTPUTS = {
    **UNSUPPORTED_OUTPUTS,
    "output_hidden_states": "its encoder carries the visible mask units only, not maps (TiMoModel returns them)",
}
# Added to the variance before the square root when normalising the reconstruction target (as MAE).
TARGET_NORMALIZATION_EPS = 1e-6


@dataclass
class TiMoMaskedImageModelingOutput(ModelOutput):
    r"""
    Output of [`TiMoForMaskedImageModeling`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Mean squared error between the predicted and the target pixels of the masked units.
        reconstruction (`torch.FloatTensor` of shape `(batch_size, num_frames, num_channels, height, width)`):
            The predicted pixels of every unit (masked and visible) in image layout, in the space of the target
            (`config.mim_target_normalization`: per-unit normalised by default).
        logits (`torch.FloatTensor` of shape `(batch_size, num_units, num_channels * unit * unit)`):
            The same predictions per unit, each flattened channel-first `(c, y, x)`.
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_units)`):
            The mask that was used, `True` = masked, units ordered frame, then row, then column.
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_visible_units, hidden_sizes[-1])`):
            The encoder's token of every visible unit (after the last stage norm), in ascending unit order.
    """

    loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    bool_masked_pos: torch.BoolTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


def unit_grid(height: int, width: int, unit_size: int) -> tuple[int, int]:
    """Number of mask units along the rows and the columns of a frame; both sides must be multiples of the unit."""
    if height % unit_size or width % unit_size:
        raise ValueError(
            f"Masked image modelling needs frames whose height and width are multiples of config.mask_unit_size = "
            f"{unit_size}, got {height}x{width}; crop or resize the inputs (or change mask_unit_size)."
        )
    return height // unit_size, width // unit_size


def random_unit_mask(
    batch_size: int, num_units: int, mask_ratio: float, noise: torch.Tensor | None = None, device=None
) -> torch.BoolTensor:
    """Mask `[batch, num_units]` (`True` = masked) keeping the `int(num_units * (1 - mask_ratio))` units with the
    smallest `noise` (uniform by default), drawn jointly over all frames of a sample, as the official code."""
    num_visible = int(num_units * (1 - mask_ratio))
    if not 0 < num_visible < num_units:
        raise ValueError(
            f"mask_ratio {mask_ratio} leaves {num_visible} of {num_units} mask units visible; masked image modelling "
            "needs at least one visible and one masked unit per sample (lower mask_ratio or use larger inputs)."
        )
    if noise is None:
        noise = torch.rand(batch_size, num_units, device=device)
    elif tuple(noise.shape) != (batch_size, num_units):
        raise ValueError(
            f"noise must have shape [batch, num_units] = {(batch_size, num_units)}, got {tuple(noise.shape)}."
        )
    keep = noise.argsort(dim=1)[:, :num_visible]
    mask = torch.ones(batch_size, num_units, dtype=torch.bool, device=noise.device)
    return mask.scatter(1, keep, False)


def check_unit_mask(bool_masked_pos: torch.Tensor, batch_size: int, num_units: int) -> torch.BoolTensor:
    """Validate a user mask: shape `[batch, num_units]`, the same number of visible units in every sample, and at
    least one visible and one masked unit."""
    if tuple(bool_masked_pos.shape) != (batch_size, num_units):
        raise ValueError(
            f"bool_masked_pos must have shape [batch, T * units_per_frame] = {(batch_size, num_units)} "
            f"(True = masked, units ordered frame, row, column), got {tuple(bool_masked_pos.shape)}."
        )
    bool_masked_pos = bool_masked_pos.bool()
    visible = (~bool_masked_pos).sum(dim=1)
    if (visible != visible[0]).any():
        raise ValueError(
            f"bool_masked_pos must leave the same number of visible units in every sample (the encoder batches "
            f"them), got {visible.tolist()}."
        )
    if int(visible[0]) == 0 or int(visible[0]) == num_units:
        raise ValueError(
            f"bool_masked_pos leaves {int(visible[0])} of {num_units} units visible; at least one visible and one "
            "masked unit per sample are needed."
        )
    return bool_masked_pos


def patchify_units(pixel_values: torch.Tensor, unit_size: int) -> torch.Tensor:
    """`[B, T, C, H, W]` -> `[B, T * rows * cols, C * unit * unit]`, each unit flattened channel-first `(c, y, x)`."""
    batch_size, num_frames, channels, height, width = pixel_values.shape
    rows, cols = height // unit_size, width // unit_size
    units = pixel_values.reshape(batch_size, num_frames, channels, rows, unit_size, cols, unit_size)
    units = units.permute(0, 1, 3, 5, 2, 4, 6)
    return units.reshape(batch_size, num_frames * rows * cols, channels * unit_size * unit_size)


def unpatchify_units(units: torch.Tensor, num_frames: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `patchify_units`: `[B, L, C * unit * unit]` -> `[B, T, C, H, W]`."""
    batch_size, num_units, size = units.shape
    unit_size = int(round((size // channels) ** 0.5))
    rows, cols = height // unit_size, width // unit_size
    frames = units.reshape(batch_size, num_frames, rows, cols, channels, unit_size, unit_size)
    return frames.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch_size, num_frames, channels, height, width)


def zero_masked_pixels(pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Multiply the pixels of masked units by 0 (the official masking, before the stem)."""
    batch_size, num_frames, channels, height, width = pixel_values.shape
    rows, cols = height // unit_size, width // unit_size
    keep = (~bool_masked_pos).view(batch_size, num_frames, 1, rows, 1, cols, 1).to(pixel_values.dtype)
    units = pixel_values.reshape(batch_size, num_frames, channels, rows, unit_size, cols, unit_size)
    return (units * keep).view_as(pixel_values)


def encode_visible_units(
    timo: TiMoModel,
    pixel_values: torch.Tensor,
    ids_keep: torch.Tensor,
    unit_size: int,
    temporal_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparse encoder of pre-training: one token per visible unit, `[B, K, hidden_sizes[-1]]`.

    `pixel_values` already has its masked units zeroed; `ids_keep [B, K]` lists the visible units in ascending
    order. The stem and the position encoding run on the full frames; from stage 1 on only the `K` visible units
    exist, every block attends over all visible tokens of the sample (the stages must be MHSA), and every unit is
    downsampled as its own small map, so attention and MLP cost scale with the visible fraction.
    """
    batch_size, num_frames, _, height, width = pixel_values.shape
    rows, cols = height // unit_size, width // unit_size
    side = unit_size // 4  # stage-1 tokens per unit side (stem stride 4)
    tokens, _, _ = timo.embeddings(pixel_values, temporal_positions)
    channels = tokens.shape[-1]
    tokens = tokens.view(batch_size, num_frames, rows, side, cols, side, channels).permute(0, 1, 2, 4, 3, 5, 6)
    tokens = tokens.reshape(batch_size, num_frames * rows * cols, side * side, channels)
    num_visible = ids_keep.shape[1]
    tokens = tokens.gather(1, ids_keep[:, :, None, None].expand(-1, -1, side * side, channels))
    hidden_states = tokens.reshape(batch_size, num_visible * side * side, channels)
    for stage in timo.encoder.stages:
        if stage.downsample is not None:
            unit_maps = hidden_states.reshape(batch_size * num_visible, side, side, -1).permute(0, 3, 1, 2)
            tokens, side, _ = stage.downsample(unit_maps.contiguous())
            hidden_states = tokens.reshape(batch_size, num_visible * side * side, -1)
        # MHSA ignores the frame structure: all visible tokens of a sample form one sequence.
        hidden_states = stage(hidden_states, 1)
    # A unit larger than the encoder's total stride ends as several tokens: average them into one.
    return hidden_states.view(batch_size, num_visible, side * side, -1).mean(dim=2)


def encode_units_densely(
    timo: TiMoModel,
    pixel_values: torch.Tensor,
    ids_keep: torch.Tensor,
    unit_size: int,
    temporal_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense encoder (`mim_encoder_attention="as_configured"`, an experiment): the configured attention types run
    over the whole zero-masked image; the last stage map is pooled to the unit grid and the visible units taken."""
    batch_size, num_frames, _, height, width = pixel_values.shape
    rows, cols = height // unit_size, width // unit_size
    last = timo.compute_feature_maps(pixel_values, temporal_positions)[-1]
    units = F.adaptive_avg_pool2d(last, (rows, cols))
    units = units.reshape(batch_size, num_frames, -1, rows * cols).permute(0, 1, 3, 2).flatten(1, 2)
    return units.gather(1, ids_keep[:, :, None].expand(-1, -1, units.shape[-1]))


def normalize_targets(target: torch.Tensor, bool_masked_pos: torch.Tensor, mode: str) -> torch.Tensor:
    """Targets of the masked units, `[num_masked, C * unit * unit]`, normalised as `mode` says.

    `"per_unit"`: each unit by its own mean and (unbiased) variance; `"batch"`: the official code's quirk, one mean
    and variance over all masked pixels of the batch; `"none"`: unchanged.
    """
    if mode == "per_unit":
        mean = target.mean(dim=-1, keepdim=True)
        target = (target - mean) / (target.var(dim=-1, keepdim=True) + TARGET_NORMALIZATION_EPS).sqrt()
    target = target[bool_masked_pos]
    if mode == "batch":
        target = (target - target.mean()) / (target.var() + TARGET_NORMALIZATION_EPS).sqrt()
    return target


class TiMoMaskedImageModelingDecoder(nn.Module):
    """Unit tokens -> pixels: embed the visible tokens, fill masked slots with the mask token, add the unit-grid
    sin-cos encoding (temporal half from the frame positions, spatial half on the unit grid), MHSA blocks, norm,
    and a linear prediction of the `unit * unit * C` pixels of every unit."""

    def __init__(self, config: TiMoConfig):
        super().__init__()
        width = config.mim_decoder_hidden_size
        self.embed = nn.Linear(config.hidden_sizes[-1], width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position_encoding = TiMoPositionEncoding(config, dim=width, embedding_type="temporal_spatial")
        self.layers = nn.ModuleList(
            TiMoLayer(
                config,
                width,
                config.mim_decoder_num_heads,
                "mhsa",
                config.drop_path_rate,
                mlp_ratio=config.mim_decoder_mlp_ratio,
            )
            for _ in range(config.mim_decoder_depth)
        )
        self.layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.prediction = nn.Linear(width, config.mask_unit_size**2 * config.num_channels)

    def forward(
        self, visible: torch.Tensor, ids_keep: torch.Tensor, temporal_positions: torch.Tensor, rows: int, cols: int
    ) -> torch.Tensor:
        """`visible [B, K, C4]` at units `ids_keep [B, K]` -> predictions `[B, T * rows * cols, unit^2 * C]`."""
        batch_size, num_frames = temporal_positions.shape
        hidden_states = self.embed(visible)
        width = hidden_states.shape[-1]
        slots = self.mask_token.to(hidden_states.dtype).expand(batch_size, num_frames * rows * cols, width)
        hidden_states = slots.scatter(1, ids_keep[:, :, None].expand(-1, -1, width), hidden_states)
        encoding = self.position_encoding(temporal_positions, rows, cols)
        hidden_states = hidden_states + encoding.reshape(batch_size, -1, width).to(hidden_states.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, 1)
        return self.prediction(self.layernorm(hidden_states))


class TiMoForMaskedImageModeling(TiMoPreTrainedModel):
    """TiMo with the masked-image-modelling decoder, for (continued) pre-training on any SITS corpus.

    `config.attention_types` describes the fine-tuning model; with the default `mim_encoder_attention="mhsa"` the
    encoder of this model uses MHSA in every stage (official), so it has no D-STGA offset branch: a fine-tuning model
    loaded from its checkpoint (`TiMoModel.from_pretrained`, the task heads) gets every shared weight and reports
    only those offset branches as newly initialised. The encoder weights live under `timo.` as in every TiMo model.
    """

    def __init__(self, config: TiMoConfig):
        super().__init__(config)
        encoder_config = config
        if config.mim_encoder_attention == "mhsa":
            encoder_config = copy.deepcopy(config)
            encoder_config.attention_types = ["mhsa"] * len(config.depths)
        self.timo = TiMoModel(encoder_config)
        self.decoder = TiMoMaskedImageModelingDecoder(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TiMoMaskedImageModelingDecoder):
            init.zeros_(module.mask_token)  # official: zeros

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        temporal_positions: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> TiMoMaskedImageModelingOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_frames, num_channels, height, width)`):
                Normalised time series (any `T >= 1`); `height` and `width` must be multiples of
                `config.mask_unit_size`. The flattened `(batch_size, num_frames * num_channels, height, width)` is
                accepted too.
            bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_units)`, *optional*):
                `True` = masked; `num_units = T * (H / unit) * (W / unit)`, ordered frame, then row, then column.
                Every sample must leave the same number of units visible. Drawn with `config.mask_ratio` when
                omitted.
            noise (`torch.FloatTensor` of shape `(batch_size, num_units)`, *optional*):
                Scores for drawing the mask reproducibly (the units with the smallest values stay visible); ignored
                when `bool_masked_pos` is given.
            temporal_positions (`torch.FloatTensor` of shape `(batch_size, num_frames)`, *optional*):
                Temporal coordinate of each frame for the encoder's and the decoder's position encodings (frame
                index by default).
            frame_mask (`torch.BoolTensor` of shape `(batch_size, num_frames)`, *optional*):
                Accepted where it keeps every frame (a processor's batch of equal lengths); masked image modelling
                reconstructs whole series, so a mask that leaves frames out is refused.

        Returns:
            [`TiMoMaskedImageModelingOutput`].

        Example:

        ```python
        >>> import torch
        >>> from timo_hf import TiMoConfig, TiMoForMaskedImageModeling
        >>> config = TiMoConfig(hidden_sizes=[32, 64, 128, 256], num_heads=[2, 4, 8, 16], depths=[1, 1, 1, 1],
        ...                     mim_decoder_hidden_size=64, mim_decoder_depth=1, mim_decoder_num_heads=4)
        >>> outputs = TiMoForMaskedImageModeling(config)(torch.rand(2, 3, 3, 64, 64))
        >>> tuple(outputs.reconstruction.shape), tuple(outputs.bool_masked_pos.shape)
        ((2, 3, 3, 64, 64), (2, 12))
        ```
        """
        check_extra_kwargs(type(self).__name__, kwargs, MIM_UNSUPPORTED_OUTPUTS)
        config = self.config
        pixel_values = as_frames(pixel_values, config.num_channels)
        check_inputs(pixel_values, temporal_positions, config)
        if check_frame_mask(frame_mask, pixel_values) is not None:
            raise ValueError(
                "TiMoForMaskedImageModeling reconstructs whole series: frame_mask leaves frames out; pre-train on "
                "series of equal lengths (TiMoImageProcessor with num_frames and temporal_sampling)."
            )
        batch_size, num_frames, channels, height, width = pixel_values.shape
        unit_size = config.mask_unit_size
        rows, cols = unit_grid(height, width, unit_size)
        num_units = num_frames * rows * cols
        if bool_masked_pos is None:
            bool_masked_pos = random_unit_mask(
                batch_size, num_units, config.mask_ratio, noise=noise, device=pixel_values.device
            )
        else:
            bool_masked_pos = check_unit_mask(bool_masked_pos.to(pixel_values.device), batch_size, num_units)
        num_visible = num_units - int(bool_masked_pos[0].sum())
        ids_keep = (~bool_masked_pos).nonzero()[:, 1].view(batch_size, num_visible)

        masked_pixels = zero_masked_pixels(pixel_values, bool_masked_pos, unit_size)
        encode = encode_visible_units if config.mim_encoder_attention == "mhsa" else encode_units_densely
        latent = encode(self.timo, masked_pixels, ids_keep, unit_size, temporal_positions)

        if temporal_positions is None:
            temporal_positions = torch.arange(num_frames, device=latent.device, dtype=torch.float32)
            temporal_positions = temporal_positions.expand(batch_size, num_frames)
        logits = self.decoder(latent, ids_keep, temporal_positions, rows, cols)

        target = normalize_targets(
            patchify_units(pixel_values, unit_size).float(), bool_masked_pos, config.mim_target_normalization
        )
        loss = F.mse_loss(logits[bool_masked_pos].float(), target)
        return TiMoMaskedImageModelingOutput(
            loss=loss,
            reconstruction=unpatchify_units(logits, num_frames, channels, height, width),
            logits=logits,
            bool_masked_pos=bool_masked_pos,
            last_hidden_state=latent,
        )


__all__ = ["TiMoForMaskedImageModeling", "TiMoMaskedImageModelingOutput"]
