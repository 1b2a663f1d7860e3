"""Write tiny but real raw copies of every supported dataset layout (for tests, demos and benchmarks).

Each ``write_<dataset>(root, ...)`` writes the files exactly as the real download lays them out (GeoTIFFs with
CRS and transform where the source has them, NetCDF, npy + CSV, JSON), with content that has learnable structure:
labels are Voronoi-like region maps, every class has its own spectral signature and its own seasonal cycle over
the day of year, and the flood/deforestation datasets change over time where the label says so. Everything is
drawn from ``numpy.random.default_rng(seed)``, so the same call writes the same bytes.

``python -m timo_hf.data.synthetic <dataset> <folder>`` writes one layout from the command line.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine


# ------------------------------------------------------------------------------------------------ content
def region_map(rng: np.random.Generator, height: int, width: int, num_classes: int, num_seeds: int = 6) -> np.ndarray:
    """(H, W) int map of Voronoi regions, each region one class in [0, num_classes)."""
    seeds = rng.uniform(0, 1, size=(num_seeds, 2)) * (height, width)
    classes = rng.integers(0, num_classes, size=num_seeds)
    yy, xx = np.mgrid[0:height, 0:width]
    distance = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    return classes[np.argmin(distance, axis=0)]


def render(rng, classes: np.ndarray, dates: list[datetime.date], num_bands: int, num_classes: int,
           scale: float = 3000.0, offset: float = 200.0, noise: float = 0.02) -> np.ndarray:
    """(T, C, H, W) float values: class signature x (1 + class seasonal cycle at the date's day of year) + noise."""
    signature = rng.uniform(0.1, 1.0, size=(num_classes, num_bands))
    amplitude = rng.uniform(0.05, 0.5, size=num_classes)
    phase = rng.uniform(0, 2 * np.pi, size=num_classes)
    frames = []
    for date in dates:
        season = 1 + amplitude * np.sin(2 * np.pi * date.timetuple().tm_yday / 365.25 + phase)
        base = signature[classes] * season[classes][..., None]  # (H, W, C)
        base = base + rng.normal(0, noise, size=base.shape)
        frames.append(np.moveaxis(base, -1, 0) * scale + offset)
    return np.stack(frames)


def _to_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def write_tif(path: Path, array: np.ndarray, *, crs: str | None = "EPSG:32631", origin=(500000.0, 5400000.0),
              pixel_size: float = 10.0, compress: str | None = "deflate") -> Path:
    """Write a (C, H, W) or (H, W) array as a GeoTIFF (without CRS/transform when `crs` is None)."""
    array = array[None] if array.ndim == 2 else array
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", count=array.shape[0], height=array.shape[1], width=array.shape[2],
                   dtype=array.dtype.name)
    if crs is not None:
        profile.update(crs=crs, transform=Affine.translation(*origin) @ Affine.scale(pixel_size, -pixel_size))
    if compress:
        profile["compress"] = compress
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # MultiEarth TIFFs have no CRS/transform
        with rasterio.open(path, "w", **profile) as dataset:
            dataset.write(array)
    return path


def _dates(start: datetime.date, count: int, step_days: int, rng=None, jitter: int = 0) -> list[datetime.date]:
    out = []
    for index in range(count):
        shift = int(rng.integers(0, jitter + 1)) if rng is not None and jitter else 0
        out.append(start + datetime.timedelta(days=index * step_days + shift))
    return out


def _downsample(band: np.ndarray, factor: int) -> np.ndarray:
    height, width = band.shape
    return band.reshape(height // factor, factor, width // factor, factor).mean(axis=(1, 3))


# ------------------------------------------------------------------------------------------------ MultiSenGE
MULTISENGE_TILES = ("31TGM", "31TGN", "31UFP", "31UFQ", "31UGP", "31UGQ", "31UGR", "32TLT", "32TMT", "32ULU",
                    "32ULV", "32UMU", "32UMV", "32UNU")


def write_multisenge(root, *, num_tiles: int = 4, patches_per_tile: int = 2, num_dates: int = 3, size: int = 32,
                     seed: int = 0) -> Path:
    """labels/*.json, s2/<tile>_<date>_S2_<x>_<y>.tif (10 bands uint16, UTM), ground_reference/<tile>_GR_<x>_<y>.tif."""
    root, rng = Path(root), np.random.default_rng(seed)
    for tile_index, tile in enumerate(MULTISENGE_TILES[:num_tiles]):
        for patch in range(patches_per_tile):
            x, y = 257 * patch, 257 * tile_index
            origin = (400000.0 + 10 * size * patch, 5500000.0 - 10 * size * tile_index)
            classes = region_map(rng, size, size, 14)
            dates = _dates(datetime.date(2020, 1, 5), num_dates, 30, rng, jitter=10)
            series = _to_dtype(render(rng, classes, dates, 10, 14), "uint16")
            names = []
            for date, frame in zip(dates, series):
                name = f"{tile}_{date:%Y%m%d}_S2_{x}_{y}.tif"
                write_tif(root / "s2" / name, frame, origin=origin)
                names.append(name)
            ground = (classes + 1).astype(np.uint8)
            ground[0, :] = 0  # a no-data row
            write_tif(root / "ground_reference" / f"{tile}_GR_{x}_{y}.tif", ground, origin=origin)
            listed = [names[i] for i in rng.permutation(len(names))]  # the JSON lists dates unsorted
            meta = {"corresponding_s2": ";".join(listed), "corresponding_s1": "", "labels": ""}
            (root / "labels").mkdir(parents=True, exist_ok=True)
            (root / "labels" / f"{tile}_{x}_{y}.json").write_text(json.dumps(meta))
    return root


# ------------------------------------------------------------------------------------------------ MultiEarth
MULTIEARTH_SENSORS = {  # folder: (file prefix, NetCDF data_source, bands written by default)
    "sent2": ("Sentinel2", "Sentinel-2", ("B2", "B3", "B4")),
    "sent1": ("Sentinel1", "Sentinel-1", ("VV", "VH")),
    "landsat5": ("Landsat5", "Landsat-5", ("SR_B1", "SR_B2", "SR_B3")),
    "landsat8": ("Landsat8", "Landsat-8", ("SR_B2", "SR_B3", "SR_B4")),
}


def write_multiearth(root, *, sensor: str = "sent2", num_locations: int = 4,
                     months: tuple[str, ...] = ("2021-05", "2021-06"), images_per_month: int = 2,
                     bands: tuple[str, ...] | None = None, size: int = 32, write_tiffs: bool = True,
                     write_netcdf: bool = True, seed: int = 0) -> Path:
    """<sensor>/<Prefix>_<band>_<lon>_<lat>_<YYYY_MM_DD>.tiff (no CRS; e.g. sent2/Sentinel2_B4_...),
    deforestation/Deforestation_*.tiff, and the same arrays as NetCDF (<sensor>.nc, deforestation.nc) with
    images, data_band, collection_dates, center_lat_lons."""
    prefix, source, default_bands = MULTIEARTH_SENSORS[sensor]
    bands = tuple(bands or default_bands)
    root, rng = Path(root), np.random.default_rng(seed)
    images, masks = [], []  # (lon, lat, date, (C,H,W) uint16) / (lon, lat, date, (H,W) uint8)
    for index in range(num_locations):
        lon, lat = round(-55.20 + 0.1 * index, 2), round(-4.39 + 0.04 * index, 2)
        forest = region_map(rng, size, size, 3)
        cleared = np.zeros((size, size), dtype=bool)
        for month in months:
            year, mon = map(int, month.split("-"))
            cleared |= (forest == (index + mon) % 3) & (rng.uniform(size=(size, size)) < 0.6)
            for k in range(images_per_month):
                date = datetime.date(year, mon, 3 + 12 * k)
                frame = render(rng, cleared.astype(int), [date], len(bands), 2)[0]
                images.append((lon, lat, date, _to_dtype(frame, "uint16")))
            masks.append((lon, lat, datetime.date(year, mon, 1), cleared.astype(np.uint8)))
    if write_tiffs:
        for lon, lat, date, frame in images:
            for band, array in zip(bands, frame):
                name = f"{prefix}_{band}_{lon:.2f}_{lat:.2f}_{date:%Y_%m_%d}.tiff"
                write_tif(root / sensor / name, array, crs=None)
        for lon, lat, date, mask in masks:
            name = f"Deforestation_{lon:.2f}_{lat:.2f}_{date:%Y_%m_%d}.tiff"
            write_tif(root / "deforestation" / name, mask, crs=None)
    if write_netcdf:
        write_multiearth_netcdf(root / f"{sensor}.nc", source, images, bands)
        write_multiearth_netcdf(root / "deforestation.nc", "Deforestation", masks, None)
    return root


def write_multiearth_netcdf(path: Path, source: str, records: list, bands: tuple[str, ...] | None) -> Path:
    """One MultiEarth-style NetCDF: images (index, data_band, 1, y, x) or (index, 1, y, x) for masks,
    data_band (strings), collection_dates (days since 1970-01-01), center_lat_lons (index, 2) as (lat, lon)."""
    import netCDF4

    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = np.stack([record[3] for record in records])
    with netCDF4.Dataset(path, "w") as nc:
        nc.data_source = source
        nc.sensor = source
        nc.createDimension("index", len(records))
        nc.createDimension("channel", 1)
        nc.createDimension("y", arrays.shape[-2])
        nc.createDimension("x", arrays.shape[-1])
        nc.createDimension("lat_lon", 2)
        if bands is not None:
            nc.createDimension("data_band", len(bands))
            names = nc.createVariable("data_band", str, ("data_band",))
            for index, band in enumerate(bands):
                names[index] = band
            images = nc.createVariable("images", arrays.dtype, ("index", "data_band", "channel", "y", "x"), zlib=True)
            images[:] = arrays[:, :, None]
        else:
            images = nc.createVariable("images", arrays.dtype, ("index", "channel", "y", "x"), zlib=True)
            images[:] = arrays[:, None]
        dates = nc.createVariable("collection_dates", "i8", ("index",))
        dates.units = "days since 1970-01-01"
        dates.calendar = "proleptic_gregorian"
        dates[:] = [(record[2] - datetime.date(1970, 1, 1)).days for record in records]
        lat_lons = nc.createVariable("center_lat_lons", "f8", ("index", "lat_lon"))
        lat_lons[:] = [[record[1], record[0]] for record in records]
    return path


# ------------------------------------------------------------------------------------------------ MTLCC
MTLCC_CLASSES = ((0, "unknown"), (1, "sugar beet"), (2, "summer oat"), (3, "meadow"), (5, "rape"), (8, "hop"),
                 (9, "winter spelt"), (12, "winter triticale"), (13, "beans"), (15, "peas"), (16, "potatoes"),
                 (17, "soybeans"), (19, "asparagus"), (22, "winter wheat"), (23, "winter barley"), (24, "winter rye"),
                 (25, "summer barley"), (26, "maize"))


def write_mtlcc(root, *, num_tiles: int = 6, num_dates: int = 4, size: int = 24, seed: int = 0) -> Path:
    """data/<tile>/<YYYYMMDD>_{10m,20m,60m}.tif (4/6/3 bands uint16 at full/half/sixth size), y.tif, classes.txt,
    tileids/{train_fold0,test_fold0,eval}.tileids."""
    if size % 6:
        raise ValueError("MTLCC size must be a multiple of 6 (10 m grid with 20 m and 60 m bands)")
    root, rng = Path(root), np.random.default_rng(seed)
    ids = [class_id for class_id, _ in MTLCC_CLASSES]
    tiles = [str(1000 + 7 * index) for index in range(num_tiles)]
    for tile_index, tile in enumerate(tiles):
        origin = (600000.0 + 10 * size * tile_index, 5300000.0)
        classes = region_map(rng, size, size, len(ids))
        dates = _dates(datetime.date(2016, 3, 1), num_dates, 20, rng, jitter=5)
        series = _to_dtype(render(rng, classes, dates, 13, len(ids)), "uint16")
        for date, frame in zip(dates, series):
            stem = f"{date:%Y%m%d}"
            write_tif(root / "data" / tile / f"{stem}_10m.tif", frame[0:4], origin=origin, crs="EPSG:32632")
            for suffix, factor, part in (("20m", 2, frame[4:10]), ("60m", 6, frame[10:13])):
                small = np.stack([_downsample(band.astype(float), factor) for band in part])
                write_tif(root / "data" / tile / f"{stem}_{suffix}.tif", _to_dtype(small, "uint16"), origin=origin,
                          crs="EPSG:32632", pixel_size=10.0 * factor)
        write_tif(root / "data" / tile / "y.tif", np.asarray(ids, dtype=np.uint16)[classes], origin=origin,
                  crs="EPSG:32632")
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(f"{class_id}|{name}" for class_id, name in MTLCC_CLASSES) + "\n")
    n_eval = max(1, num_tiles // 6)
    n_test = max(1, num_tiles // 6)
    folds = {"eval": tiles[-n_eval:], "test_fold0": tiles[-n_eval - n_test:-n_eval],
             "train_fold0": tiles[: num_tiles - n_eval - n_test]}
    (root / "tileids").mkdir(exist_ok=True)
    for name, members in folds.items():
        (root / "tileids" / f"{name}.tileids").write_text("\n".join(reversed(members)) + "\n")
    return root


# ------------------------------------------------------------------------------------------------ Sen12Flood
def write_sen12flood(root, *, num_sequences: int = 6, num_frames: int = 3,
                     bands: tuple[str, ...] = ("B02", "B03", "B04"), size: int = 32, seed: int = 0) -> Path:
    """S2list.json {key: {folder, count, "1": {filename, date, FLOODING}}} and <folder>/<filename>_<band>.tif."""
    root, rng = Path(root), np.random.default_rng(seed)
    listing = {}
    for sequence in range(num_sequences):
        folder = f"{sequence:04d}"
        origin = (10.0 + sequence, 45.0)
        land = region_map(rng, size, size, 2)
        flood_zone = region_map(rng, size, size, 2) == 1
        dates = _dates(datetime.date(2019, 3, 1), num_frames, 12, rng, jitter=3)
        entry = {"folder": folder, "count": num_frames}
        for index in rng.permutation(num_frames):  # listed out of chronological order
            flooding = bool(index >= num_frames // 2 and sequence % 2 == 0)
            classes = np.where(flood_zone & flooding, 2, land)
            frame = _to_dtype(render(rng, classes, [dates[index]], len(bands), 3)[0], "uint16")
            filename = f"S2_{folder}_{dates[index]:%Y%m%d}"
            for band, array in zip(bands, frame):
                write_tif(root / folder / f"{filename}_{band}.tif", array, crs="EPSG:4326", origin=origin,
                          pixel_size=0.0001)
            entry[str(len(entry) - 1)] = {"filename": filename, "date": dates[index].isoformat(), "FLOODING": flooding}
        listing[str(sequence)] = entry
    root.mkdir(parents=True, exist_ok=True)
    (root / "S2list.json").write_text(json.dumps(listing, indent=1))
    return root


# ------------------------------------------------------------------------------------------------ Kuro Siwo
def write_kurosiwo(root, *, num_events: int = 4, patches_per_event: int = 2, size: int = 32, seed: int = 0) -> Path:
    """<actid>/<aoi>/<grid>/{SL2,SL1,MS1}_{IVV,IVH}_<act>_<aoi>_<date>.tif (float32, EPSG:3857), MK0_MLU_* (label
    0 no water, 1 permanent water, 2 flood), MK0_MNA_* (1 = valid), info.json."""
    root, rng = Path(root), np.random.default_rng(seed)
    for event in range(num_events):
        act, aoi = str(1111001 + 11 * event), "01"
        flood_date = datetime.date(2020, 5, 10) + datetime.timedelta(days=17 * event)
        for patch in range(patches_per_event):
            grid = f"{rng.integers(0, 16**8):08x}{event:02d}{patch:02d}"
            folder = root / act / aoi / grid
            origin = (1.0e6 + 5000 * event + 500 * patch, 5.0e6)
            permanent = region_map(rng, size, size, 5) == 0
            flooded = (region_map(rng, size, size, 3) == 1) & ~permanent
            label = np.where(permanent, 1, np.where(flooded, 2, 0)).astype(np.uint8)
            valid = np.ones((size, size), dtype=np.uint8)
            valid[-2:, :] = 0
            for prefix, days in (("SL2", -24), ("SL1", -12), ("MS1", 0)):
                date = flood_date + datetime.timedelta(days=days)
                water = permanent | (flooded if prefix == "MS1" else False)
                for pol, level in (("IVV", 0.12), ("IVH", 0.03)):
                    values = level * (1 + 0.3 * rng.standard_normal((size, size)))
                    values = np.where(water, values * 0.1, values).astype(np.float32)
                    values[-2:, :] = np.nan
                    write_tif(folder / f"{prefix}_{pol}_{act}_{aoi}_{date:%Y%m%d}.tif", values, crs="EPSG:3857",
                              origin=origin)
            write_tif(folder / f"MK0_MLU_{act}_{aoi}_{flood_date:%Y%m%d}.tif", label, crs="EPSG:3857", origin=origin)
            write_tif(folder / f"MK0_MNA_{act}_{aoi}_{flood_date:%Y%m%d}.tif", valid, crs="EPSG:3857", origin=origin)
            (folder / "info.json").write_text(json.dumps({"actid": int(act), "aoiid": int(aoi), "grid_id": grid}))
    return root


# ------------------------------------------------------------------------------------------------ MillionST
MILLIONST_RESOLUTION = {"B1": 6, "B2": 1, "B3": 1, "B4": 1, "B5": 2, "B6": 2, "B7": 2, "B8": 1, "B8A": 2, "B9": 6,
                        "B11": 2, "B12": 2}


def write_millionst(root, *, layout: str = "geotiff", num_locations: int = 3, num_timestamps: int = 10,
                    size: int = 24, seed: int = 0) -> Path:
    """layout "geotiff": <loc>/<YYYYMMDDTHHMMSS>_<tile>/<band>.tif with the 12 L2A bands at 10/20/60 m (20 m and
    60 m files at 1/2 and 1/6 of the 10 m size) + metadata.json; layout "npy": <loc:06d>.npy uint8 (T, 3, H, W)
    frames (B4, B3, B2) stored out of date order + millionst.csv (loc, t1..tT with YYYYMMDD... strings)."""
    root, rng = Path(root), np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows, metadata = [], {}
    for location in range(num_locations):
        loc = f"{location:06d}"
        classes = region_map(rng, size, size, 5)
        dates = _dates(datetime.date(2017, 3, 1), num_timestamps, 182, rng, jitter=20)
        if layout == "npy":
            series = render(rng, classes, dates, 3, 5, scale=180.0, offset=20.0)
            order = rng.permutation(num_timestamps)
            np.save(root / f"{loc}.npy", _to_dtype(series[order], "uint8"))
            rows.append([int(loc)] + [f"{dates[i]:%Y%m%d}T101031" for i in order])
            continue
        series = _to_dtype(render(rng, classes, dates, 12, 5), "uint16")
        metadata[loc] = {"acquisitions": []}
        for date, frame in zip(dates, series):
            acquisition = f"{date:%Y%m%d}T101031_{date:%Y%m%d}T101029_T31UFP"
            metadata[loc]["acquisitions"].append(acquisition)
            for band, array in zip(MILLIONST_RESOLUTION, frame):
                factor = MILLIONST_RESOLUTION[band]
                small = _to_dtype(_downsample(array.astype(float), factor), "uint16") if factor > 1 else array
                write_tif(root / loc / acquisition / f"{band}.tif", small, origin=(450000.0 + 300 * location, 5.4e6),
                          pixel_size=10.0 * factor)
    if layout == "npy":
        with open(root / "millionst.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["loc"] + [f"t{i + 1}" for i in range(num_timestamps)])
            writer.writerows(rows)
    else:
        (root / "metadata.json").write_text(json.dumps(metadata, indent=1))
    return root


WRITERS = {"multiearth": write_multiearth, "multisenge": write_multisenge, "mtlcc": write_mtlcc,
           "sen12flood": write_sen12flood, "kurosiwo": write_kurosiwo, "millionst": write_millionst}


def write_synthetic(name: str, root, **kwargs) -> Path:
    """Write the raw layout of dataset `name` (see :data:`WRITERS`) under `root`."""
    try:
        writer = WRITERS[name.lower()]
    except KeyError:
        raise ValueError(f"no synthetic writer for {name!r}; known: {sorted(WRITERS)}") from None
    return writer(root, **kwargs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(WRITERS))
    parser.add_argument("output_dir")
    parser.add_argument("--size", type=int, default=None, help="10 m image size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=JSON",
                        help="another option of the dataset's writer, e.g. --set layout=npy --set num_locations=8")
    args = parser.parse_args(argv)
    from ..cli.convert import parse_overrides

    kwargs = {"seed": args.seed} | ({"size": args.size} if args.size else {}) | parse_overrides(args.set)
    print(write_synthetic(args.dataset, args.output_dir, **kwargs))


if __name__ == "__main__":
    main()
