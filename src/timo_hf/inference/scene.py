"""A scene: co-registered GeoTIFF frames on one grid, read window by window with rasterio.

:class:`Scene` opens every frame, picks the bands the model needs (by name, from `--bands` or the files' band
descriptions, else by count), checks that CRS, transform and size agree with the first frame (or, with `align`,
resamples the others onto the first frame's grid through a GDAL warped VRT) and reads any window as a
`(T, C, h, w)` float32 array in which nodata is NaN. Only the window is ever read, so memory follows the window size.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import MaskFlags
from rasterio.errors import NotGeoreferencedWarning
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from ..data.raster import resampling_method
from ..image_processing_timo import canonical_band
from .inputs import InputFrame


GAPS = ("nodata", "fill")  # Scene(gaps=...)


def nodata_values(nodata: float | Sequence[float] | None) -> tuple[float, ...]:
    """`Scene(nodata=...)` as a tuple of values (empty: none)."""
    if nodata is None:
        return ()
    return tuple(nodata) if isinstance(nodata, Sequence) else (nodata,)


def describe_grid(dataset) -> str:
    crs = dataset.crs.to_string() if dataset.crs else "no CRS"
    t = dataset.transform
    return f"{dataset.width}x{dataset.height} px, {crs}, origin ({t.c:.6g}, {t.f:.6g}), pixel ({t.a:.6g}, {t.e:.6g})"


def grid_differences(dataset, reference) -> list[str]:
    """What differs between the grids of `dataset` and `reference` (empty when they are the same)."""
    differences = []
    if dataset.crs != reference.crs:
        differences.append(f"CRS {dataset.crs} instead of {reference.crs}")
    if (dataset.height, dataset.width) != (reference.height, reference.width):
        differences.append(f"size {dataset.width}x{dataset.height} instead of {reference.width}x{reference.height}")
    if not dataset.transform.almost_equals(reference.transform, precision=1e-6 * abs(reference.transform.a or 1)):
        differences.append(f"transform {tuple(dataset.transform)[:6]} instead of {tuple(reference.transform)[:6]}")
    return differences


# What to do about band names that do not fit the model, by cause.
NAME_THE_BANDS = "give files with these bands, or name the file's bands in file order with --bands"
CHECK_THE_SPLIT = ("check how the stack is split into dates: --stack-layout, and --bands with the names of one date's "
                   "bands (which also sets the number of bands per date)")
GIVE_THE_LAYOUT = "pass --stack-layout time-major or band-major (and --dates) to read each date"


def frame_bands(frame: InputFrame, dataset) -> list[int]:
    """1-based indexes of `frame`'s bands in its file."""
    return list(frame.bands) if frame.bands is not None else list(range(1, dataset.count + 1))


def frame_band_names(frame: InputFrame, dataset, input_band_names: list[str] | None) -> list[str] | None:
    """Canonical names of `frame`'s bands in file order: `input_band_names` (`--bands`), else the file's band
    descriptions, else None (unnamed)."""
    available = frame_bands(frame, dataset)
    if input_band_names is not None:
        if len(input_band_names) != len(available):
            raise ValueError(
                f"--bands names {len(input_band_names)} bands but {frame.label} has {len(available)} bands per date"
            )
        return [canonical_band(name) for name in input_band_names]
    if all(dataset.descriptions[i - 1] for i in available):
        return [canonical_band(dataset.descriptions[i - 1]) for i in available]
    return None


def picks_by_name(names: list[str] | None, wanted: list[str] | None, named_by_user: bool) -> bool:
    """Whether the model's `wanted` bands are picked by `names`: always when `--bands` gave them, else when the
    descriptions name at least one wanted band (descriptions that name none are not band names: file order)."""
    if names is None or wanted is None:
        return False
    return named_by_user or any(canonical_band(band) in names for band in wanted)


def pick_by_name(frame: InputFrame, available: list[int], names: list[str], wanted: list[str]) -> list[int]:
    """The indexes among `available` (named `names`) of the `wanted` bands; every one must be named exactly once."""
    wanted = [canonical_band(band) for band in wanted]
    stacked = frame.bands is not None
    missing = [band for band in wanted if band not in names]
    if missing:
        advice = CHECK_THE_SPLIT if stacked else NAME_THE_BANDS
        raise ValueError(f"{frame.label} lacks the bands {missing} the model needs (its bands: {names}); {advice}")
    repeated = [band for band in wanted if names.count(band) > 1]
    if repeated:
        advice = CHECK_THE_SPLIT if stacked else f"it looks like several dates stacked in one file: {GIVE_THE_LAYOUT}"
        raise ValueError(f"{frame.label} names the bands {repeated} more than once (its bands: {names}); {advice}")
    return [available[names.index(band)] for band in wanted]


def pick_by_order(frame: InputFrame, available: list[int], wanted: list[str] | None, num_channels: int) -> list[int]:
    """All of `available`, which must be as many as the model's bands."""
    expected = len(wanted) if wanted is not None else num_channels
    if len(available) != expected:
        needs = f" ({', '.join(wanted)})" if wanted else ""
        several_dates = frame.bands is None and len(available) > expected and len(available) % expected == 0
        stack = f"; or, if it holds several dates, {GIVE_THE_LAYOUT}" if several_dates else ""
        raise ValueError(
            f"{frame.label} has {len(available)} bands per date but the model expects {expected}{needs}; "
            f"name the file's bands with --bands so that the model's bands can be picked{stack}"
        )
    return available


def check_stack_split(frames: list[InputFrame], by_name: list[bool]) -> None:
    """The dates of one stacked file must all be picked by name or all by order: a split where some dates name the
    model's bands and others name none of them cuts across the file's dates."""
    stacks: dict[Path, dict[bool, list[str]]] = {}
    for frame, named in zip(frames, by_name):
        if frame.bands is not None:
            stacks.setdefault(frame.path, {}).setdefault(named, []).append(frame.label)
    for path, groups in stacks.items():
        if len(groups) > 1:
            raise ValueError(
                f"{path.name}: the band descriptions of {groups[True]} name the model's bands but those of "
                f"{groups[False]} name none of them; {CHECK_THE_SPLIT}"
            )


def select_bands(
    frames: list[InputFrame],
    datasets: list,
    wanted: list[str] | None,
    num_channels: int,
    input_band_names: list[str] | None = None,
) -> list[list[int]]:
    """For each frame (read from the dataset beside it), the 1-based band indexes to read, in the model's order.

    `wanted` are the image processor's band names (None: take each frame's bands in order, which must then be
    exactly `num_channels`). The frames' band names come from `input_band_names` (`--bands`) or the files' band
    descriptions; they must then name every wanted band once, except that descriptions naming none of them (no band
    names at all) leave the file order.
    """
    selected, by_name = [], []
    for frame, dataset in zip(frames, datasets):
        available = frame_bands(frame, dataset)
        names = frame_band_names(frame, dataset, input_band_names)
        by_name.append(picks_by_name(names, wanted, named_by_user=input_band_names is not None))
        selected.append(pick_by_name(frame, available, names, wanted) if by_name[-1]
                        else pick_by_order(frame, available, wanted, num_channels))
    check_stack_split(frames, by_name)
    return selected


class Scene:
    """Frames of one scene on the grid of the first frame; see the module docstring.

    Args:
        frames: the acquisitions, in the order the model sees them.
        band_names: the model's bands (image processor `band_names`), or None to take every band in order.
        num_channels: bands per frame the model expects (checked when `band_names` is None).
        input_band_names: names of the bands of each frame in file order (`--bands`), if the files lack them.
        align: resampling (`nearest`, `bilinear`, `cubic`, `average`) to put frames on the first frame's grid; None
            refuses frames whose CRS, transform or size differ.
        nodata: value (or values) marking missing data in every frame, in addition to each file's own nodata / mask:
            `--nodata` and the image processor's `nodata_value`. With `align`, the first one is also the nodata of a
            resampled file that has none, so that resampling does not blend it into valid pixels.
        gaps: `"nodata"`: a pixel missing on any date (in any band) is missing on every date, and so in the outputs;
            `"fill"`: it is missing on its own dates only (the model's processor fills those values), and in the
            outputs only where every date misses it.
    """

    def __init__(
        self,
        frames: list[InputFrame],
        *,
        band_names: list[str] | None,
        num_channels: int,
        input_band_names: list[str] | None = None,
        align: str | None = None,
        nodata: float | Sequence[float] | None = None,
        gaps: str = "nodata",
    ):
        if not frames:
            raise ValueError("a scene needs at least one frame")
        if gaps not in GAPS:
            raise ValueError(f"gaps must be one of {GAPS}, got {gaps!r}")
        self.frames = frames
        self.nodata = nodata_values(nodata)
        self.gaps = gaps
        self._stack = contextlib.ExitStack()
        try:
            self._open(band_names, num_channels, input_band_names, align)
        except BaseException:
            self._stack.close()
            raise

    def _open(self, band_names, num_channels, input_band_names, align) -> None:
        opened: dict[Path, object] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            for frame in self.frames:
                if frame.path not in opened:
                    try:
                        opened[frame.path] = self._stack.enter_context(rasterio.open(frame.path))
                    except rasterio.errors.RasterioIOError as error:
                        raise ValueError(f"cannot open {frame.path}: {error}") from None
        reference = opened[self.frames[0].path]
        self.height, self.width = reference.height, reference.width
        self.crs, self.transform = reference.crs, reference.transform
        self.reference_path = self.frames[0].path

        mismatched = {path: grid_differences(ds, reference) for path, ds in opened.items()}
        mismatched = {path: diff for path, diff in mismatched.items() if diff}
        if mismatched and align is None:
            lines = "; ".join(f"{path.name}: {', '.join(diff)}" for path, diff in mismatched.items())
            raise ValueError(
                f"the inputs are not on one grid (reference {self.reference_path.name}: {describe_grid(reference)}): "
                f"{lines}. Pass --align bilinear (or nearest, cubic, average) to resample them onto the first "
                "date's grid"
            )
        self.aligned = sorted(path.name for path in mismatched)
        readers = {
            path: self._warped(dataset, reference, align) if path in mismatched else dataset
            for path, dataset in opened.items()
        }
        self._readers = [readers[frame.path] for frame in self.frames]
        self._indexes = select_bands(self.frames, [opened[frame.path] for frame in self.frames], band_names,
                                     num_channels, input_band_names)
        self._masked = [
            any(flags != [MaskFlags.all_valid] for flags in (reader.mask_flag_enums[i - 1] for i in indexes))
            for reader, indexes in zip(self._readers, self._indexes)
        ]

    def _warped(self, dataset, reference, align: str) -> WarpedVRT:
        """`dataset` resampled onto the grid of `reference`, its nodata (else the scene's) kept out of resampling."""
        options = dict(crs=reference.crs, transform=reference.transform, width=self.width, height=self.height,
                       resampling=resampling_method(align))
        if dataset.nodata is not None:
            options["nodata"] = dataset.nodata
        elif self.nodata:  # a file without a nodata tag: --nodata's zeros must not blend into their neighbours
            options.update(src_nodata=self.nodata[0], nodata=self.nodata[0])
        else:
            options["add_alpha"] = True  # areas outside the source become masked, not zeros
        return self._stack.enter_context(WarpedVRT(dataset, **options))

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def num_bands(self) -> int:
        return len(self._indexes[0])

    @property
    def dates(self) -> list | None:
        dates = [frame.date for frame in self.frames]
        return dates if all(dates) else None

    def describe(self) -> str:
        return f"{self.width}x{self.height} px, {self.num_frames} dates x {self.num_bands} bands, CRS {self.crs}"

    # ------------------------------------------------------------------------------------------------ reading
    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """`(T, C, h, w)` float32 values (NaN where missing) and the `(h, w)` mask of missing pixels. A pixel missing
        in any band of a frame is missing in all its bands; with `gaps="nodata"` it is then missing in every frame
        (and in the mask), with `gaps="fill"` in that frame only (and in the mask where every frame misses it).
        Parts of `window` outside the scene are missing."""
        height, width = int(window.height), int(window.width)
        row, col = int(window.row_off), int(window.col_off)
        inside = Window(col, row, width, height).intersection(Window(0, 0, self.width, self.height))
        top, left = int(inside.row_off) - row, int(inside.col_off) - col
        h, w = int(inside.height), int(inside.width)
        values = np.full((self.num_frames, self.num_bands, height, width), np.nan, dtype=np.float32)
        missing = np.ones((height, width), dtype=bool)
        if h and w:
            block = np.empty((self.num_frames, self.num_bands, h, w), dtype=np.float32)
            invalid = np.zeros((self.num_frames, h, w), dtype=bool)  # per frame
            for t, (reader, indexes, masked) in enumerate(zip(self._readers, self._indexes, self._masked)):
                block[t] = reader.read(indexes, window=inside, out_dtype=np.float32)
                if masked:
                    invalid[t] = (reader.read_masks(indexes, window=inside) == 0).any(axis=0)
            invalid |= ~np.isfinite(block).all(axis=1)
            if self.nodata:
                invalid |= np.isin(block, self.nodata).any(axis=1)
            if self.gaps == "nodata":
                invalid[:] = invalid.any(axis=0)
            np.putmask(block, np.broadcast_to(invalid[:, None], block.shape), np.nan)
            values[:, :, top : top + h, left : left + w] = block
            missing[top : top + h, left : left + w] = invalid.all(axis=0)
        return values, missing

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "Scene":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
