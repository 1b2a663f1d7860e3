"""`timo convert`: an official TiMo `.pth` checkpoint -> a timo_hf folder (config.json + model.safetensors, and with
`--normalization` the image processor that prepares its inputs)."""

import argparse
import json
from pathlib import Path

from ..configuration_timo import PRESETS, TiMoConfig
from ..convert_original import TASKS, convert_original_checkpoint
from ..image_processing_timo import NORMALIZATION_PRESETS, TiMoImageProcessor


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="convert an official TiMo checkpoint to a timo_hf folder",
        description="Convert a checkpoint of the authors' released TiMo code to a save_pretrained folder.",
    )
    parser.add_argument("checkpoint", help="official .pth file (state dict under 'model')")
    parser.add_argument("output_dir", help="folder to write config.json and model.safetensors to")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="official variant the checkpoint was trained as")
    source.add_argument("--config", help="a TiMoConfig JSON file")
    parser.add_argument("--task", default="backbone", choices=sorted(TASKS), help="what the checkpoint holds")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="override a config field, e.g. --set num_channels=10 --set 'attention_types=[\"mhsa\",\"mhsa\",\"mhsa\",\"mhsa\"]'",
    )
    parser.add_argument(
        "--normalization",
        choices=sorted(NORMALIZATION_PRESETS),
        help="also save a TiMoImageProcessor with this preset (its band names and scaling), e.g. rgb_uint8 for the "
        "official pre-training (Sentinel-2 B4, B3, B2 / 255); fine-tuning then adapts the stem to other bands by name",
    )
    return parser


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field] = value
    return overrides


def run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    if args.preset:
        config = TiMoConfig.from_preset(args.preset, **overrides)
    else:
        config_path = Path(args.config)
        if not config_path.is_file():
            raise FileNotFoundError(f"config file not found: {config_path}")
        config = TiMoConfig.from_dict({**json.loads(config_path.read_text()), **overrides})
    processor = TiMoImageProcessor(normalization=args.normalization) if args.normalization else None
    bands = processor.band_names if processor else None
    if bands and len(bands) != config.num_channels:
        raise ValueError(f"--normalization {args.normalization} names {len(bands)} bands ({bands}) but the model "
                         f"takes num_channels = {config.num_channels}.")
    model, report = convert_original_checkpoint(args.checkpoint, config, task=args.task, return_report=True)
    model.save_pretrained(args.output_dir)
    if processor:
        processor.save_pretrained(args.output_dir)
    print(report.summary())
    print(f"saved {type(model).__name__} to {Path(args.output_dir).resolve()}")
    return 0
