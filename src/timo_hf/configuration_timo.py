"""TiMo model configuration."""

from huggingface_hub.dataclasses import strict
from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PreTrainedConfig


ATTENTION_TYPES = ("dstga", "stga", "mhsa")
STGA_IMPLEMENTATIONS = ("fast", "reference")
POSITION_EMBEDDING_TYPES = ("temporal_spatial", "spatial", "none")
MIM_ENCODER_ATTENTIONS = ("mhsa", "as_configured")
MIM_TARGET_NORMALIZATIONS = ("per_unit", "batch", "none")

# Official variants (TiMo_base / TiMo_large / TiMo_huge): widths, heads and depths per stage; D-D-M-M everywhere.
PRESETS = {
    "base": {"hidden_sizes": [128, 256, 512, 1024], "num_heads": [4, 8, 16, 32], "depths": [2, 2, 18, 2]},
    "large": {"hidden_sizes": [384, 768, 960, 1536], "num_heads": [6, 12, 24, 48], "depths": [2, 2, 18, 2]},
    "huge": {"hidden_sizes": [512, 1024, 1280, 2048], "num_heads": [8, 16, 32, 64], "depths": [3, 3, 22, 3]},
}


@strict
class TiMoConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a TiMo model (arXiv 2505.08723): a four-stage hierarchical vision transformer over satellite
    image time series `[batch, time, channels, height, width]`.

    Stage 1 embeds each frame with a convolutional stem (7x7 stride-2 conv without bias, BatchNorm, ReLU, 2x2
    stride-2 conv; total stride 4); stages 2-4 downsample with a 3x3 stride-2 conv. Every stage runs `depths[i]`
    pre-norm transformer blocks whose attention is one of:

    - `"mhsa"`: full multi-head self-attention over all `T * h * w` tokens of a sample (scaled by `head_dim**-0.5`);
    - `"stga"`: spatiotemporal gyroscope attention: each token attends to its own frame and to its own position in
      the other frames, one joint softmax, no scaling;
    - `"dstga"`: STGA whose spatial logits come from the temporal medians of queries and keys plus a learned
      per-query offset.

    Args:
        num_channels (`int`, defaults to 3): spectral bands per frame.
        hidden_sizes (`list[int]`): width of each stage.
        num_heads (`list[int]`): attention heads of each stage; each width must be divisible by its heads.
        depths (`list[int]`): transformer blocks in each stage.
        attention_types (`list[str]`): `"dstga"`, `"stga"` or `"mhsa"` per stage (default D-D-M-M).
        stga_implementation (`str`, defaults to `"fast"`): kernels of the STGA and D-STGA stages, `"fast"` (exact,
            memory-efficient: log-sum-exp merge of the spatial and temporal softmax parts, D-STGA's shared spatial
            softmax computed once for all frames; see `attention_fast`) or `"reference"` (the readable kernels of
            `attention_timo`, which materialise the `[T, N, T + N]` logits of every frame). Both give the same
            outputs and gradients up to float rounding; only time and memory differ.
        mlp_ratio (`float`, defaults to 4.0): MLP hidden width over block width.
        qkv_bias (`bool`, defaults to `True`): bias in the query and key/value projections.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (exact erf GELU as the official model).
        drop_path_rate (`float`, defaults to 0.0): stochastic depth, linearly increasing over all blocks.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon of the blocks and of the stage norms.
        embedding_layer_norm_eps (`float`, defaults to 1e-5): LayerNorm epsilon of the four patch embeddings.
        position_embedding_type (`str`, defaults to `"temporal_spatial"`): fixed sin-cos encoding added after the
            stem: `"temporal_spatial"` (first half of the channels encodes the temporal position, second half the
            2-D grid position, as official), `"spatial"` (2-D only) or `"none"`.
        initializer_range (`float`, defaults to 0.02): std of the truncated normal for linear layers.
        check_finite_inputs (`bool`, defaults to `False`): raise on NaN/inf in `pixel_values` (costs a reduction).
        out_features / out_indices: backbone outputs among `stage_names = ["stem", "stage1", ..., "stage4"]`.
        classifier_pooling (`str`, defaults to `"mean"`): image classification pooling, `"mean"` over time and
            space (official) or `"per_frame"` (one prediction per frame, Sen12Flood).
        uper_hidden_size (`int`, *optional*): UperNet width; `None` means the last stage width (official).
        uper_pool_scales (`list[int]`, defaults to `[1, 2, 3, 6]`): pyramid pooling scales of the UperNet head.
        temporal_fusion (`str`, defaults to `"max"`): segmentation fusion over time, `"max"` (one map per
            sample) or `"none"` (one map per frame).
        classifier_dropout (`float`, defaults to 0.1): Dropout2d before the segmentation classifier.
        semantic_loss_ignore_index (`int`, defaults to 255): label value ignored by the segmentation loss.
        mask_unit_size (`int`, defaults to 32): side in pixels of the square mask unit of masked image modelling
            (a multiple of the stem stride 4); pre-training inputs must have `height` and `width` divisible by it.
        mask_ratio (`float`, defaults to 0.75): fraction of the `T * (H / unit) * (W / unit)` units of a sample that
            are masked, drawn jointly over all frames (`int(units * (1 - mask_ratio))` stay visible).
        mim_encoder_attention (`str`, defaults to `"mhsa"`): encoder attention during masked image modelling.
            `"mhsa"` (official): full multi-head self-attention in every stage over the visible units only, whatever
            `attention_types` says (they describe the fine-tuning model; D-STGA offset branches start fresh then).
            `"as_configured"` (experiment): `attention_types` as configured; STGA/D-STGA need the complete token
            grid, so the encoder then runs densely over the whole zero-masked image (no compute saving).
        mim_decoder_hidden_size (`int`, defaults to 512): width of the masked-image-modelling decoder.
        mim_decoder_depth (`int`, defaults to 8): MHSA blocks in the decoder.
        mim_decoder_num_heads (`int`, defaults to 16): attention heads of the decoder blocks.
        mim_decoder_mlp_ratio (`float`, defaults to 4.0): MLP hidden width over decoder width.
        mim_target_normalization (`str`, defaults to `"per_unit"`): reconstruction target: `"per_unit"` (each
            unit's pixels normalised by their own mean and variance, as MAE intends), `"batch"` (the official code:
            one mean and variance over all masked pixels of the batch) or `"none"` (raw normalised pixels).
    """

    model_type = "timo"
    attribute_map = {"num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"}

    num_channels: int = 3
    hidden_sizes: list[int] | tuple[int, ...] = (128, 256, 512, 1024)
    num_heads: list[int] | tuple[int, ...] = (4, 8, 16, 32)
    depths: list[int] | tuple[int, ...] = (2, 2, 18, 2)
    attention_types: list[str] | tuple[str, ...] = ("dstga", "dstga", "mhsa", "mhsa")
    stga_implementation: str = "fast"
    mlp_ratio: float | int = 4.0
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    drop_path_rate: float | int = 0.0
    layer_norm_eps: float = 1e-6
    embedding_layer_norm_eps: float = 1e-5
    position_embedding_type: str = "temporal_spatial"
    initializer_range: float = 0.02
    check_finite_inputs: bool = False
    classifier_pooling: str = "mean"
    uper_hidden_size: int | None = None
    uper_pool_scales: list[int] | tuple[int, ...] = (1, 2, 3, 6)
    temporal_fusion: str = "max"
    classifier_dropout: float | int = 0.1
    semantic_loss_ignore_index: int = 255
    mask_unit_size: int = 32
    mask_ratio: float | int = 0.75
    mim_encoder_attention: str = "mhsa"
    mim_decoder_hidden_size: int = 512
    mim_decoder_depth: int = 8
    mim_decoder_num_heads: int = 16
    mim_decoder_mlp_ratio: float | int = 4.0
    mim_target_normalization: str = "per_unit"
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        self.hidden_sizes = list(self.hidden_sizes)
        self.num_heads = list(self.num_heads)
        self.depths = list(self.depths)
        self.attention_types = [str(a).lower() for a in self.attention_types]
        self.uper_pool_scales = list(self.uper_pool_scales)
        # Validate before deriving attributes so that users get the plain ValueError naming the field (the
        # strict-dataclass validators would re-raise it wrapped in StrictDataclassClassValidationError).
        self.validate_architecture()
        self.num_layers = len(self.depths)
        self.hidden_size = self.hidden_sizes[-1] if self.hidden_sizes else 0
        self.stage_names = ["stem"] + [f"stage{idx}" for idx in range(1, len(self.depths) + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Reject configurations that cannot build a model, with a message naming the offending field."""
        lengths = {
            "hidden_sizes": len(self.hidden_sizes),
            "num_heads": len(self.num_heads),
            "depths": len(self.depths),
            "attention_types": len(self.attention_types),
        }
        if len(set(lengths.values())) != 1:
            raise ValueError(f"TiMoConfig: the per-stage lists must have the same length, got {lengths}.")
        if lengths["depths"] < 1:
            raise ValueError("TiMoConfig: at least one stage is required.")
        if self.num_channels < 1:
            raise ValueError(f"TiMoConfig: num_channels must be >= 1, got {self.num_channels}.")
        for stage, (width, heads) in enumerate(zip(self.hidden_sizes, self.num_heads), start=1):
            if width < 1 or heads < 1 or width % heads:
                raise ValueError(
                    f"TiMoConfig: stage {stage} width {width} is not divisible by its {heads} attention heads."
                )
        for stage, depth in enumerate(self.depths, start=1):
            if depth < 0:
                raise ValueError(f"TiMoConfig: stage {stage} depth must be >= 0, got {depth}.")
        unknown = [a for a in self.attention_types if a not in ATTENTION_TYPES]
        if unknown:
            raise ValueError(f"TiMoConfig: unknown attention_types {unknown}; expected each in {ATTENTION_TYPES}.")
        if self.stga_implementation not in STGA_IMPLEMENTATIONS:
            raise ValueError(
                f"TiMoConfig: stga_implementation must be one of {STGA_IMPLEMENTATIONS}, "
                f"got {self.stga_implementation!r}."
            )
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"TiMoConfig: position_embedding_type must be one of {POSITION_EMBEDDING_TYPES}, "
                f"got {self.position_embedding_type!r}."
            )
        if self.position_embedding_type != "none" and self.hidden_sizes[0] % 8:
            raise ValueError(
                f"TiMoConfig: the sin-cos position embedding needs hidden_sizes[0] divisible by 8, "
                f"got {self.hidden_sizes[0]}."
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"TiMoConfig: mlp_ratio must be > 0, got {self.mlp_ratio}.")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"TiMoConfig: drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")
        if self.classifier_pooling not in ("mean", "per_frame"):
            raise ValueError(
                f"TiMoConfig: classifier_pooling must be 'mean' or 'per_frame', got {self.classifier_pooling!r}."
            )
        if self.temporal_fusion not in ("max", "none"):
            raise ValueError(f"TiMoConfig: temporal_fusion must be 'max' or 'none', got {self.temporal_fusion!r}.")
        self._validate_masked_image_modeling()

    def _validate_masked_image_modeling(self):
        if self.mask_unit_size < 4 or self.mask_unit_size % 4:
            raise ValueError(
                "TiMoConfig: mask_unit_size must be a positive multiple of the stem stride 4, "
                f"got {self.mask_unit_size}."
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"TiMoConfig: mask_ratio must be in [0, 1), got {self.mask_ratio}.")
        if self.mim_encoder_attention not in MIM_ENCODER_ATTENTIONS:
            raise ValueError(
                f"TiMoConfig: mim_encoder_attention must be one of {MIM_ENCODER_ATTENTIONS}, got "
                f"{self.mim_encoder_attention!r} (STGA/D-STGA cannot run on the sparse visible units; use "
                "'as_configured' to pre-train the configured attention_types densely)."
            )
        width, heads = self.mim_decoder_hidden_size, self.mim_decoder_num_heads
        if width < 8 or width % 8 or heads < 1 or width % heads:
            raise ValueError(
                f"TiMoConfig: mim_decoder_hidden_size {width} must be a multiple of 8 (sin-cos position encoding) "
                f"and of mim_decoder_num_heads {heads}."
            )
        if self.mim_decoder_depth < 0:
            raise ValueError(f"TiMoConfig: mim_decoder_depth must be >= 0, got {self.mim_decoder_depth}.")
        if self.mim_decoder_mlp_ratio <= 0:
            raise ValueError(f"TiMoConfig: mim_decoder_mlp_ratio must be > 0, got {self.mim_decoder_mlp_ratio}.")
        if self.mim_target_normalization not in MIM_TARGET_NORMALIZATIONS:
            raise ValueError(
                f"TiMoConfig: mim_target_normalization must be one of {MIM_TARGET_NORMALIZATIONS}, got "
                f"{self.mim_target_normalization!r}."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TiMoConfig":
        """Configuration of an official variant: `"base"` (91M), `"large"` (298M) or `"huge"` (675M).

        Any field can be overridden, e.g. `TiMoConfig.from_preset("base", num_channels=10)`.
        """
        key = name.lower().removeprefix("timo-").removeprefix("timo_")
        if key not in PRESETS:
            raise ValueError(f"Unknown TiMo preset {name!r}; expected one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[key], **overrides})


__all__ = ["TiMoConfig"]
