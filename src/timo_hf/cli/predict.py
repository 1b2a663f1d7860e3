"""`timo predict`: a segmentation model over a whole scene time series -> class map GeoTIFF (+ probabilities, PNG)."""

from __future__ import annotations

import argparse

from ..inference.loading import inference_processor, load_segmentation_model
from ..inference.pipeline import default_companion, predict_scene, write_summary_json
from ..inference.tile_models import TileSegmenter, pick_device
from ..inference.writer import check_output_path
from ._common import add_scene_arguments, default_overlap, default_tile_size, loading_bars, open_scene, reports_errors


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict",
        help="tiled inference of a segmentation model over a GeoTIFF time series",
        description="Run a TiMoForSemanticSegmentation over a whole scene time series with overlapping, blended "
        "tiles, reading and writing window by window (memory follows the tile size, not the scene), and write a "
        "class map COG on the input grid (nodata where any input is nodata, or with --gaps fill only where every "
        "date is), optionally per-class probabilities, and a PNG quicklook with a legend.",
    )
    add_scene_arguments(parser)
    parser.add_argument("--out", required=True, help="output class map GeoTIFF (written as a COG)")
    parser.add_argument(
        "--probabilities", nargs="?", const="auto", metavar="PATH",
        help="also write per-class probabilities (uint8, scale 1/250) to PATH (default: <out>_probabilities.tif)",
    )
    parser.add_argument("--quicklook", metavar="PATH", help="PNG quicklook with legend (default: <out>.png)")
    parser.add_argument("--no-quicklook", action="store_true", help="do not write the PNG quicklook")
    return parser


@reports_errors
def run(args: argparse.Namespace) -> int:
    output = check_output_path(args.out, args.overwrite)  # before the (slow) model loading
    with loading_bars(not args.quiet):
        model = load_segmentation_model(args.model)
    processor, scene = open_scene(args, model.config.num_channels)
    with scene:
        tile_size = default_tile_size(processor, args.tile_size)
        segmenter = TileSegmenter(model, inference_processor(processor), scene.dates, pick_device(args.device),
                                  args.precision)
        probabilities = args.probabilities
        if probabilities == "auto":
            probabilities = default_companion(output, "_probabilities.tif")
        quicklook = None if args.no_quicklook else (args.quicklook or default_companion(output, ".png"))
        if not args.quiet:
            print(f"timo predict: {scene.describe()} -> {output}")
        summary = predict_scene(
            scene, segmenter, output, tile_size=tile_size, overlap=default_overlap(tile_size, args.overlap),
            batch_size=args.batch_size, probabilities=probabilities, quicklook=quicklook, overwrite=args.overwrite,
            progress=not args.quiet, tags={"TIMO_MODEL": str(args.model)},
        )
    if args.summary_json:
        write_summary_json(summary, args.summary_json)
    print(summary.format())
    return 0
