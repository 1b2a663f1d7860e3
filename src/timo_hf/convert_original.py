"""Load checkpoints of the authors' released TiMo code into timo_hf models.

The official state-dict names (see the key lists in the project's spec) are renamed by the rules below. Every
official key is either renamed or knowingly dropped; anything else is an error that lists the keys, and so is any
timo_hf weight the checkpoint does not provide.
"""

import argparse
import logging
import os
import pickle
import re
from dataclasses import dataclass, field

import torch

from .configuration_timo import TiMoConfig
from .modeling_timo import (
    TiMoForImageClassification,
    TiMoForSemanticSegmentation,
    TiMoModel,
    TiMoPreTrainedModel,
)
from .modeling_timo_mim import TiMoForMaskedImageModeling


logger = logging.getLogger(__name__)

# Official backbone name -> timo_hf TiMoModel name. `{s}` is the official 1-based stage, rewritten 0-based.
_BACKBONE_RULES = [
    (r"patch_embed1\.conv\.0\.", "embeddings.stem.conv1."),
    (r"patch_embed1\.conv\.1\.", "embeddings.stem.batch_norm."),
    (r"patch_embed1\.conv\.3\.", "embeddings.stem.conv2."),
    (r"patch_embed1\.norm\.", "embeddings.stem.layernorm."),
    (r"patch_embed(?P<s>\d+)\.proj\.", "encoder.stages.{s}.downsample.projection."),
    (r"patch_embed(?P<s>\d+)\.norm\.", "encoder.stages.{s}.downsample.layernorm."),
    (r"block(?P<s>\d+)\.(?P<j>\d+)\.norm1\.", "encoder.stages.{s}.layers.{j}.layernorm_before."),
    (r"block(?P<s>\d+)\.(?P<j>\d+)\.norm2\.", "encoder.stages.{s}.layers.{j}.layernorm_after."),
    (r"block(?P<s>\d+)\.(?P<j>\d+)\.attn\.q\.", "encoder.stages.{s}.layers.{j}.attention.query."),
    (r"block(?P<s>\d+)\.(?P<j>\d+)\.attn\.kv\.", "encoder.stages.{s}.layers.{j}.attention.key_value."),
    (r"block(?P<s>\d+)\.(?P<j>\d+)\.attn\.proj\.", "encoder.stages.{s}.layers.{j}.attention.projection."),
    (
        r"block(?P<s>\d+)\.(?P<j>\d+)\.attn\.cheap_operation\.0\.",
        "encoder.stages.{s}.layers.{j}.attention.query_offset.projection.",
    ),
    (
        r"block(?P<s>\d+)\.(?P<j>\d+)\.attn\.cheap_operation\.1\.",
        "encoder.stages.{s}.layers.{j}.attention.query_offset.norm.",
    ),
    (r"block(?P<s>\d+)\.(?P<j>\d+)\.mlp\.", "encoder.stages.{s}.layers.{j}.mlp."),
    (r"norm(?P<s>\d+)\.", "encoder.stages.{s}.layernorm."),
]
_BACKBONE_RULES = [(re.compile(pattern), target) for pattern, target in _BACKBONE_RULES]

# The official backbone carries an ImageNet-style Linear(C4, 1000) that its segmentation forward never calls.
_UNUSED_BACKBONE_HEAD = re.compile(r"head\.(weight|bias)$")

# Official segmentation framework: `decoder.*` (mmseg-style UPerHead, ConvModule = conv + bn) and the classifier
# `semseghead.1` (`semseghead.0` is the parameter-free Dropout2d).
_DECODER_KEY = re.compile(
    r"decoder\.(?P<module>psp_modules\.(?P<scale>\d+)\.1|bottleneck|fpn_bottleneck|(?:lateral|fpn)_convs\.\d+)"
    r"\.(?P<layer>conv|bn)\.(?P<name>\w+)"
)
_SEGMENTATION_CLASSIFIER = re.compile(r"semseghead\.1\.(?P<name>weight|bias)")


@dataclass
class ConversionReport:
    """What happened to each official key: renamed (`official -> timo_hf`) or dropped (with the reason)."""

    renamed: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    # Renamed keys that may be absent from the configured model: when it has no slot for them they move to
    # `dropped` with this reason instead of failing the conversion (e.g. offset branches of non-D-STGA blocks).
    droppable: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{len(self.renamed)} official tensors loaded, {len(self.dropped)} dropped"]
        lines += [f"  dropped {key}: {reason}" for key, reason in sorted(self.dropped.items())]
        return "\n".join(lines)


def rename_backbone_key(key: str) -> str | None:
    """timo_hf name of an official backbone key, or `None` when no rule matches."""
    for pattern, target in _BACKBONE_RULES:
        match = pattern.match(key)
        if match:
            groups = match.groupdict()
            indices = {"s": int(groups["s"]) - 1 if "s" in groups else None, "j": groups.get("j")}
            return target.format(**indices) + key[match.end() :]
    return None


def _rename_all(state_dict: dict, report: ConversionReport, rename, converted: dict | None = None) -> dict:
    """Add every tensor whose key `rename` maps (None: not handled here) to `converted`, recording the renaming."""
    converted = {} if converted is None else converted
    for key, tensor in state_dict.items():
        new_key = rename(key)
        if new_key is not None:
            report.renamed[key] = new_key
            converted[new_key] = tensor
    return converted


def _rename_dropping_head(state_dict: dict, report: ConversionReport, rename, head_reason: str) -> dict:
    """Rename every key with `rename`, dropping (and reporting) the official unused 1000-class `head`."""

    def rename_or_drop(key: str) -> str | None:
        if _UNUSED_BACKBONE_HEAD.match(key):
            report.dropped[key] = head_reason
            return None
        return rename(key)

    return _rename_all(state_dict, report, rename_or_drop)


def _convert_backbone(state_dict: dict, report: ConversionReport) -> dict:
    return _rename_dropping_head(
        state_dict, report, rename_backbone_key, "unused 1000-class ImageNet head of the official backbone"
    )


# Official pre-training (MAE) decoder name -> timo_hf TiMoForMaskedImageModeling name.
_MIM_DECODER_RULES = [
    (re.compile(r"mask_token$"), "decoder.mask_token"),
    (re.compile(r"decoder_embed\."), "decoder.embed."),
    (re.compile(r"decoder_norm\."), "decoder.layernorm."),
    (re.compile(r"decoder_pred\."), "decoder.prediction."),
]
_MIM_DECODER_BLOCK = re.compile(r"decoder_blocks\.(?P<j>\d+)\.")


def rename_pretraining_key(key: str) -> str | None:
    """timo_hf name of an official pre-training key (encoder under `timo.`, decoder under `decoder.`), or `None`."""
    block = _MIM_DECODER_BLOCK.match(key)
    if block:
        # Decoder blocks have the layout of encoder blocks: rename one as a stage-1 block, then move it.
        inner = rename_backbone_key(f"block1.{block['j']}.{key[block.end():]}")
        return None if inner is None else "decoder." + inner.removeprefix("encoder.stages.0.")
    for pattern, target in _MIM_DECODER_RULES:
        match = pattern.match(key)
        if match:
            return target + key[match.end() :]
    backbone_key = rename_backbone_key(key)
    return None if backbone_key is None else "timo." + backbone_key


def _convert_pretraining(state_dict: dict, report: ConversionReport) -> dict:
    return _rename_dropping_head(
        state_dict, report, rename_pretraining_key, "unused 1000-class head of the official pre-training model"
    )


def _convert_under_prefix(state_dict: dict, report: ConversionReport, official_prefix: str, prefix: str) -> dict:
    """Convert the official backbone stored under `official_prefix` into timo_hf names under `prefix`."""
    nested = {k.removeprefix(official_prefix): v for k, v in state_dict.items() if k.startswith(official_prefix)}
    nested_report = ConversionReport()
    converted = _convert_backbone(nested, nested_report)
    report.renamed.update({official_prefix + key: prefix + new for key, new in nested_report.renamed.items()})
    report.dropped.update({official_prefix + key: reason for key, reason in nested_report.dropped.items()})
    return {prefix + key: value for key, value in converted.items()}


def rename_decoder_key(key: str) -> str | None:
    """timo_hf name of an official segmentation-framework decoder or classifier key, or `None`."""
    match = _DECODER_KEY.fullmatch(key)
    if match:
        module = match["module"]
        if match["scale"] is not None:
            module = f"pyramid_pooling.blocks.{match['scale']}"
        layer = "batch_norm" if match["layer"] == "bn" else "conv"
        return f"decode_head.{module}.{layer}.{match['name']}"
    match = _SEGMENTATION_CLASSIFIER.fullmatch(key)
    return f"classifier.{match['name']}" if match else None


def _convert_segmentation(state_dict: dict, report: ConversionReport) -> dict:
    """Official `SemsegFramework`: `encoder.*` backbone, `decoder.*` UperNet, `semseghead.1.*` classifier."""
    converted = _convert_under_prefix(state_dict, report, "encoder.", "timo.")
    return _rename_all(state_dict, report, rename_decoder_key, converted)


def _convert_classification(state_dict: dict, report: ConversionReport) -> dict:
    """Official `TiMo_cls`: the backbone at the top level, its `head` is the classifier, and every block carries
    the D-STGA offset branch (`cheap_operation`), unused outside D-STGA blocks (dropped there, see `droppable`)."""
    converted = {}
    for key, tensor in state_dict.items():
        if _UNUSED_BACKBONE_HEAD.match(key):
            report.renamed[key] = "classifier." + key.removeprefix("head.")
            converted[report.renamed[key]] = tensor
    backbone = {key: value for key, value in state_dict.items() if key not in report.renamed}
    converted.update(_convert_under_prefix(backbone, report, "", "timo."))
    for key in report.renamed:
        if ".attn.cheap_operation." in key:
            report.droppable[key] = "unused offset branch of a non-D-STGA block (official TiMo_cls has one per block)"
    return converted


# task -> (model class, converter from an official state dict to the model's state dict)
TASKS = {
    "backbone": (TiMoModel, _convert_backbone),
    "pretraining": (TiMoForMaskedImageModeling, _convert_pretraining),
    "classification": (TiMoForImageClassification, _convert_classification),
    "segmentation": (TiMoForSemanticSegmentation, _convert_segmentation),
}


def _read_checkpoint(path: str | os.PathLike):
    """`torch.load` of a `.pth` file, tensors and plain values only (`weights_only`), plus the `argparse.Namespace`
    that the official training scripts save beside the weights (`args`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Official TiMo checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        # torch's own message starts with advice to load unsafely; the line naming the cause is more use here.
        message = str(error) or type(error).__name__
        cause = re.search(r"Unsupported [^.\n]*", message)
        reason = cause.group(0) if cause else message.splitlines()[0]
        raise ValueError(
            f"Could not read {path} as a PyTorch checkpoint (not one, truncated, or holding objects other than "
            f"tensors and plain values): {reason}"
        ) from error


def load_original_state_dict(checkpoint: str | os.PathLike | dict) -> dict:
    """Read an official checkpoint (a `.pth` path or an already loaded dict) and return its state dict."""
    if not isinstance(checkpoint, dict):
        checkpoint = _read_checkpoint(checkpoint)
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError("The checkpoint is not an official TiMo state dict (expected a mapping of tensors).")
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def convert_original_checkpoint(
    checkpoint: str | os.PathLike | dict,
    config: TiMoConfig,
    task: str = "backbone",
    return_report: bool = False,
) -> TiMoPreTrainedModel | tuple[TiMoPreTrainedModel, ConversionReport]:
    """Build the timo_hf model for `task` from an official checkpoint.

    Args:
        checkpoint: path to an official `.pth` file (state dict under `"model"`) or the loaded dict itself.
            Loaded with `torch.load(weights_only=True)` (the official scripts' saved `args` namespace allowed).
        config: the `TiMoConfig` describing the checkpoint's architecture (e.g. `TiMoConfig.from_preset("base")`).
        task: what the checkpoint holds. `"backbone"`: the official segmentation-file `TiMo` backbone;
            `"pretraining"`: the official `MaskedAutoencoderTiMo` (encoder and decoder; pass the decoder sizes in
            `config.mim_decoder_*`; the target mode of the official run is `mim_target_normalization="batch"` with
            `--norm_pix_loss`, `"none"` without);
            `"classification"`: an official `TiMo_cls` classifier (a `TiMoForImageClassification`; set `num_labels`
            to its head size; the offset branches of non-D-STGA blocks are dropped and reported);
            `"segmentation"`: an official `SemsegFramework` (a `TiMoForSemanticSegmentation`; set `num_labels` and
            `temporal_fusion`).
        return_report: also return the `ConversionReport` (renamed and dropped keys).

    Raises:
        ValueError: for an unknown task, official keys that are neither renamed nor knowingly dropped, timo_hf
            weights missing from the checkpoint, or shape mismatches (the message lists them).
    """
    if task not in TASKS:
        raise ValueError(f"Unknown conversion task {task!r}; expected one of {sorted(TASKS)}.")
    model_class, convert = TASKS[task]
    state_dict = load_original_state_dict(checkpoint)
    report = ConversionReport()
    converted = convert(state_dict, report)
    unknown = sorted(set(state_dict) - set(report.renamed) - set(report.dropped))
    if unknown:
        raise ValueError(f"Official keys with no timo_hf counterpart for task {task!r}: {unknown}")

    model = model_class(config)
    expected = model.state_dict()
    for key, new_key in list(report.renamed.items()):
        if new_key not in expected and key in report.droppable:
            report.dropped[key] = report.droppable[key]
            del report.renamed[key], converted[new_key]
    unexpected = sorted(set(converted) - set(expected))
    if unexpected:
        raise ValueError(
            f"The checkpoint has weights the configured model has no place for (task {task!r}); check the config "
            f"(attention_types, depths, ...): {unexpected}"
        )
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ValueError(f"The checkpoint lacks these timo_hf weights for task {task!r}: {missing}")
    mismatched = [
        f"{key}: checkpoint {tuple(converted[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if converted[key].shape != expected[key].shape
    ]
    if mismatched:
        raise ValueError("Shape mismatch between the checkpoint and the config:\n  " + "\n  ".join(mismatched))
    model.load_state_dict(converted, strict=True)
    model.eval()
    logger.info(report.summary())
    return (model, report) if return_report else model


__all__ = [
    "convert_original_checkpoint",
    "ConversionReport",
    "load_original_state_dict",
    "rename_backbone_key",
    "rename_pretraining_key",
    "rename_decoder_key",
]
