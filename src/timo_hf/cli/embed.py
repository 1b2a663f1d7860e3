"""`timo embed`: per-patch features of one TiMo stage over a whole scene, as a georeferenced GeoTIFF."""

from __future__ import annotations

import argparse

from ..inference.loading import inference_processor, load_encoder
from ..inference.pipeline import embed_scene, write_summary_json
from ..inference.tile_models import TEMPORAL_POOLING, TileEmbedder, pick_device, stage_stride
from ..inference.writer import check_output_path
from ._common import add_scene_arguments, default_overlap, default_tile_size, loading_bars, open_scene, reports_errors


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "embed",
        help="per-patch embeddings of a stage over a GeoTIFF time series",
        description="Run the TiMo encoder of any TiMo folder over a whole scene with overlapping, blended tiles and "
        "write one stage's features as a float32 COG: one band per channel, on the stage's grid (4, 8, 16 or 32 "
        "input pixels per output pixel, georeferenced accordingly), NaN where any input pixel is nodata (or with "
        "--gaps fill where every date is).",
    )
    add_scene_arguments(parser)
    parser.add_argument("--out", required=True, help="output GeoTIFF (written as a COG)")
    parser.add_argument("--stage", help="stem, stage1, ... (default: the last stage)")
    parser.add_argument(
        "--temporal-pooling", choices=TEMPORAL_POOLING, default="mean",
        help="pool the per-date features: mean (default), max, or none (one band per date and channel)",
    )
    return parser


@reports_errors
def run(args: argparse.Namespace) -> int:
    check_output_path(args.out, args.overwrite)  # before the (slow) model loading
    with loading_bars(not args.quiet):
        model = load_encoder(args.model)
    stage = args.stage or model.config.stage_names[-1]
    stride = stage_stride(model.config, stage)
    processor, scene = open_scene(args, model.config.num_channels)
    with scene:
        tile_size = default_tile_size(processor, args.tile_size)
        embedder = TileEmbedder(
            model, inference_processor(processor), scene.dates, pick_device(args.device), args.precision,
            stage=stage, temporal_pooling=args.temporal_pooling,
        )
        if not args.quiet:
            print(f"timo embed: {scene.describe()}, {stage} (1/{stride} resolution) -> {args.out}")
        summary = embed_scene(
            scene, embedder, args.out, tile_size=tile_size,
            overlap=default_overlap(tile_size, args.overlap, multiple=stride), batch_size=args.batch_size,
            overwrite=args.overwrite, progress=not args.quiet,
            tags={"TIMO_MODEL": str(args.model), "TIMO_STAGE": stage},
        )
    if args.summary_json:
        write_summary_json(summary, args.summary_json)
    print(summary.format())
    return 0
