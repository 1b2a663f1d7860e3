"""PyTorch TiMo: a hierarchical spatiotemporal vision transformer for satellite image time series.

Data flow: `pixel_values [B, T, C, H, W]` -> per-frame convolutional stem (stride 4) + sin-cos position encoding
-> stage 1 blocks -> (3x3 stride-2 conv -> blocks) x 3. Tokens of a sample are ordered frame-major
(`t * N + row * w + col`); every stage ends with a LayerNorm and hands out a per-frame feature map.
"""

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, ImageClassifierOutput, SemanticSegmenterOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils.generic import TransformersKwargs, can_return_tuple

from .attention_fast import STGA_IMPLEMENTATIONS
from .attention_timo import TiMoQueryOffset, recompute_marked, unpack
from .configuration_timo import TiMoConfig
from .frame_masks import check_frame_mask, frame_groups, mean_over_kept_frames, scatter_frames


MIN_INPUT_SIZE = 32
# Class labels the classification loss ignores: cross-entropy's default, and TiMoImageProcessor's padded frames.
CLASSIFICATION_IGNORE_INDEX = -100


@dataclass
class TiMoModelOutput(ModelOutput):
    r"""
    Output of [`TiMoModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_frames, hidden_sizes[-1], h4, w4)`):
            Last stage feature map of every frame (after the stage LayerNorm).
        pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_sizes[-1])`):
            Mean of the last stage over frames and positions (what the official classifier pools); over the kept
            frames only where a `frame_mask` leaves frames out.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
            The stem output (position encoding included) and every stage output, each
            `(batch_size, num_frames, channels, height, width)`, in `config.stage_names` order.
        frame_mask (`torch.BoolTensor` of shape `(batch_size, num_frames)`, *optional*):
            The `frame_mask` passed in, where it left frames out (zeros in the maps above), else `None`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    frame_mask: torch.BoolTensor | None = None


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
        """`[frames, C, H, W]` -> tokens `[frames, h * w, width]` and the grid `(h, w)`.

        Floating inputs of another dtype are cast to the model's (as transformers' ViT does): a processor's float32
        pixels then feed a model loaded in bfloat16 or float64. A float32 model under autocast keeps float32 pixels
        (autocast then chooses the precision)."""
        frames = frames.to(self.conv1.weight.dtype)
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
    materialised by this module. STGA and D-STGA use the kernels named by `config.stga_implementation`: `"fast"`
    (`attention_fast`, the default) or `"reference"` (`attention_timo`); the setting is read at every call, so it
    can be switched on a loaded model.
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
        attended = self.attend(self.query(hidden_states), self.key_value(hidden_states), num_frames)
        return self.projection(attended)

    def attend(self, query: torch.Tensor, key_value: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The attention between the projections: `query` `[B, T*N, C]` and packed `key_value` `[B, T*N, 2C]` in,
        `[B, T*N, C]` (the output projection's input) out."""
        batch_size, length, dim = query.shape
        query = query.view(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)
        # [2, B, heads, T*N, head_dim]: a view of the projection.
        key_value = key_value.view(batch_size, length, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.attention_type == "mhsa":
            key, value = unpack(key_value)
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            output, _ = attention_interface(self, query, key, value, None, scaling=self.scaling, dropout=0.0)
        else:
            frames = (batch_size, self.num_heads, num_frames, length // num_frames, self.head_dim)
            query, key_value = query.reshape(frames), key_value.reshape(2, *frames)
            kernels = STGA_IMPLEMENTATIONS[self.config.stga_implementation]
            # Packed: the fast kernels write the keys' and values' gradient in the projection's layout at once.
            if self.attention_type == "stga":
                output = kernels.stga_packed(query, key_value)
            else:
                output = kernels.dstga_with_offset(query, key_value, self.query_offset)
            # The fast kernels store their output token-major: this is a view of it.
            output = output.flatten(2, 3).transpose(1, 2)
        return output.reshape(batch_size, length, dim)


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
    _supports_flex_attn = False
    _supports_attention_backend = True

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint,
                                    every_n_layers: int = 1):
        """As transformers does, with the recomputation in backward marked, so that the D-STGA offset's BatchNorm
        does not update its running statistics twice per step (`attention_timo.recompute_marked`)."""
        super()._set_gradient_checkpointing(enable, recompute_marked(gradient_checkpointing_func), every_n_layers)

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

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; for classes registered for remote code (timo_hf registers them on
        import) the folder gets the TiMo module files and an `auto_map` naming every Auto class those files provide
        (config, bare model, backbone, heads), not only the saved class, so that any Auto class loads the folder
        with `trust_remote_code=True` where timo_hf is not installed."""
        wrapped_class = type(self)
        # FSDP2's fully_shard swaps in a generated subclass defined in torch; the folder must name (and ship) the
        # TiMo class, so save as that class.
        self.__class__ = next(cls for cls in wrapped_class.__mro__ if not cls.__module__.startswith("torch."))
        try:
            if self.is_remote_code() and type(self).__module__ != "__main__":
                self.config.auto_map = remote_code_auto_map(self)
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = wrapped_class


def _subclasses(cls: type):
    for subclass in cls.__subclasses__():
        yield subclass
        yield from _subclasses(subclass)


def remote_code_auto_map(model: PreTrainedModel) -> dict[str, str]:
    """`auto_map` for the folder `model` is saved to: every TiMo class registered for an Auto class whose module
    file `save_pretrained` copies (the model's module and its relative imports), e.g.
    `{"AutoConfig": "configuration_timo.TiMoConfig", "AutoModel": "modeling_timo.TiMoModel", ...}`."""
    # Every folder ships the masked-image-modelling module too (transformers copies the files of relative imports),
    # so that pre-training continues from any TiMo folder through AutoModelForMaskedImageModeling.
    from .modeling_timo_mim import TiMoForMaskedImageModeling  # noqa: F401

    module_file = sys.modules[type(model).__module__].__file__
    shipped = {Path(module_file).resolve()} | {Path(f).resolve() for f in get_relative_import_files(module_file)}
    auto_map = {}
    for cls in (type(model.config), *_subclasses(TiMoPreTrainedModel)):
        module = sys.modules.get(cls.__module__)
        file = getattr(module, "__file__", None)
        if cls._auto_class is not None and file is not None and Path(file).resolve() in shipped:
            auto_map[cls._auto_class] = f"{Path(file).stem}.{cls.__name__}"
    return auto_map


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

    def get_input_embeddings(self) -> TiMoStemEmbeddings:
        """The stem (the patch embedding), as for transformers' Swin and Hiera; FSDP wrappers ask for it."""
        return self.embeddings.stem

    def compute_feature_maps(
        self,
        pixel_values: torch.Tensor,
        temporal_positions: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Validate the inputs and return `[stem, stage1, ..., stage4]` maps, each `[B * T, C, h, w]` (zeros at the
        frames `frame_mask` leaves out)."""
        pixel_values, frame_mask = self._checked_inputs(pixel_values, temporal_positions, frame_mask)
        return self._feature_maps(pixel_values, temporal_positions, frame_mask)

    def _checked_inputs(self, pixel_values, temporal_positions, frame_mask):
        """`pixel_values` as `[B, T, C, H, W]` and the frame mask (`None`: every frame kept), validated."""
        pixel_values = as_frames(pixel_values, self.config.num_channels)
        check_inputs(pixel_values, temporal_positions, self.config)
        return pixel_values, check_frame_mask(frame_mask, pixel_values)

    def _feature_maps(self, pixel_values, temporal_positions, frame_mask) -> list[torch.Tensor]:
        if frame_mask is not None:
            return self._feature_maps_of_kept_frames(pixel_values, temporal_positions, frame_mask)
        num_frames = pixel_values.shape[1]
        tokens, height, width = self.embeddings(pixel_values, temporal_positions)
        stem = tokens_to_frames(tokens, num_frames, height, width)
        return [stem] + self.encoder(tokens, num_frames, height, width)

    def _feature_maps_of_kept_frames(self, pixel_values, temporal_positions, frame_mask) -> list[torch.Tensor]:
        """Each group of samples that keep as many frames runs alone on its kept frames (so a sample's maps are
        those it gets alone, in eval mode; in training mode BatchNorm sees each group's statistics); the maps are
        laid out again on all frames, zeros at the left-out ones."""
        batch_size, num_frames = frame_mask.shape
        layouts = None
        for samples, frames in frame_groups(frame_mask):
            rows = samples.unsqueeze(1)
            positions = None if temporal_positions is None else temporal_positions.to(frame_mask.device)[rows, frames]
            maps = self._feature_maps(pixel_values[rows, frames], positions, None)
            if layouts is None:
                layouts = [m.new_zeros(batch_size, num_frames, *m.shape[1:]) for m in maps]
            for layout, group_map in zip(layouts, maps):
                layout[rows, frames] = split_frames(group_map, len(samples))
        return [layout.flatten(0, 1) for layout in layouts]

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        temporal_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        frame_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> TiMoModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_frames, num_channels, height, width)`):
                Normalised time series, in any floating dtype (cast to the model's). `height` and `width` must be
                at least 32 and need not be equal nor multiples of 32. A flattened
                `(batch_size, num_frames * num_channels, height, width)` tensor (time-major) is accepted too.
            temporal_positions (`torch.FloatTensor` of shape `(batch_size, num_frames)`, *optional*):
                Temporal coordinate of each frame for the position encoding. Defaults to the frame index
                `0..T-1` (what the official model was trained with); acquisition offsets in days are the way to
                pass real dates.
            output_hidden_states (`bool`, *optional*): also return the stem and every stage map.
            frame_mask (`torch.BoolTensor` of shape `(batch_size, num_frames)`, *optional*):
                Which frames of each sample are real (True) in a batch of series of different lengths, as
                `TiMoImageProcessor` pads them. Every sample then runs on its kept frames only (in eval mode, its
                outputs are those it gets alone); the maps of left-out frames are zeros. Not in the official model,
                which sees padded frames as frames.
            kwargs: transformers' common keywords (`output_attentions` only False: the STGA and D-STGA kernels never
                form attention weights) and the image processor's `valid_mask`, which TiMo does not use. Any other
                keyword raises a TypeError, here and in every TiMo model.

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
        check_extra_kwargs(type(self).__name__, kwargs)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        pixel_values, frame_mask = self._checked_inputs(pixel_values, temporal_positions, frame_mask)
        batch_size = pixel_values.shape[0]
        feature_maps = self._feature_maps(pixel_values, temporal_positions, frame_mask)
        last = split_frames(feature_maps[-1], batch_size)
        if frame_mask is None:
            pooled = last.mean(dim=(1, 3, 4))
        else:
            pooled = mean_over_kept_frames(last.mean(dim=(3, 4)), frame_mask)
        return TiMoModelOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=tuple(split_frames(f, batch_size) for f in feature_maps) if output_hidden_states else None,
            frame_mask=frame_mask,
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
        frame_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BackboneOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_frames, num_channels, height, width)`):
                As for [`TiMoModel`], also flattened `(batch_size, num_frames * num_channels, height, width)`.
            temporal_positions (`torch.FloatTensor` of shape `(batch_size, num_frames)`, *optional*):
                As for [`TiMoModel`].
            output_hidden_states (`bool`, *optional*): also return every stage map.
            frame_mask (`torch.BoolTensor` of shape `(batch_size, num_frames)`, *optional*):
                As for [`TiMoModel`]: the maps of left-out frames are zeros.

        Returns:
            [`BackboneOutput`] with `feature_maps` for `config.out_features`, each `(B * T, C, h, w)`.
        """
        check_extra_kwargs(type(self).__name__, kwargs)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        all_maps = self.timo.compute_feature_maps(pixel_values, temporal_positions, frame_mask)
        feature_maps = tuple(all_maps[self.stage_names.index(name)] for name in self.out_features)
        return BackboneOutput(
            feature_maps=feature_maps, hidden_states=tuple(all_maps) if output_hidden_states else None
        )


# Keywords a forward accepts besides its own arguments: those transformers may pass to any model (`TransformersKwargs`,
# e.g. `output_attentions=False` from `forward_with_filtered_kwargs`) and the image processor's `valid_mask`, which
# `model(**inputs)` passes along and TiMo does not use.
ACCEPTED_EXTRA_KWARGS = TransformersKwargs.__required_keys__ | TransformersKwargs.__optional_keys__ | {"valid_mask"}
# Outputs transformers lets a caller ask for that TiMo does not return, with the reason.
UNSUPPORTED_OUTPUTS = {
    "output_attentions": "its attention kernels do not return attention weights (STGA and D-STGA never form them)",
}


def check_extra_kwargs(model_name: str, kwargs: dict, unsupported: dict[str, str] = UNSUPPORTED_OUTPUTS) -> None:
    """Refuse what a forward's `**kwargs` would otherwise swallow: an unknown keyword (a misspelt `labels` would
    silently give no loss) and a request (`output_attentions=True`) for outputs the model does not return."""
    unknown = sorted(set(kwargs) - ACCEPTED_EXTRA_KWARGS)
    if unknown:
        raise TypeError(f"{model_name}.forward() got unexpected keyword arguments: {', '.join(unknown)}.")
    for name, reason in unsupported.items():
        if kwargs.get(name):
            raise ValueError(f"{model_name} cannot return {name}: {reason}.")


def check_labels(
    labels: torch.Tensor,
    expected_shape: tuple[int, ...],
    num_labels: int,
    ignore_index: int | None = None,
    frame_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Validate class-index `labels` against the logits they score and return them as int64.

    Raises a ValueError naming what was expected when the shape differs, the dtype is not integer, or a value lies
    outside `[0, num_labels)` (other than `ignore_index`). Per-frame labels (`[B, T, ...]`) are checked at the frames
    `frame_mask` keeps only: the padded ones carry the processor's padding label.
    """
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"labels must have shape {tuple(expected_shape)}, got {tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer class indices, got dtype {labels.dtype}.")
    labels = labels.long()
    valid = labels if frame_mask is None else labels[frame_mask.to(labels.device)]
    valid = valid if ignore_index is None else valid[valid != ignore_index]
    if valid.numel() and (valid.min() < 0 or valid.max() >= num_labels):
        allowed = f"[0, {num_labels - 1}]" + ("" if ignore_index is None else f" or the ignore index {ignore_index}")
        raise ValueError(
            f"labels must be class indices in {allowed}, got values from {valid.min().item()} to "
            f"{valid.max().item()}."
        )
    return labels


def cross_entropy_or_zero(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy (classes along dim 1) over the labels that are not `ignore_index`; where every label is, a zero
    that still backpropagates (cross-entropy would be NaN)."""
    if (labels != ignore_index).any():
        return F.cross_entropy(logits, labels, ignore_index=ignore_index)
    return logits.sum() * 0.0


def check_num_labels(config: TiMoConfig, head: str) -> int:
    """`config.num_labels`, or a ValueError when the head has no classes to predict."""
    num_labels = config.num_labels
    if num_labels is None or num_labels < 2:
        raise ValueError(
            f"{head} needs config.num_labels >= 2 (or an id2label mapping with that many classes), got "
            f"{num_labels}; binary tasks use num_labels=2."
        )
    return num_labels


class TiMoForImageClassification(TiMoPreTrainedModel):
    """TiMo with a linear classifier on the mean of the last stage (official `TiMo_cls`).

    `config.classifier_pooling = "mean"` averages over frames and positions and predicts one class per sample;
    `"per_frame"` averages over positions only and predicts one class per frame (Sen12Flood).
    """

    # The loss is a mean over the batch, not a sum for `num_items_in_batch`: the Trainer must scale it for gradient
    # accumulation (it would not if `**kwargs` in `forward` were taken as loss kwargs).
    accepts_loss_kwargs = False

    def __init__(self, config: TiMoConfig):
        super().__init__(config)
        self.num_labels = check_num_labels(config, type(self).__name__)
        self.timo = TiMoModel(config)
        self.classifier = nn.Linear(config.hidden_sizes[-1], self.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        temporal_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        frame_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_frames, num_channels, height, width)`):
                As for [`TiMoModel`]; the flattened `(batch_size, num_frames * num_channels, height, width)` of 4-D
                tooling is read as frames of `config.num_channels` bands.
            labels (`torch.LongTensor`, *optional*): class indices in `[0, num_labels)` or -100 (ignored, as
                the processor labels padded frames), of shape `(batch_size,)` for `"mean"` pooling or
                `(batch_size, num_frames)` for `"per_frame"`; the loss is cross-entropy (averaged over frames too for
                `"per_frame"`).
            temporal_positions (`torch.FloatTensor` of shape `(batch_size, num_frames)`, *optional*):
                As for [`TiMoModel`].
            output_hidden_states (`bool`, *optional*): also return the stem and stage maps of [`TiMoModel`].
            frame_mask (`torch.BoolTensor` of shape `(batch_size, num_frames)`, *optional*):
                As for [`TiMoModel`]: `"mean"` pooling averages the kept frames; `"per_frame"` logits of left-out
                frames are zeros, and the loss and the label checks leave those frames out.

        Returns:
            [`ImageClassifierOutput`]: `logits` `(batch_size, num_labels)` for `"mean"` pooling or
            `(batch_size, num_frames, num_labels)` for `"per_frame"`; `loss` when `labels` are given;
            `hidden_states` as [`TiMoModelOutput`] (5-D, one map per frame).

        Example:

        ```python
        >>> import torch
        >>> from timo_hf import TiMoConfig, TiMoForImageClassification
        >>> config = TiMoConfig(hidden_sizes=[32, 64, 96, 128], num_heads=[2, 4, 6, 8], depths=[1, 1, 1, 1],
        ...                     num_labels=4, classifier_pooling="per_frame")
        >>> model = TiMoForImageClassification(config).eval()
        >>> outputs = model(torch.randn(2, 3, 3, 64, 64), labels=torch.tensor([[0, 1, 1], [3, 3, 2]]))
        >>> tuple(outputs.logits.shape), outputs.loss.ndim
        ((2, 3, 4), 0)
        ```
        """
        check_extra_kwargs(type(self).__name__, kwargs)
        outputs = self.timo(
            pixel_values,
            temporal_positions=temporal_positions,
            frame_mask=frame_mask,
            output_hidden_states=output_hidden_states,
            return_dict=True,  # the encoder's fields are read below, whatever config.return_dict says
        )
        frame_mask = outputs.frame_mask
        per_frame = self.config.classifier_pooling == "per_frame"
        if per_frame:
            logits = self.classifier(outputs.last_hidden_state.mean(dim=(3, 4)))
            if frame_mask is not None:
                logits = logits.masked_fill(~frame_mask.unsqueeze(-1), 0.0)
        else:
            logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            kept = frame_mask if per_frame else None
            labels = check_labels(
                labels, logits.shape[:-1], self.num_labels, CLASSIFICATION_IGNORE_INDEX, kept
            ).to(logits.device)
            scored_logits, scored_labels = (logits, labels) if kept is None else (logits[kept], labels[kept])
            loss = cross_entropy_or_zero(
                scored_logits.reshape(-1, self.num_labels), scored_labels.reshape(-1), CLASSIFICATION_IGNORE_INDEX
            )
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


def resize(feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with `align_corners=False`, the only resampling of the UperNet head."""
    return F.interpolate(feature_map, size=tuple(size), mode="bilinear", align_corners=False)


class TiMoConvModule(nn.Module):
    """Conv2d (with bias, "same" padding) -> BatchNorm2d -> ReLU: every convolution of the UperNet head."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.batch_norm = nn.BatchNorm2d(out_channels)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        # BatchNorm in training mode needs more than one value per channel: the pyramid pooling's 1x1 scale has one
        # per map, so a batch holding a single map (one sample of one kept frame) cannot train the head.
        if self.batch_norm.training and feature_map.shape[0] * feature_map.shape[-2] * feature_map.shape[-1] == 1:
            raise ValueError(
                "The UperNet head cannot train on a batch of one map: its BatchNorm layers in training mode need "
                f"more than one value per channel, and a 1x1 map (here of shape {tuple(feature_map.shape)}) alone "
                "in its batch has one. Train with batch_size x kept frames >= 2, or put the head's BatchNorm "
                "layers in eval mode (running statistics) for such batches."
            )
        return F.relu(self.batch_norm(self.conv(feature_map)))


class TiMoPyramidPoolingModule(nn.Module):
    """Pyramid pooling: for each scale `s`, adaptive average pooling to `s x s`, a 1x1 conv module, and a bilinear
    resize back to the input grid."""

    def __init__(self, pool_scales: list[int], in_channels: int, channels: int):
        super().__init__()
        self.pool_scales = list(pool_scales)
        self.blocks = nn.ModuleList(TiMoConvModule(in_channels, channels, 1) for _ in self.pool_scales)

    def forward(self, feature_map: torch.Tensor) -> list[torch.Tensor]:
        size = feature_map.shape[-2:]
        return [
            resize(block(F.adaptive_avg_pool2d(feature_map, scale)), size)
            for scale, block in zip(self.pool_scales, self.blocks)
        ]


class TiMoUperNetHead(nn.Module):
    """UperNet decoder applied to each frame (official-timo.md 3.1): pyramid pooling on the last stage, lateral
    1x1 convs and a top-down path (bilinear upsample-and-add) over the earlier stages, 3x3 FPN convs, all levels
    resized to the first stage's grid and fused by a 3x3 conv. The official head then resizes to the input size;
    that step is left to the caller, which may classify first (see `TiMoForSemanticSegmentation`).

    Width `config.uper_hidden_size` (the last stage width when `None`, as official).
    """

    def __init__(self, config: TiMoConfig):
        super().__init__()
        in_channels = config.hidden_sizes
        channels = config.uper_hidden_size or in_channels[-1]
        self.pyramid_pooling = TiMoPyramidPoolingModule(config.uper_pool_scales, in_channels[-1], channels)
        self.bottleneck = TiMoConvModule(in_channels[-1] + len(config.uper_pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(TiMoConvModule(width, channels, 1) for width in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(TiMoConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = TiMoConvModule(len(in_channels) * channels, channels, 3)

    def forward(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """Stage maps `[frames, C_i, h_i, w_i]` (first to last) -> features `[frames, channels, h_1, w_1]`."""
        top = feature_maps[-1]
        laterals = [conv(feature_map) for conv, feature_map in zip(self.lateral_convs, feature_maps)]
        laterals.append(self.bottleneck(torch.cat([top, *self.pyramid_pooling(top)], dim=1)))
        for index in range(len(laterals) - 1, 0, -1):
            laterals[index - 1] = laterals[index - 1] + resize(laterals[index], laterals[index - 1].shape[-2:])
        levels = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        grid = levels[0].shape[-2:]
        return self.fpn_bottleneck(torch.cat([levels[0]] + [resize(level, grid) for level in levels[1:]], dim=1))


class TiMoForSemanticSegmentation(TiMoPreTrainedModel):
    """TiMo with the official segmentation framework: a UperNet decoder on every frame, temporal fusion, then
    Dropout2d + a 1x1 classifier.

    `config.temporal_fusion = "max"` takes the element-wise maximum of the decoder features over frames (one map
    per sample); `"none"` classifies every frame (MultiEarth deforestation). The result is resized (bilinear) to
    the input size, so `height` and `width` need not be multiples of 32.

    With `"none"` the 1x1 classifier runs before the resize, on the decoder's grid (a sixteenth of the pixels), and
    the class maps are resized instead of the decoder's features: the official order resizes first, but bilinear
    resizing (weights summing to 1), Dropout2d (a per-channel scale) and a 1x1 convolution commute, so the logits
    are the same up to rounding, without the `[B*T, channels, H, W]` tensors, the largest of a fine-tuning step
    (see benchmarks/RESULTS-cuda.md). With `"max"` the order is the official one: the maximum over frames does not
    commute with resizing.
    """

    accepts_loss_kwargs = False  # mean loss, see TiMoForImageClassification

    def __init__(self, config: TiMoConfig):
        super().__init__(config)
        self.num_labels = check_num_labels(config, type(self).__name__)
        self.timo = TiMoModel(config)
        self.decode_head = TiMoUperNetHead(config)
        self.dropout = nn.Dropout2d(config.classifier_dropout)
        self.classifier = nn.Conv2d(config.uper_hidden_size or config.hidden_sizes[-1], self.num_labels, 1)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Official head initialisation: UperNet convolutions Kaiming uniform (fan_in, ReLU), the classifier Xavier
        uniform, zero biases; everything else as [`TiMoPreTrainedModel`]. Dispatched on the leaf modules (those
        without own parameters may be skipped by transformers)."""
        if module is self.classifier:
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d) and any(module is conv for conv in self.decode_head.modules()):
            init.kaiming_uniform_(module.weight, a=0, mode="fan_in", nonlinearity="relu")
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        temporal_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        frame_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_frames, num_channels, height, width)`):
                As for [`TiMoModel`] (at least 32x32, any size above); the flattened
                `(batch_size, num_frames * num_channels, height, width)` of 4-D tooling is accepted too.
            labels (`torch.LongTensor`, *optional*): class indices in `[0, num_labels)` or
                `config.semantic_loss_ignore_index`, of shape `(batch_size, height, width)` for `"max"` fusion or
                `(batch_size, num_frames, height, width)` for `"none"`; the loss is pixel-wise cross-entropy over
                the labelled pixels (0 when every pixel is ignored).
            temporal_positions (`torch.FloatTensor` of shape `(batch_size, num_frames)`, *optional*):
                As for [`TiMoModel`].
            output_hidden_states (`bool`, *optional*): also return the stem and stage maps of [`TiMoModel`].
            frame_mask (`torch.BoolTensor` of shape `(batch_size, num_frames)`, *optional*):
                As for [`TiMoModel`]: the head decodes the kept frames only; `"max"` fusion takes the maximum over
                them, `"none"` gives zero logits at left-out frames, whose labels the loss and the label checks
                leave out.

        Returns:
            [`SemanticSegmenterOutput`]: `logits` `(batch_size, num_labels, height, width)` for `"max"` fusion or
            `(batch_size, num_frames, num_labels, height, width)` for `"none"`, at the input resolution; `loss`
            when `labels` are given; `hidden_states` as [`TiMoModelOutput`] (5-D, one map per frame).

        Example:

        ```python
        >>> import torch
        >>> from timo_hf import TiMoConfig, TiMoForSemanticSegmentation
        >>> config = TiMoConfig(hidden_sizes=[32, 64, 96, 128], num_heads=[2, 4, 6, 8], depths=[1, 1, 1, 1],
        ...                     num_labels=5)
        >>> model = TiMoForSemanticSegmentation(config).eval()
        >>> outputs = model(torch.randn(2, 3, 3, 64, 80), labels=torch.randint(0, 5, (2, 64, 80)))
        >>> tuple(outputs.logits.shape)
        (2, 5, 64, 80)
        ```
        """
        check_extra_kwargs(type(self).__name__, kwargs)
        batch_size, (height, width) = pixel_values.shape[0], pixel_values.shape[-2:]
        outputs = self.timo(pixel_values, temporal_positions=temporal_positions, frame_mask=frame_mask,
                            output_hidden_states=True, return_dict=True)
        frame_mask = outputs.frame_mask

        def kept_frames(maps):  # [B, T, ...] -> [frames, ...]
            return maps.flatten(0, 1) if frame_mask is None else maps[frame_mask]

        def all_frames(maps, fill):  # [frames, ...] -> [B, T, ...]
            return split_frames(maps, batch_size) if frame_mask is None else scatter_frames(maps, frame_mask, fill)

        features = self.decode_head([kept_frames(hidden_state) for hidden_state in outputs.hidden_states[1:]])
        per_frame = self.config.temporal_fusion != "max"
        if per_frame:
            logits = all_frames(resize(self.classifier(self.dropout(features)), (height, width)), 0.0)
        else:
            fused = all_frames(resize(features, (height, width)), float("-inf")).amax(dim=1)
            logits = self.classifier(self.dropout(fused))
        loss = None
        if labels is not None:
            ignore_index = self.config.semantic_loss_ignore_index
            expected = logits.shape[:-3] + logits.shape[-2:]
            kept = frame_mask if per_frame else None
            labels = check_labels(labels, expected, self.num_labels, ignore_index, kept).to(logits.device)
            if kept is not None:
                flat_logits, flat_labels = logits[kept], labels[kept]
            else:
                flat_logits, flat_labels = logits.reshape(-1, *logits.shape[-3:]), labels.reshape(-1, height, width)
            loss = cross_entropy_or_zero(flat_logits, flat_labels, ignore_index)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states if output_hidden_states else None
        )


__all__ = [
    "TiMoPreTrainedModel",
    "TiMoModel",
    "TiMoBackbone",
    "TiMoModelOutput",
    "TiMoForImageClassification",
    "TiMoForSemanticSegmentation",
]
