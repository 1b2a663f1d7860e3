"""Reading GeoTIFF rasters with rasterio, turning every read failure into a :class:`SampleError`.

All builders read their rasters through :func:`read_raster`, so the handling of missing, corrupt and truncated
files, the optional resampling onto a target grid and the geo-metadata (CRS as WKT, affine transform, centre
longitude/latitude) are implemented once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.transform import Affine
from rasterio.warp import transform as warp_transform

from .faults import FaultKind, SampleError


RESAMPLING = {"nearest": Resampling.nearest, "bilinear": Resampling.bilinear, "cubic": Resampling.cubic,
              "average": Resampling.average}


@dataclass(frozen=True)
class GeoInfo:
    """Geo-metadata of one sample: CRS (WKT), affine transform (rasterio order a, b, c, d, e, f), centre lon/lat."""

    crs_wkt: str | None = None
    transform: tuple[float, ...] | None = None
    center_lon: float | None = None
    center_lat: float | None = None

    def as_columns(self) -> dict:
        return {
            "crs": self.crs_wkt,
            "transform": list(self.transform) if self.transform is not None else None,
            "center_lon": self.center_lon,
            "center_lat": self.center_lat,
        }


def raster_env() -> rasterio.Env:
    """GDAL settings for reading many small files: do not list the folder for sidecar files on every open."""
    return rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR")


def resampling_method(name: str) -> Resampling:
    try:
        return RESAMPLING[name]
    except KeyError:
        raise ValueError(f"unknown resampling {name!r}; choose one of {sorted(RESAMPLING)}") from None


def _geo_info(dataset, height: int, width: int) -> GeoInfo:
    if dataset.crs is None:
        return GeoInfo()
    scaled = dataset.transform @ Affine.scale(dataset.width / width, dataset.height / height)
    x, y = scaled @ (width / 2.0, height / 2.0)
    lons, lats = warp_transform(dataset.crs, "EPSG:4326", [x], [y])
    return GeoInfo(dataset.crs.to_wkt(), tuple(scaled)[:6], float(lons[0]), float(lats[0]))


def _open(path: Path, missing_kind: str):
    if not path.is_file():
        raise SampleError(missing_kind, f"file not found: {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            return rasterio.open(path)
        except RasterioError as err:
            raise SampleError(FaultKind.CORRUPT_FILE, f"cannot open {path}: {err}") from err


def read_raster(
    path: str | Path,
    *,
    indexes: list[int] | None = None,
    out_shape: tuple[int, int] | None = None,
    resampling: str = "nearest",
    missing_kind: str = FaultKind.MISSING_FILE,
    with_geo: bool = True,
) -> tuple[np.ndarray, GeoInfo]:
    """Read bands `indexes` (1-based; all by default) of a raster as a (C, H, W) array in the file's dtype.

    With `out_shape` the bands are resampled onto an (H, W) grid covering the same extent (rasterio/GDAL
    resampling `resampling`); the returned transform describes that grid. Raises :class:`SampleError` with
    `missing_kind` for a missing file and ``corrupt_file`` for anything rasterio cannot open or read (this
    includes truncated files: GDAL reports the short read as an error).
    """
    path = Path(path)
    with _open(path, missing_kind) as dataset:
        indexes = list(indexes) if indexes is not None else list(range(1, dataset.count + 1))
        if max(indexes) > dataset.count:
            raise SampleError(FaultKind.MISSING_BAND,
                              f"{path} has {dataset.count} bands, band {max(indexes)} requested")
        height, width = out_shape if out_shape is not None else (dataset.height, dataset.width)
        try:
            if (height, width) == (dataset.height, dataset.width):
                array = dataset.read(indexes)
            else:
                array = dataset.read(indexes, out_shape=(len(indexes), height, width),
                                     resampling=resampling_method(resampling))
        except RasterioError as err:
            raise SampleError(FaultKind.CORRUPT_FILE, f"cannot read {path}: {err}") from err
        return array, _geo_info(dataset, height, width) if with_geo else GeoInfo()


def raster_grid(path: str | Path, missing_kind: str = FaultKind.MISSING_FILE) -> tuple[int, int]:
    """(H, W) of a raster, read from its header only."""
    with _open(Path(path), missing_kind) as dataset:
        return dataset.height, dataset.width


def read_band_files(
    paths: list[Path],
    *,
    out_shape: tuple[int, int] | None = None,
    resampling: str = "nearest",
) -> tuple[np.ndarray, GeoInfo]:
    """Stack single-band files into (C, H, W); a missing file is a ``missing_band`` fault.

    Without `out_shape` every band must share the first band's grid (otherwise ``shape_mismatch``); with it,
    every band is resampled onto that grid (used to put 20 m / 60 m Sentinel-2 bands on the 10 m grid).
    """
    bands, geo = [], None
    for path in paths:
        array, band_geo = read_raster(path, indexes=[1], out_shape=out_shape, resampling=resampling,
                                      missing_kind=FaultKind.MISSING_BAND, with_geo=geo is None)
        bands.append(array[0])
        geo = geo or band_geo
    return stack_planes(bands, [path.name for path in paths]), geo


def stack_planes(planes: list[np.ndarray], names: list[str]) -> np.ndarray:
    """Stack (H, W) planes into (N, H, W); planes of different shapes are a ``shape_mismatch`` fault."""
    for plane, name in zip(planes, names):
        if plane.shape != planes[0].shape:
            raise SampleError(FaultKind.SHAPE_MISMATCH,
                              f"{name} has shape {plane.shape}, expected {planes[0].shape} like {names[0]}")
    return np.stack(planes)
