"""MillionST (TiMo's pre-training corpus): 100k locations x 10 Sentinel-2 acquisitions, 2017-2022."""

from __future__ import annotations

import csv
import functools
import json
import re
from dataclasses import dataclass

import numpy as np

from .base import RawSample, SampleRef, TiMoBuilderConfig, TiMoRawBuilder, natural_key, parse_date
from .faults import FaultKind, SampleError
from .raster import raster_grid, read_band_files


_L2A_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
_RGB_BANDS = ("B4", "B3", "B2")
_GRID_BANDS = ("B2", "B3", "B4", "B8")  # the 10 m bands that define the output grid
_DATED = re.compile(r"\d{8}")  # an acquisition folder's name starts with its date YYYYMMDD


@dataclass
class MillionSTConfig(TiMoBuilderConfig):
    """layout: "geotiff" (datasheet layout), "npy" (official RGB export) or "auto" (npy if *.npy files are in
    data_dir). csv_path: the dates CSV of the npy layout (default: the single *.csv in data_dir)."""

    layout: str = "auto"
    csv_path: str | None = None


class MillionST(TiMoRawBuilder):
    """MillionST: 100,000 locations, 10 timestamps each at ~6-month spacing (2017-2022), Sentinel-2, 2.65 km tiles.

    Source: TiMo paper (arXiv 2505.08723) supplementary D datasheet; not publicly released yet. Two layouts:

    1. ``layout="geotiff"`` (the datasheet: per-location folders, 12 bands at 10/20/60 m, metadata.json)::

           <location>/<acquisition>/<band>.tif   band in B1..B12, B8A (no B10); acquisition folder name starts
                                                  with the date YYYYMMDD (SeCo-style product names work)
           metadata.json                          optional {"<location>": {...}}, kept verbatim per sample

       All 12 bands are put on the 10 m grid (the grid of the location's B2/B3/B4/B8 file, or ``image_size``):
       20 m (B5, B6, B7, B8A, B11, B12) and 60 m (B1, B9) bands are resampled with ``resampling`` (default
       "bilinear", rasterio/GDAL resampling on read); 10 m bands are read as they are.

    2. ``layout="npy"`` (the official pre-training code's export)::

           <loc:06d>.npy      uint8 (T, 3, H, W), channels B4, B3, B2 (8-bit, e.g. 264 x 264)
           <any>.csv          comma separated with header: loc, t1..t10 (strings whose first 8 chars are YYYYMMDD)

       Frame t of the npy belongs to column t<t+1>; frames are re-ordered chronologically (the official loader
       samples 3 frames in random order). A frame/date count mismatch is a ``shape_mismatch`` fault.

    One example per location with all its timestamps sorted by date (``num_frames=k``: the first k of them); fewer
    than ``min_frames`` (default 10, counted before ``num_frames``) is a ``missing_timestamps`` fault. No labels
    (self-supervised pre-training).

    Splits: all locations in ``train`` by default (``split_fractions`` cuts a held-out split by location).
    Licence: CC BY-NC-SA 4.0 (datasheet). Citation: the TiMo paper (arXiv 2505.08723).
    """

    BUILDER_CONFIG_CLASS = MillionSTConfig
    LABEL_KIND = "none"
    DEFAULT_MIN_FRAMES = 10
    DEFAULT_SPLIT_FRACTIONS = (1, 0, 0)
    HOMEPAGE = "https://github.com/MiliLab/TiMo"
    LICENSE = "CC BY-NC-SA 4.0"
    CITATION = ("@article{timo2025, title={TiMo: Spatiotemporal Foundation Model for Satellite Image Time Series}, "
                "journal={arXiv preprint arXiv:2505.08723}, year={2025}}")

    @functools.cached_property
    def layout(self) -> str:
        if self.config.layout == "auto":
            return "npy" if any(self.root.glob("*.npy")) else "geotiff"
        if self.config.layout not in ("geotiff", "npy"):
            raise ValueError(f"MillionST layout must be 'auto', 'geotiff' or 'npy', got {self.config.layout!r}")
        return self.config.layout

    def available_bands(self):
        return _RGB_BANDS if self.layout == "npy" else _L2A_BANDS

    def _extra_features(self):
        import datasets

        return {"metadata": datasets.Value("string")} if self.layout == "geotiff" else {}

    # ------------------------------------------------------------------------------------------- listing
    def _list_samples(self) -> list[SampleRef]:
        return self._list_npy() if self.layout == "npy" else self._list_geotiff()

    def _list_geotiff(self) -> list[SampleRef]:
        metadata_path = self.root / "metadata.json"
        metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
        locations = sorted((path.name for path in self.root.iterdir() if path.is_dir()), key=natural_key)
        self._check_geotiff_layout(locations)
        return [SampleRef(name, name, json.dumps(metadata[name]) if name in metadata else None) for name in locations]

    def _check_geotiff_layout(self, locations: list[str]) -> None:
        """Raise a layout error unless some location folder holds an acquisition folder named by its date (looks
        no further than the first such location, so a right layout costs one folder listing)."""
        for name in locations:
            if any(path.is_dir() and _DATED.match(path.name) for path in (self.root / name).iterdir()):
                return
        found = sorted(path.name for path in self.root.iterdir())[:8]
        raise FileNotFoundError(
            f"MillionST geotiff layout: expected <location>/<YYYYMMDD...>/<band>.tif under {self.root}, found "
            f"{found or 'nothing'} and no location folder with a dated acquisition folder; point data_dir at the "
            "folder of the location folders, or at the npy export (<loc>.npy files + one CSV, layout='npy')")

    def _csv_path(self):
        if self.config.csv_path:
            return self.root / self.config.csv_path
        candidates = sorted(self.root.glob("*.csv"))
        if len(candidates) != 1:
            raise FileNotFoundError(f"MillionST npy layout: expected one *.csv in {self.root} (or csv_path=...), "
                                    f"found {[path.name for path in candidates]}")
        return candidates[0]

    def _list_npy(self) -> list[SampleRef]:
        with open(self._csv_path(), newline="") as handle:
            rows = list(csv.DictReader(handle))
        refs = []
        for row in rows:
            loc = row["loc"].strip()
            columns = sorted((key for key in row if key and key.startswith("t") and key[1:].isdigit()),
                             key=lambda key: int(key[1:]))
            stamps = [row[key].strip()[:8] for key in columns if row[key] and row[key].strip()]
            name = f"{int(loc):06d}" if loc.isdigit() else loc
            refs.append(SampleRef(name, name, (loc, tuple(stamps))))
        return sorted(refs, key=lambda ref: natural_key(ref.sample_id))

    # ------------------------------------------------------------------------------------------- reading
    def _read_sample(self, ref: SampleRef) -> RawSample:
        return self._read_npy(ref) if self.layout == "npy" else self._read_geotiff(ref)

    def _read_npy(self, ref: SampleRef) -> RawSample:
        loc, stamps = ref.payload
        candidates = [self.root / f"{ref.sample_id}.npy", self.root / f"{loc}.npy"]  # zero-padded or not
        path = next((path for path in candidates if path.is_file()), None)
        if path is None:
            raise SampleError(FaultKind.MISSING_FILE, f"none of {[str(p) for p in candidates]} exists")
        try:
            array = np.load(path)  # no mmap: datasets patches numpy.load in builder modules to open files itself
        except (OSError, ValueError, EOFError) as err:
            raise SampleError(FaultKind.CORRUPT_FILE, f"cannot read {path}: {err}") from err
        if array.ndim != 4 or array.shape[1] != len(_RGB_BANDS):
            raise SampleError(FaultKind.SHAPE_MISMATCH, f"{path} has shape {array.shape}, expected (T, 3, H, W)")
        if array.shape[0] != len(stamps):
            raise SampleError(FaultKind.SHAPE_MISMATCH, f"{path} has {array.shape[0]} frames, the CSV lists "
                                                        f"{len(stamps)} dates")
        dates = [parse_date(stamp) for stamp in stamps]
        keep = self.limit_frames(list(range(len(stamps))), dates)
        channels = [index - 1 for index in self.band_indexes()]
        frames = [np.ascontiguousarray(array[t][channels]) for t in keep]
        return RawSample(frames=frames, dates=[dates[t] for t in keep])

    def _read_geotiff(self, ref: SampleRef) -> RawSample:
        folder = self.root / ref.sample_id
        acquisitions = sorted(path for path in folder.iterdir() if path.is_dir())
        dates = [parse_date(path.name) for path in acquisitions]
        acquisitions = self.limit_frames(acquisitions, dates)
        frames, geo = [], None
        for acquisition in acquisitions:
            grid = self.config.image_size or self._grid(acquisition)
            frame, frame_geo = read_band_files([acquisition / f"{band}.tif" for band in self.band_names],
                                               out_shape=grid, resampling=self.resampling)
            frames.append(frame)
            geo = geo or frame_geo
        return RawSample(frames=frames, dates=[parse_date(path.name) for path in acquisitions], geo=geo,
                         extras={"metadata": ref.payload})

    @staticmethod
    def _grid(acquisition) -> tuple[int, int]:
        for band in _GRID_BANDS:
            if (acquisition / f"{band}.tif").is_file():
                return raster_grid(acquisition / f"{band}.tif")
        raise SampleError(FaultKind.MISSING_BAND, f"no 10 m band ({', '.join(_GRID_BANDS)}) in {acquisition}")
