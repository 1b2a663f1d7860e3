"""Reading the MultiEarth challenge NetCDF files (netCDF4), with read failures turned into SampleError.

One file holds one sensor (or the deforestation masks) for many locations and dates:

* ``images``: (index, data_band, 1, H, W) for imagery, (index, 1, H, W) for masks (singleton axes squeezed);
* ``data_band``: band names (imagery only);
* ``collection_dates``: CF-encoded dates (``units = "<unit> since <date>"``) or date strings;
* ``center_lat_lons``: (index, 2) as (latitude, longitude);
* global attribute ``data_source`` (or ``sensor``), e.g. "Sentinel-2" or "Deforestation".
"""

from __future__ import annotations

import datetime
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .faults import FaultKind, SampleError


@dataclass(frozen=True)
class NetCDFIndex:
    source: str
    bands: tuple[str, ...] | None
    dates: tuple[datetime.date, ...]
    lat_lons: tuple[tuple[float, float], ...]


@functools.lru_cache(maxsize=8)
def _open(path: str):
    import netCDF4

    return netCDF4.Dataset(path, "r")


def _decode_dates(variable) -> list[datetime.date]:
    import netCDF4

    values = variable[:]
    units = getattr(variable, "units", "")
    if "since" in units:
        stamps = netCDF4.num2date(np.asarray(values), units, calendar=getattr(variable, "calendar", "standard"),
                                  only_use_cftime_datetimes=False, only_use_python_datetimes=True)
        return [datetime.date(stamp.year, stamp.month, stamp.day) for stamp in np.atleast_1d(stamps)]
    return [datetime.date.fromisoformat(str(value)[:10]) for value in values]


def read_index(path: Path) -> NetCDFIndex:
    """Everything but the pixels of one MultiEarth NetCDF file (raises OSError/KeyError on a broken file)."""
    dataset = _open(str(path))
    source = str(getattr(dataset, "data_source", getattr(dataset, "sensor", path.stem)))
    bands = tuple(str(band) for band in dataset["data_band"][:]) if "data_band" in dataset.variables else None
    lat_lons = tuple((float(lat), float(lon)) for lat, lon in np.asarray(dataset["center_lat_lons"][:]))
    return NetCDFIndex(source, bands, tuple(_decode_dates(dataset["collection_dates"])), lat_lons)


def read_image(path: Path, index: int, band: int | None) -> np.ndarray:
    """The (H, W) image `index` (band position `band`, or None for single-band mask files)."""
    try:
        images = _open(str(path))["images"]
        array = images[index, band] if band is not None else images[index]
        array = np.ma.getdata(array)
    except (OSError, KeyError, IndexError, RuntimeError) as err:
        raise SampleError(FaultKind.CORRUPT_FILE, f"cannot read image {index} of {path}: {err}") from err
    return np.asarray(array).reshape(array.shape[-2:])
