"""Arguments and error reporting shared by `timo predict` and `timo embed`."""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys

from transformers.utils import logging as transformers_logging

from ..data.raster import RESAMPLING
from ..inference.inputs import STACK_LAYOUTS, resolve_inputs
from ..inference.loading import load_processor
from ..inference.scene import GAPS, Scene
from ..inference.tile_models import PRECISIONS


def at_least(minimum: int):
    """An argparse `type`: an integer not below `minimum` (a bad value is a usage error naming the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_scene_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --inputs and everything about reading the scene and running the tiles."""
    parser.add_argument("--model", required=True, help="model folder (save_pretrained) or Hub id")
    parser.add_argument(
        "--processor", help="image processor folder or JSON, if not saved with the model (preprocessor_config.json)"
    )
    parser.add_argument(
        "--inputs", nargs="+", required=True, metavar="INPUT",
        help="one GeoTIFF per date, a folder of them, a JSON list ([{\"path\": ..., \"date\": ...}]), or one "
        "multi-date stack with --stack-layout",
    )
    scene = parser.add_argument_group("scene")
    scene.add_argument("--dates", nargs="+", metavar="DATE",
                       help="acquisition dates (YYYY-MM-DD; a time after it is ignored), one per date")
    scene.add_argument(
        "--date-pattern", metavar="REGEX",
        help="regex whose first group is the date in each file name (default: YYYY-MM-DD, YYYYMMDD or YYYYDDDTHHMMSS)",
    )
    scene.add_argument(
        "--stack-layout", choices=STACK_LAYOUTS,
        help="--inputs is one file holding every date: band t*C+c (time-major) or c*T+t (band-major)",
    )
    scene.add_argument(
        "--bands", metavar="B1,B2,...",
        help="names of each date's bands in file order, when the files carry no band descriptions (the model's bands "
        "are then picked by name)",
    )
    scene.add_argument(
        "--align", choices=sorted(RESAMPLING),
        help="resample dates whose CRS, transform or size differ onto the first date's grid (default: refuse them)",
    )
    scene.add_argument("--nodata", type=float, help="input value meaning missing data (besides the files' own nodata "
                       "and the image processor's nodata_value)")
    scene.add_argument(
        "--gaps", choices=GAPS, default="nodata",
        help="pixels missing on some dates (clouds, swath edges): 'nodata' (default) in the output wherever any date "
        "misses them; 'fill': computed wherever a date has them, the missing values filled as in training and the "
        "dates that miss a whole tile left out of it (outputs that fuse the dates only)",
    )
    run = parser.add_argument_group("tiling")
    run.add_argument("--tile-size", type=at_least(1), help="tile side in pixels, a multiple of 32 (default: the "
                     "processor's training size, else 256)")
    run.add_argument("--overlap", type=at_least(0),
                     help="pixels shared by neighbouring tiles, blended (default: tile size / 4)")
    run.add_argument("--batch-size", type=at_least(1), default=4, help="tiles per forward pass (default: 4)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    run.add_argument("--precision", choices=sorted(PRECISIONS), default="float32", help="autocast dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--summary-json", metavar="PATH", help="also write the run summary as JSON")


def open_scene(args: argparse.Namespace, num_channels: int):
    """The model's image processor (as saved, with its training size) and the opened :class:`Scene` of `args`."""
    processor = load_processor(args.model, args.processor)
    band_names = processor.band_names
    input_band_names = [name.strip() for name in args.bands.split(",")] if args.bands else None
    if band_names is not None and len(band_names) != num_channels:
        raise ValueError(
            f"the image processor selects {len(band_names)} bands {band_names} but the model expects "
            f"num_channels = {num_channels}"
        )
    bands_per_frame = len(input_band_names) if input_band_names else num_channels
    frames = resolve_inputs(
        args.inputs, dates=args.dates, date_pattern=args.date_pattern, stack_layout=args.stack_layout,
        bands_per_frame=bands_per_frame,
    )
    nodata = [value for value in (args.nodata, processor.nodata_value) if value is not None]  # both mean missing
    scene = Scene(frames, band_names=band_names, num_channels=num_channels, input_band_names=input_band_names,
                  align=args.align, nodata=nodata, gaps=args.gaps)
    return processor, scene


def optional_processor(reference):
    """The model's image processor, or None when the folder has none (enough for `timo info` / `timo export`)."""
    try:
        return load_processor(reference)
    except FileNotFoundError:
        return None


def input_size(processor, height: int | None, width: int | None, default: int = 224) -> tuple[int, int]:
    """(height, width) asked for, else the processor's training crop / size, else `default` square."""
    size = (processor.crop_size or processor.size) if processor is not None else None
    height = height or (size["height"] if size else default)
    width = width or (size["width"] if size and height == size["height"] else height)
    return height, width


def default_tile_size(processor, requested: int | None, multiple: int = 32) -> int:
    """`requested`, else the processor's training crop / size rounded up to a multiple of 32, else 256."""
    if requested:
        return requested
    size = processor.crop_size or processor.size
    if size:
        side = max(size["height"], size["width"])
        return max(multiple, -(-side // multiple) * multiple)
    return 256


def default_overlap(tile_size: int, requested: int | None, multiple: int = 1) -> int:
    """`requested`, else a quarter of the tile rounded down to a multiple of `multiple` (at least one `multiple`,
    at most the tile less one `multiple`: tiles as small as the output stride do not overlap)."""
    if requested is not None:
        return requested
    return min(max(multiple, (tile_size // 4) // multiple * multiple), tile_size - multiple)


@contextlib.contextmanager
def loading_bars(shown: bool):
    """transformers' "Loading weights" progress bar while a model loads, off with --quiet (then restored)."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    if not shown:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def reports_errors(run):
    """Wrap a sub-command's `run`: an existing output or Ctrl-C ends with a one-line message, not a traceback."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except FileExistsError as error:
            print(f"timo {args.command}: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"timo {args.command}: interrupted; no output was written", file=sys.stderr)
            return 130

    return wrapper
