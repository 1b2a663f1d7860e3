"""What the user passed as a scene: GeoTIFF files, a folder, a JSON list with dates, or one multi-band stack.

The result is a list of :class:`InputFrame` (one per acquisition date: the file, the 1-based bands of that date in
the file, the date), in chronological order when the dates are known. Nothing here reads pixels; the stack layout
needs the band count of the file's header only.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path

import rasterio


RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2")
STACK_LAYOUTS = ("time-major", "band-major")
# Tried in order on the file name when no --date-pattern is given: ISO dates, YYYYMMDD, and the YYYYDDD (year, day
# of year) of HLS / Prithvi names such as HLS.S30.T13REN.2018013T172747.v2.0.tif.
DEFAULT_DATE_PATTERNS = (
    r"(?<!\d)(\d{4}-\d{2}-\d{2})(?!\d)",
    r"(?<!\d)(\d{4}_\d{2}_\d{2})(?!\d)",
    r"(?<!\d)(\d{8})(?!\d)",
    r"(?<!\d)(\d{7})T\d{6}",
)


@dataclass(frozen=True)
class InputFrame:
    """One acquisition: `bands` are the 1-based band indexes of this date in `path` (None: every band)."""

    path: Path
    date: datetime.date | None = None
    bands: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        where = self.path.name if self.bands is None else f"{self.path.name} bands {list(self.bands)}"
        return f"{where} ({self.date.isoformat()})" if self.date else where


def parse_date(text: str) -> datetime.date:
    """'2021-05-03', '2021_05_03', '20210503' or '2021123' (year + day of year) -> date; a time of day after it
    ('2021-05-03T10:30:00', '20210503T103000', '2021-05-03 10:30') is dropped: the model uses dates only."""
    digits = re.sub(r"\D", "", re.split(r"[T ]", text.strip(), maxsplit=1)[0])
    try:
        if len(digits) == 8:
            return datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
        if len(digits) == 7:
            return datetime.date(int(digits[:4]), 1, 1) + datetime.timedelta(days=int(digits[4:]) - 1)
    except ValueError:
        pass
    raise ValueError(f"cannot read a date from {text!r}; use YYYY-MM-DD, YYYYMMDD or YYYYDDD, optionally with a time")


def date_from_name(name: str, pattern: str | None = None) -> datetime.date | None:
    """The date in a file name: the first group (or the group named `date`) of `pattern`, else the defaults."""
    for candidate in [pattern] if pattern else DEFAULT_DATE_PATTERNS:
        match = re.search(candidate, name)
        if match:
            text = match.groupdict().get("date") or (match.group(1) if match.groups() else match.group(0))
            return parse_date(text)
    if pattern:
        raise ValueError(f"--date-pattern {pattern!r} does not match the file name {name!r}")
    return None


def _read_json_list(path: Path) -> list[tuple[Path, str | None]]:
    """`[{"path": "t1.tif", "date": "2021-05-03"}, ...]`, `["t1.tif", ...]` or `{"inputs": [...]}`; relative
    paths are relative to the JSON file."""
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if isinstance(content, dict):
        content = content.get("inputs", content.get("frames"))
    if not isinstance(content, list) or not content:
        raise ValueError(f'{path} must hold a non-empty list of {{"path": ..., "date": ...}} entries (or of paths)')
    entries = []
    for entry in content:
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f'{path}: every entry needs a "path", got {entry!r}')
        file = Path(entry["path"]).expanduser()
        entries.append((file if file.is_absolute() else path.parent / file, entry.get("date")))
    return entries


def _list_folder(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in RASTER_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no rasters ({', '.join(RASTER_SUFFIXES)}) in the folder {folder}")
    return files


def expand_stack(path: Path, bands_per_frame: int, layout: str, count: int | None = None) -> list[tuple[int, ...]]:
    """Band indexes of each date of a `(T * C)`-band stack: time-major `t * C + c`, band-major `c * T + t`."""
    if layout not in STACK_LAYOUTS:
        raise ValueError(f"stack layout must be one of {STACK_LAYOUTS}, got {layout!r}")
    if count is None:
        with rasterio.open(path) as dataset:
            count = dataset.count
    if count % bands_per_frame:
        raise ValueError(
            f"{path.name} has {count} bands, not a multiple of the {bands_per_frame} bands per date the model "
            "needs; check --bands / --stack-layout"
        )
    frames = count // bands_per_frame
    if layout == "time-major":
        return [tuple(t * bands_per_frame + c + 1 for c in range(bands_per_frame)) for t in range(frames)]
    return [tuple(c * frames + t + 1 for c in range(bands_per_frame)) for t in range(frames)]


def resolve_inputs(
    items: list[str],
    *,
    dates: list[str] | None = None,
    date_pattern: str | None = None,
    stack_layout: str | None = None,
    bands_per_frame: int | None = None,
) -> list[InputFrame]:
    """Turn `--inputs` into frames.

    `items`: GeoTIFF paths (one per date), one folder (every raster in it), or one JSON file listing the paths and
    dates. With `stack_layout`, `items` is a single file holding every date (`bands_per_frame` bands each).
    Dates come from `dates` (one per frame), the JSON, or the file names (`date_pattern`: a regex whose first
    group is the date). Frames with dates are returned in chronological order.
    """
    if not items:
        raise ValueError("no inputs given")
    paths = [Path(item).expanduser() for item in items]
    json_dates: list[str | None] | None = None
    if len(paths) == 1 and paths[0].suffix.lower() == ".json":
        if not paths[0].is_file():
            raise FileNotFoundError(f"input list not found: {paths[0]}")
        entries = _read_json_list(paths[0])
        paths, json_dates = [p for p, _ in entries], [d for _, d in entries]
    elif len(paths) == 1 and paths[0].is_dir():
        paths = _list_folder(paths[0])
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"input file{'s' if len(missing) > 1 else ''} not found: {', '.join(missing)}")

    if stack_layout:
        if len(paths) != 1:
            raise ValueError(f"--stack-layout expects one multi-date file, got {len(paths)} inputs")
        if not bands_per_frame:
            raise ValueError("--stack-layout needs the number of bands per date")
        frames = [InputFrame(paths[0], None, bands) for bands in expand_stack(paths[0], bands_per_frame, stack_layout)]
    else:
        frames = [InputFrame(path) for path in paths]

    if dates is None and json_dates is not None and any(d is not None for d in json_dates):
        if any(d is None for d in json_dates):
            raise ValueError("the JSON input list gives dates for some entries only; give one for every entry")
        dates = json_dates
    if dates is not None:
        if len(dates) != len(frames):
            raise ValueError(f"{len(dates)} dates given for {len(frames)} input frames")
        parsed = [parse_date(str(d)) for d in dates]
    elif stack_layout:
        parsed = [None] * len(frames)
    else:
        parsed = [date_from_name(frame.path.name, date_pattern) for frame in frames]
        if any(parsed) and not all(parsed):
            unnamed = [f.path.name for f, d in zip(frames, parsed) if d is None]
            raise ValueError(f"no date found in the names of {unnamed}; pass --dates or a JSON list with dates")
    frames = [InputFrame(f.path, d, f.bands) for f, d in zip(frames, parsed)]
    if all(frame.date for frame in frames):
        frames.sort(key=lambda frame: frame.date)
    return frames
