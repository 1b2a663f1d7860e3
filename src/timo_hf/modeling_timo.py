"""PyTorch TiMo: a hierarchical spatiotemporal vision transformer for satellite image time series.

Data flow: `pixel_values [B, T, C, H, W]` -> per-frame convolutional stem (stride 4) + sin-cos position encoding
-> stage 1 blocks -> (3x3 stride-2 conv -> blocks) x 3. Tokens of a sample are ordered frame-major
(`t * N + row * w + col`); every stage ends with a LayerNorm and hands out a per-frame feature map.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .attention_timo import TiMoQueryOffset, dstga_reference, stga_reference, temporal_median
from .configuration_timo import TiMoConfig


MIN_INPUT_SIZE = 32


@dataclass
class TiMoModelOutput(ModelOutput):
    r"""
    Output of [`TiMoModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_frames, hidden_sizes[-1], h4, w4)`):
            Last stage feature map of every frame (after the stage LayerNorm).
        pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_sizes[-1])`):
            Mean of the last stage over frames and positions (what the official classifier pools).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
            The stem output (position encoding included) and every stage output, each
            `(batch_size, num_frames, channels, height, width)`, in `config.stage_names` order.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def as_frames(pixel_values: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Return `pixel_values` as `[B, T, C, H, W]`, accepting the flattened `[B, T*C, H, W]` of 4-D tooling.

    The 4-D form is read as frames of `num_channels` bands each, time-major (`t * C + c`).
    """
    if pixel_values.dim() == 5:
        return pixel_values
    if pixel_values.dim() == 4 and pixel_values.shape[1] % num_channels == 0:
        batch_size, stacked, height, width = pixel_values.shape
        return pixel_values.view(batch_size, stacked // num_channels, num_channels, height, width)
    raise ValueError(
        f"pixel_values must be [batch, time, channels, height, width] (or [batch, time*channels, height, width] "
        f"with channels = config.num_channels = {num_channels}), got shape {tuple(pixel_values.shape)}."
    )


def check_inputs(
    pixel_values: torch.Tensor, temporal_positions: torch.Tensor | None, config: TiMoConfig
) -> None:
    """Raise a ValueError naming the argument, what was expected and what was received."""
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be a floating-point tensor (normalised reflectances), got dtype {pixel_values.dtype}; "
            "convert it with .float() after normalisation."
        )
    batch_size, num_frames, num_channels, height, width = pixel_values.shape
    if num_frames < 1:
        raise ValueError(f"pixel_values must hold at least one frame, got shape {tuple(pixel_values.shape)}.")
    if num_channels != config.num_channels:
        raise ValueError(
            f"pixel_values has {num_channels} channels (shape {tuple(pixel_values.shape)}) but the model expects "
            f"config.num_channels = {config.num_channels}."
        )
    if height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE:
        raise ValueError(
            f"pixel_values frames must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, got {height}x{width} "
            f"(shape {tuple(pixel_values.shape)})."
        )
    if temporal_positions is not None and tuple(temporal_positions.shape) != (batch_size, num_frames):
        raise ValueError(
            f"temporal_positions must have shape [batch, time] = {(batch_size, num_frames)} to match pixel_values "
            f"{tuple(pixel_values.shape)}, got {tuple(temporal_positions.shape)}."
        )
    if config.check_finite_inputs and not torch.isfinite(pixel_values).all():
        raise ValueError(
            "pixel_values contains NaN or inf values; fill nodata before the model (TiMoImageProcessor does)."
        )


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """MAE-style 1-D sin-cos encoding `[sin(p * omega), cos(p * omega)]`, `omega_k = 10000^(-k / (dim / 2))`.

    Computed in the dtype of `positions`; the result has shape `positions.shape + (dim,)`.
    """
    omega = torch.arange(dim // 2, dtype=positions.dtype, device=positions.device)
    omega = 1.0 / 10000 ** (omega / (dim / 2.0))
    angles = positions.unsqueeze(-1) * omega
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def spatial_sincos(height: int, width: int, dim: int, device: torch.device) -> torch.Tensor:
    """`[height * width, dim]` 2-D encoding: first half encodes the column, second half the row (MAE layout).

    Computed in float64 and rounded to float32, as the official model does.
    """
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=device),
        torch.arange(width, dtype=torch.float64, device=device),
        indexing="ij",
    )
    encoding = torch.cat([sincos_1d(cols.reshape(-1), dim // 2), sincos_1d(rows.reshape(-1), dim // 2)], dim=-1)
    return encoding.float()


class TiMoPositionEncoding(nn.Module):
    """Fixed sin-cos encoding added to the stem tokens (stage 1 only).

    `"temporal_spatial"`: the first half of the channels encodes the temporal position of the frame (frame index
    0..T-1 by default, or `temporal_positions`, e.g. days since the first acquisition), the second half the grid
    position. `"spatial"`: all channels encode the grid position. The values carry float32 precision whatever the
    model dtype (the temporal half is computed in float32, the spatial half rounded to float32), as official.
    `dim` and `embedding_type` default to the stem's (the masked-image-modelling decoder passes its own).
    """

    def __init__(self, config: TiMoConfig, dim: int | None = None, embedding_type: str | None = None):
        super().__init__()
        self.embedding_type = embedding_type or config.position_embedding_type
        self.dim = dim or config.hidden_sizes[0]

    def forward(self, temporal_positions: torch.Tensor, height: int, width: int) -> torch.Tensor | None:
        """Encoding of shape `[B, T, height * width, dim]` (broadcastable), or `None` when disabled."""
        if self.embedding_type == "none":
            return None
        device = temporal_positions.device
        if self.embedding_type == "spatial":
            return spatial_sincos(height, width, self.dim, device)[None, None]
        half = self.dim // 2
        temporal = sincos_1d(temporal_positions.float(), half)
        spatial = spatial_sincos(height, width, half, device)
        batch_size, num_frames = temporal_positions.shape
        return torch.cat(
            [
                temporal[:, :, None, :].expand(batch_size, num_frames, height * width, half),
                spatial[None, None].expand(batch_size, num_frames, height * width, half),
            ],
            dim=-1,
        )


class TiMoStemEmbeddings(nn.Module):
    """Stage-1 patch embedding: 7x7/2 conv (no bias) -> BatchNorm -> ReLU -> 2x2/2 conv -> LayerNorm, stride 4."""

    def __init__(self, config: TiMoConfig):
        super().__init__()
        width = config.hidden_sizes[0]
        self.conv1 = nn.Conv2d(config.num_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.batch_norm = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=2, stride=2)
        self.layernorm = nn.LayerNorm(width, eps=config.embedding_layer_norm_eps)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """`[frames, C, H, W]` -> tokens `[frames, h * w, width]` and the grid `(h, w)`."""
        feature_map = self.conv2(F.relu(self.batch_norm(self.conv1(frames))))
        height, width = feature_map.shape[-2:]
        return self.layernorm(feature_map.flatten(2).transpose(1, 2)), height, width


class TiMoPatchMerging(nn.Module):
    """Downsampling between stages: 3x3 stride-2 conv (padding 1) -> LayerNorm."""

    def __init__(self, config: TiMoConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.projection = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.layernorm = nn.LayerNorm(out_channels, eps=config.embedding_layer_norm_eps)

    def forward(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """`[frames, C_in, h, w]` -> tokens `[frames, h' * w', C_out]` and the grid `(h', w')`."""
        feature_map = self.projection(feature_map)
        height, width = feature_map.shape[-2:]
        return self.layernorm(feature_map.flatten(2).transpose(1, 2)), height, width


class TiMoEmbeddings(nn.Module):
    """Stem + position encoding: `[B, T, C, H, W]` -> stage-1 tokens `[B, T * h * w, C1]` (frame-major)."""

    def __init__(self, config: TiMoConfig):
        super().__init__()
        self.stem = TiMoStemEmbeddings(config)
        self.position_encoding = TiMoPositionEncoding(config)

    def forward(
        self, pixel_values: torch.Tensor, temporal_positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, int, int]:
        batch_size, num_frames = pixel_values.shape[:2]
        tokens, height, width = self.stem(pixel_values.flatten(0, 1))
        tokens = tokens.view(batch_size, num_frames, height * width, -1)
        if temporal_positions is None:
            temporal_positions = torch.arange(num_frames, device=tokens.device, dtype=torch.float32)
            temporal_positions = temporal_positions.expand(batch_size, num_frames)
        encoding = self.position_encoding(temporal_positions, height, width)
        if encoding is not None:
            tokens = tokens + encoding.to(tokens.dtype)
        return tokens.flatten(1, 2), height, width


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; returns `[B, L, heads, head_dim]` and the weights."""
    weights = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = weights.softmax(dim=-1)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


class TiMoAttention(nn.Module):
    """Multi-head attention of one block: `"mhsa"`, `"stga"` or `"dstga"` (see the configuration docstring).

    MHSA goes through transformers' attention interface (SDPA by default), so the `(T*N)^2` matrix is never
    materialised by this module. STGA and D-STGA use the kernels of `attention_timo`.
    """

    def __init__(self, config: TiMoConfig, dim: int, num_heads: int, attention_type: str):
        super().__init__()
        self.config = config
        self.attention_type = attention_type
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.query = nn.Linear(dim, dim, bias=config.qkv_bias)
        # Keys and values packed as [K; V], head-major inside each.
        self.key_value = nn.Linear(dim, 2 * dim, bias=config.qkv_bias)
        self.projection = nn.Linear(dim, dim)
        self.query_offset = TiMoQueryOffset(self.head_dim) if attention_type == "dstga" else None

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        batch_size, length, dim = hidden_states.shape
        query = self.query(hidden_states).view(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)
        key, value = (
            self.key_value(hidden_states)
            .view(batch_size, length, 2, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        if self.attention_type == "mhsa":
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            output, _ = attention_interface(self, query, key, value, None, scaling=self.scaling, dropout=0.0)
        else:
            frames = (batch_size, self.num_heads, num_frames, length // num_frames, self.head_dim)
            query, key, value = query.reshape(frames), key.reshape(frames), value.reshape(frames)
            if self.attention_type == "stga":
                output = stga_reference(query, key, value)
            else:
                query_median = temporal_median(query)
                offset = self.query_offset(query, query_median)
                output = dstga_reference(query, key, value, offset, query_median)
            output = output.flatten(2, 3).transpose(1, 2)
        return self.projection(output.reshape(batch_size, length, dim))


class TiMoDropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability `drop_prob` in training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(shape).bernoulli_(keep_prob)
        return hidden_states * mask / keep_prob

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class TiMoMLP(nn.Module):
    def __init__(self, config: TiMoConfig, dim: int, mlp_ratio: float | None = None):
        super().__init__()
        hidden = int(dim * (config.mlp_ratio if mlp_ratio is None else mlp_ratio))
        self.fc1 = nn.Linear(dim, hidden)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class TiMoLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: `x + DropPath(attn(LN(x)))`, then `x + DropPath(mlp(LN(x)))`."""

    def __init__(
        self,
        config: TiMoConfig,
        dim: int,
        num_heads: int,
        attention_type: str,
        drop_path: float,
        mlp_ratio: float | None = None,
    ):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = TiMoAttention(config, dim, num_heads, attention_type)
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = TiMoMLP(config, dim, mlp_ratio)
        self.drop_path = TiMoDropPath(drop_path)

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        hidden_states = hidden_states + self.drop_path(self.attention(self.layernorm_before(hidden_states), num_frames))
        return hidden_states + self.drop_path(self.mlp(self.layernorm_after(hidden_states)))


class TiMoStage(nn.Module):
    """One resolution level: optional downsampling (stages 2-4), `depth` blocks, and the stage LayerNorm."""

    def __init__(self, config: TiMoConfig, stage_index: int, drop_paths: list[float]):
        super().__init__()
        dim = config.hidden_sizes[stage_index]
        self.downsample = (
            TiMoPatchMerging(config, config.hidden_sizes[stage_index - 1], dim) if stage_index > 0 else None
        )
        self.layers = nn.ModuleList(
            TiMoLayer(config, dim, config.num_heads[stage_index], config.attention_types[stage_index], rate)
            for rate in drop_paths
        )
        self.layernorm = nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Tokens `[B, T * N, C]` in and out (downsampling has already happened, see `TiMoEncoder`)."""
        for layer in self.layers:
            hidden_states = layer(hidden_states, num_frames)
        return self.layernorm(hidden_states)


def tokens_to_frames(tokens: torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
    """`[B, T * h * w, C]` -> per-frame feature maps `[B * T, C, h, w]` (frame index `b * T + t`)."""
    batch_size, _, channels = tokens.shape
    return tokens.reshape(batch_size * num_frames, height, width, channels).permute(0, 3, 1, 2)


def frames_to_tokens(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-frame tokens `[B * T, N, C]` -> sample tokens `[B, T * N, C]` (frame-major)."""
    return tokens.reshape(batch_size, -1, tokens.shape[-1])


class TiMoPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the transformers plumbing shared by every TiMo model."""

    config: TiMoConfig
    base_model_prefix = "timo"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["TiMoLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """Official initialisation: linear layers truncated normal (std `initializer_range`), zero biases;
        convolutions normal with std `sqrt(2 / fan_out)`; norms ones and zeros."""
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class TiMoEncoder(nn.Module):
    """The four stages, with the hand-over between them: tokens -> per-frame map -> downsampling -> tokens."""

    def __init__(self, config: TiMoConfig):
        super().__init__()
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        bounds = [sum(config.depths[:i]) for i in range(len(config.depths) + 1)]
        self.stages = nn.ModuleList(
            TiMoStage(config, index, rates[bounds[index] : bounds[index + 1]]) for index in range(len(config.depths))
        )

    def forward(
        self, hidden_states: torch.Tensor, num_frames: int, height: int, width: int
    ) -> list[torch.Tensor]:
        """Stage-1 tokens in; every stage's output as per-frame maps `[B * T, C, h, w]` out."""
        batch_size = hidden_states.shape[0]
        feature_maps = []
        for stage in self.stages:
            if stage.downsample is not None:
                tokens, height, width = stage.downsample(feature_maps[-1].contiguous())
                hidden_states = frames_to_tokens(tokens, batch_size)
            hidden_states = stage(hidden_states, num_frames)
            feature_maps.append(tokens_to_frames(hidden_states, num_frames, height, width))
        return feature_maps


def split_frames(feature_map: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`[B * T, C, h, w]` -> `[B, T, C, h, w]`."""
    return feature_map.reshape(batch_size, -1, *feature_map.shape[1:])


class TiMoModel(TiMoPreTrainedModel):
    """The bare TiMo encoder: per-frame multi-scale features of a satellite image time series."""

    def __init__(self, config: TiMoConfig):
        super().__init__(config)
        self.embeddings = TiMoEmbeddings(config)
        self.encoder = TiMoEncoder(config)
        self.post_init()

    def compute_feature_maps(
        self, pixel_values: torch.Tensor, temporal_positions: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Validate the inputs and return `[stem, stage1, ..., stage4]` maps, each `[B * T, C, h, w]`."""
        pixel_values = as_frames(pixel_values, self.config.num_channels)
        check_inputs(pixel_values, temporal_positions, self.config)
        batch_size, num_frames = pixel_values.shape[:2]
        tokens, height, width = self.embeddings(pixel_values, temporal_positions)
        stem = tokens_to_frames(tokens, num_frames, height, width)
        return [stem] + self.encoder(tokens, num_frames, height, width)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        temporal_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> TiMoModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_frames, num_channels, height, width)`):
                Normalised time series. `height` and `width` must be at least 32 and need not be equal nor
                multiples of 32. A flattened `(batch_size, num_frames * num_channels, height, width)` tensor
                (time-major) is accepted too.
            temporal_positions (`torch.FloatTensor` of shape `(batch_size, num_frames)`, *optional*):
                Temporal coordinate of each frame for the position encoding. Defaults to the frame index
                `0..T-1` (what the official model was trained with); acquisition offsets in days are the way to
                pass real dates.
            output_hidden_states (`bool`, *optional*): also return the stem and every stage map.

        Returns:
            [`TiMoModelOutput`]: `last_hidden_state` `(B, T, C4, h4, w4)`, `pooler_output` `(B, C4)` and
            optionally `hidden_states`.

        Example:

        ```python
        >>> import torch
        >>> from timo_hf import TiMoConfig, TiMoModel
        >>> model = TiMoModel(TiMoConfig(hidden_sizes=[32, 64, 128, 256], num_heads=[2, 4, 8, 16], depths=[1, 1, 1, 1]))
        >>> outputs = model(torch.randn(1, 3, 3, 64, 64))
        >>> tuple(outputs.last_hidden_state.shape), tuple(outputs.pooler_output.shape)
        ((1, 3, 256, 2, 2), (1, 256))
        ```
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        batch_size = pixel_values.shape[0]
        feature_maps = self.compute_feature_maps(pixel_values, temporal_positions)
        last = split_frames(feature_maps[-1], batch_size)
        return TiMoModelOutput(
            last_hidden_state=last,
            pooler_output=last.mean(dim=(1, 3, 4)),
            hidden_states=tuple(split_frames(f, batch_size) for f in feature_maps) if output_hidden_states else None,
        )


class TiMoBackbone(BackboneMixin, TiMoPreTrainedModel):
    """TiMo as a multi-scale backbone for dense heads (UperNet, FPN...).

    `feature_maps` are per-frame maps `[B * T, C, h, w]` in frame-major order (frame `b * T + t`), the layout of
    the official model and what 2-D decoders consume; `split_frames(map, B)` gives `[B, T, C, h, w]`. The
    selectable stages are `config.stage_names = ["stem", "stage1", ..., "stage4"]`.
    """

    has_attentions = False

    def __init__(self, config: TiMoConfig):
        super().__init__(config)
        self.timo = TiMoModel(config)
        self.num_features = [config.hidden_sizes[0]] + list(config.hidden_sizes)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        temporal_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BackboneOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_frames, num_channels, height, width)`):
                As for [`TiMoModel`], also flattened `(batch_size, num_frames * num_channels, height, width)`.
            temporal_positions (`torch.FloatTensor` of shape `(batch_size, num_frames)`, *optional*):
                As for [`TiMoModel`].
            output_hidden_states (`bool`, *optional*): also return every stage map.

        Returns:
            [`BackboneOutput`] with `feature_maps` for `config.out_features`, each `(B * T, C, h, w)`.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        all_maps = self.timo.compute_feature_maps(pixel_values, temporal_positions)
        feature_maps = tuple(all_maps[self.stage_names.index(name)] for name in self.out_features)
        return BackboneOutput(
            feature_maps=feature_maps, hidden_states=tuple(all_maps) if output_hidden_states else None
        )


__all__ = ["TiMoPreTrainedModel", "TiMoModel", "TiMoBackbone", "TiMoModelOutput"]
