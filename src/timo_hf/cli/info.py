"""`timo info`: what a TiMo model folder holds: configuration, image processor, parameters and FLOPs."""

from __future__ import annotations

import argparse
import copy
import json

import torch

from ..configuration_timo import PRESETS, TiMoConfig
from ..flops import count_flops, layout_name
from ..inference.loading import MODEL_CLASSES, PROCESSOR_FILE, architecture, load_config
from ._common import at_least, input_size, optional_processor


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "info",
        help="configuration summary, parameter count and FLOPs of a TiMo model",
        description="Summarise a TiMo model folder (or an official preset): architecture, stages, bands and "
        "normalisation, labels, parameter count per part, and forward FLOPs (2 per multiply-add, counted on the "
        "meta device, so any size is instant) at a given input size.",
    )
    parser.add_argument("model", nargs="?", help="model folder (save_pretrained) or Hub id")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="describe an official size instead of a folder")
    parser.add_argument("--frames", type=at_least(1), default=3, help="dates T of the FLOPs input (default: 3)")
    parser.add_argument("--height", type=at_least(1), help="input height (default: the processor's size, else 224)")
    parser.add_argument("--width", type=at_least(1), help="input width (default: the height)")
    parser.add_argument("--batch-size", type=at_least(1), default=1, help="batch of the FLOPs input (default: 1)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters in total, trainable, and per top-level part (`timo` encoder, `decode_head`, ...)."""
    counts = {"total": sum(p.numel() for p in model.parameters()),
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    for name, child in model.named_children():
        counts[f"part:{name}"] = sum(p.numel() for p in child.parameters())
    return counts


def describe(config: TiMoConfig, cls: type, processor, shape: tuple[int, ...]) -> dict:
    with torch.device("meta"):
        model = cls(config)
    flops_config = copy.deepcopy(config)
    flops_config.stga_implementation = "reference"  # the kernels as written in the paper (same maths)
    with torch.device("meta"):
        flops_model = cls(flops_config)
    flops = count_flops(flops_model, torch.empty(shape, device="meta"))
    summary = {
        "architecture": cls.__name__,
        "stages": {
            "hidden_sizes": list(config.hidden_sizes), "depths": list(config.depths),
            "num_heads": list(config.num_heads), "attention_types": list(config.attention_types),
            "layout": layout_name(config.attention_types),
        },
        "num_channels": config.num_channels,
        "parameters": parameter_counts(model),
        "flops": {"input_shape": list(shape), "total": flops["total"], "attention": flops["attention"],
                  "by_stage": flops["by_stage"]},
    }
    if cls.__name__ in ("TiMoForSemanticSegmentation", "TiMoForImageClassification"):
        summary["labels"] = [config.id2label.get(i, str(i)) for i in range(config.num_labels)]
        summary["head"] = {"temporal_fusion": config.temporal_fusion, "classifier_pooling": config.classifier_pooling,
                           "uper_hidden_size": config.uper_hidden_size or config.hidden_sizes[-1]}
    if processor is not None:
        summary["processor"] = {
            "band_names": processor.band_names, "normalization": processor.normalization,
            "image_mean": processor.image_mean, "image_std": processor.image_std,
            "temporal_encoding": processor.temporal_encoding, "size": processor.size, "nodata": processor.nodata_value,
        }
    return summary


def format_summary(name: str, summary: dict) -> str:
    stages = summary["stages"]
    params = summary["parameters"]
    parts = ", ".join(f"{key[5:]} {value:,}" for key, value in params.items() if key.startswith("part:"))
    flops = summary["flops"]
    by_stage = ", ".join(f"{stage} {value / 1e9:.3g}" for stage, value in flops["by_stage"].items())
    lines = [
        f"model        {name} ({summary['architecture']})",
        f"stages       {stages['layout']}: widths {stages['hidden_sizes']}, depths {stages['depths']}, "
        f"heads {stages['num_heads']}",
        f"input        {summary['num_channels']} bands per date",
        f"parameters   {params['total']:,} ({params['total'] * 4 / 2**20:.1f} MB in float32); {parts}",
        f"FLOPs        {flops['total'] / 1e9:.3f} G forward at {tuple(flops['input_shape'])} [B, T, C, H, W] "
        f"(attention {flops['attention'] / 1e9:.3f} G; {by_stage} G)",
    ]
    if "labels" in summary:
        head = summary["head"]
        lines.append(f"labels       {len(summary['labels'])}: {'; '.join(map(str, summary['labels']))} "
                     f"(temporal fusion {head['temporal_fusion']}, UperNet width {head['uper_hidden_size']})")
    processor = summary.get("processor")
    if processor:
        norm = processor["normalization"] or "custom mean/std"
        lines.append(f"processor    bands {processor['band_names'] or 'in file order'}, normalisation {norm}, "
                     f"dates as {processor['temporal_encoding']}, training size {processor['size']}")
    elif summary.get("processor_missing"):
        lines.append(f"processor    none ({PROCESSOR_FILE} missing: timo predict / embed need it)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if bool(args.model) == bool(args.preset):
        raise ValueError("give a model folder / Hub id or --preset (one of them)")
    processor = None
    if args.preset:
        name, config, cls = f"preset {args.preset}", TiMoConfig.from_preset(args.preset), MODEL_CLASSES["TiMoModel"]
    else:
        name, config = args.model, load_config(args.model)
        cls = MODEL_CLASSES.get(architecture(config))
        if cls is None:
            raise ValueError(f"{args.model}: unknown TiMo architecture {architecture(config)!r}")
        processor = optional_processor(args.model)
    height, width = input_size(processor, args.height, args.width)
    shape = (args.batch_size, args.frames, config.num_channels, height, width)
    summary = describe(config, cls, processor, shape)
    summary["processor_missing"] = processor is None and not args.preset
    print(json.dumps(summary, indent=2) if args.json else format_summary(name, summary))
    return 0
