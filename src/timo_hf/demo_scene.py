"""A small but realistic Sentinel-2 L2A time series for the demo, generated offline: land cover, phenology, GeoTIFFs.

The landscape (one `numpy` seed) is a field pattern of winter crops, summer crops and grassland (Voronoi parcels),
with forest patches, a meandering river and a town. Every pixel's reflectance on a date is a linear mixture of
vegetation and bare-soil spectra (water and roofs have their own) weighted by its class's green-cover curve over the
year, with per-parcel shifts of the growing season, per-date illumination and sensor noise. Winter and summer crops
share the same spectra and differ only in *when* they are green, so single dates cannot separate them: the time
series can.

The scene is written as one 10-band uint16 GeoTIFF per date (reflectance x 1e4, nodata 0, band descriptions B2 ...
B12, UTM zone 31N around Toulouse, 10 m pixels), named like Sentinel-2 products, plus the reference land-cover map
(uint8, nodata 255). `write_patches_multisenge` cuts a scene into the MultiSenGE raw layout that `timo_hf.data` reads
for fine-tuning, and `write_npy_series` into the `[T, C, H, W]` `.npy` series that the pre-training script reads.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine, from_origin


CLASSES = ("water", "forest", "winter crop", "summer crop", "grassland", "built-up")
BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
DATES = tuple(datetime.date.fromisoformat(d) for d in
              ("2021-02-10", "2021-04-06", "2021-05-21", "2021-07-05", "2021-08-19", "2021-10-03"))
CRS = "EPSG:32631"
PIXEL_SIZE = 10.0
NODATA = 0
LABEL_NODATA = 255

# Typical surface reflectance of green vegetation, bare soil, water and roofs / roads in the ten bands.
SPECTRA = {
    "vegetation": (0.030, 0.060, 0.035, 0.100, 0.300, 0.380, 0.420, 0.440, 0.200, 0.100),
    "canopy": (0.020, 0.040, 0.022, 0.065, 0.200, 0.260, 0.290, 0.300, 0.130, 0.060),  # darker tree crowns
    "soil": (0.070, 0.100, 0.130, 0.160, 0.190, 0.210, 0.230, 0.250, 0.320, 0.270),
    "water": (0.060, 0.050, 0.030, 0.025, 0.020, 0.015, 0.012, 0.010, 0.005, 0.003),
    "urban": (0.100, 0.110, 0.120, 0.140, 0.150, 0.160, 0.170, 0.180, 0.200, 0.180),
}
# Green cover over the year per class: base + amplitude * exp(-((doy - peak) / width)^2 / 2).
PHENOLOGY = {
    "forest": (0.70, 0.25, 170, 60),
    "winter crop": (0.08, 0.82, 125, 32),
    "summer crop": (0.05, 0.85, 215, 30),
    "grassland": (0.45, 0.30, 140, 60),
    "built-up": (0.15, 0.05, 170, 60),
}


@dataclass(frozen=True)
class SceneFiles:
    frames: list[Path]
    labels: Path
    dates: tuple[datetime.date, ...]


def smooth_noise(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """Gaussian-filtered white noise (FFT low-pass with length `scale` pixels), standardised."""
    noise = rng.standard_normal((height, width))
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    kernel = np.exp(-2 * (np.pi * scale) ** 2 * (fx**2 + fy**2))
    field = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=(height, width))
    return (field - field.mean()) / (field.std() + 1e-12)


def land_cover(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes (H, W) uint8 indexes into CLASSES, parcel ids (H, W))."""
    rng = np.random.default_rng(seed)
    parcels = max(8, height * width // 900)
    centres = rng.uniform(0, 1, (parcels, 2)) * (height, width)
    rows, cols = np.mgrid[0:height, 0:width]
    jitter = 6 * smooth_noise(rng, height, width, 6)  # irregular parcel borders
    distance = (rows[None] + jitter - centres[:, 0, None, None]) ** 2 + (cols[None] - centres[:, 1, None, None]) ** 2
    parcel = distance.argmin(axis=0)
    crops = np.array([CLASSES.index(c) for c in ("winter crop", "summer crop", "grassland")])
    classes = crops[rng.choice(3, size=parcels, p=(0.38, 0.38, 0.24))][parcel]
    forest = smooth_noise(rng, height, width, max(height, width) / 14) > 0.9
    classes[forest] = CLASSES.index("forest")
    centre = rng.uniform(0.2, 0.4) * width  # the river runs through the left half
    course = centre + 0.12 * width * np.sin(rows / (0.35 * height) + rng.uniform(0, 6)) + 3 * smooth_noise(
        rng, height, width, 10)
    river = np.abs(cols - course) < rng.uniform(7.0, 9.0)  # 140-180 m wide, like the Garonne at Toulouse
    lake_r, lake_c = rng.uniform(0.2, 0.8) * height, rng.uniform(0.1, 0.5) * width
    lake = ((rows - lake_r) / (0.07 * height)) ** 2 + ((cols - lake_c) / (0.05 * width)) ** 2 + 0.3 * smooth_noise(
        rng, height, width, 5) < 1
    town_r, town_c = rng.uniform(0.2, 0.8) * height, course[int(0.5 * height) % height, 0] + 0.08 * width
    town = ((rows - town_r) / (0.11 * height)) ** 2 + ((cols - town_c) / (0.09 * width)) ** 2 + 0.25 * smooth_noise(
        rng, height, width, 4) < 1
    classes[town] = CLASSES.index("built-up")
    classes[river | lake] = CLASSES.index("water")
    return classes.astype(np.uint8), parcel


def green_cover(name: str, day_of_year: np.ndarray | float) -> np.ndarray:
    base, amplitude, peak, width = PHENOLOGY[name]
    return base + amplitude * np.exp(-0.5 * ((np.asarray(day_of_year) - peak) / width) ** 2)


def render(classes: np.ndarray, parcel: np.ndarray, dates, seed: int) -> np.ndarray:
    """(T, 10, H, W) uint16 reflectance x 1e4."""
    rng = np.random.default_rng(seed + 1)
    height, width = classes.shape
    shift = rng.normal(0, 9, parcel.max() + 1)[parcel]  # sowing date / season shift per parcel (days)
    vigour = rng.normal(1, 0.08, parcel.max() + 1)[parcel]
    moisture = 0.015 * smooth_noise(rng, height, width, 20)  # soil brightness varies slowly
    spectra = {name: np.asarray(values) for name, values in SPECTRA.items()}
    frames = []
    for date in dates:
        doy = date.timetuple().tm_yday
        cover = np.zeros((height, width))
        for name in PHENOLOGY:
            mask = classes == CLASSES.index(name)
            cover[mask] = np.clip(green_cover(name, doy - shift[mask]) * vigour[mask], 0, 1)
        soil = spectra["soil"][:, None, None] + moisture
        reflectance = cover * spectra["vegetation"][:, None, None] + (1 - cover) * soil
        forest = classes == CLASSES.index("forest")
        reflectance[:, forest] = cover[forest] * spectra["canopy"][:, None] + (1 - cover[forest]) * soil[:, forest]
        urban = classes == CLASSES.index("built-up")
        reflectance[:, urban] = 0.75 * spectra["urban"][:, None] + 0.25 * reflectance[:, urban]
        water = classes == CLASSES.index("water")
        reflectance[:, water] = spectra["water"][:, None] * rng.uniform(0.9, 1.2)
        reflectance *= rng.uniform(0.96, 1.04)  # illumination / atmosphere of the date
        reflectance += rng.normal(0, 0.006, reflectance.shape)
        frames.append(np.clip(np.rint(reflectance * 1e4), 1, 10000).astype(np.uint16))
    return np.stack(frames)


def product_name(date: datetime.date, index: int, area: str) -> str:
    return f"S2{'AB'[index % 2]}_MSIL2A_{date:%Y%m%d}T105031_T31TCJ_{area}.tif"


def write_scene(folder: str | Path, *, height: int, width: int, seed: int, origin: tuple[float, float],
                area: str, dates=DATES, swath_edge: bool = False) -> SceneFiles:
    """Write the scene's GeoTIFFs (one per date) and its reference labels into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes, parcel = land_cover(height, width, seed)
    series = render(classes, parcel, dates, seed)
    if swath_edge:  # the first date misses a corner, as at the edge of an orbit's swath
        rows, cols = np.mgrid[0:height, 0:width]
        series[0][:, cols > width - 0.18 * width + 0.35 * rows] = NODATA
    transform = from_origin(origin[0], origin[1], PIXEL_SIZE, PIXEL_SIZE)
    profile = dict(driver="GTiff", height=height, width=width, crs=CRS, transform=transform, tiled=True,
                   blockxsize=256, blockysize=256, compress="deflate")
    frames = []
    for index, (date, frame) in enumerate(zip(dates, series)):
        path = folder / product_name(date, index, area)
        with rasterio.open(path, "w", count=len(BANDS), dtype="uint16", nodata=NODATA, **profile) as dataset:
            dataset.write(frame)
            dataset.descriptions = BANDS
            dataset.update_tags(ACQUISITION_DATE=date.isoformat(), PROCESSING_LEVEL="L2A (synthetic)")
        frames.append(path)
    labels = folder.parent / f"{folder.name}_reference.tif"
    with rasterio.open(labels, "w", count=1, dtype="uint8", nodata=LABEL_NODATA, **profile) as dataset:
        dataset.write(classes, 1)
        dataset.update_tags(CLASSES=json.dumps(dict(enumerate(CLASSES))))
    return SceneFiles(frames, labels, tuple(dates))


def read_scene(scene: SceneFiles) -> tuple[np.ndarray, np.ndarray]:
    """(T, C, H, W) uint16 series and (H, W) labels of a written scene (small scenes only)."""
    series = np.stack([rasterio.open(path).read() for path in scene.frames])
    return series, rasterio.open(scene.labels).read(1)


def write_patches_multisenge(scene: SceneFiles, root: str | Path, patch_size: int) -> int:
    """Cut the scene into `patch_size` patches in the MultiSenGE raw layout (see `timo_hf.data.MultiSenGE`): each
    column of patches is one pseudo Sentinel-2 tile, so the builder's tile-based split keeps train, validation and
    test spatially apart. Labels are written as MultiSenGE's raw codes (class + 1, 0 = no data)."""
    root = Path(root)
    for sub in ("labels", "s2", "ground_reference"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    series, classes = read_scene(scene)
    with rasterio.open(scene.frames[0]) as dataset:
        transform = dataset.transform
    _, _, height, width = series.shape
    count = 0
    for column in range(width // patch_size):
        tile = f"DMO{column:02d}"
        for row in range(height // patch_size):
            x, y = column * patch_size, row * patch_size
            window = (slice(y, y + patch_size), slice(x, x + patch_size))
            patch_transform = transform @ Affine.translation(x, y)
            profile = dict(driver="GTiff", height=patch_size, width=patch_size, crs=CRS, transform=patch_transform)
            names = []
            for date, frame in zip(scene.dates, series):
                name = f"{tile}_{date:%Y%m%d}_S2_{x}_{y}.tif"
                with rasterio.open(root / "s2" / name, "w", count=len(BANDS), dtype="uint16", **profile) as dataset:
                    dataset.write(frame[(slice(None), *window)])
                names.append(name)
            with rasterio.open(root / "ground_reference" / f"{tile}_GR_{x}_{y}.tif", "w", count=1, dtype="uint8",
                               **profile) as dataset:
                dataset.write((classes[window] + 1).astype(np.uint8), 1)
            meta = {"corresponding_s2": ";".join(names), "corresponding_s1": "", "labels": ""}
            (root / "labels" / f"{tile}_{x}_{y}.json").write_text(json.dumps(meta))
            count += 1
    return count


def write_npy_series(scenes: list[SceneFiles], folder: str | Path, patch_size: int, bands: tuple[str, ...],
                     count: int, seed: int = 0) -> int:
    """`count` random `[T, C, patch, patch]` crops (bands `bands`) of the scenes as `.npy` files (no labels)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    indexes = [BANDS.index(band) for band in bands]
    arrays = [read_scene(scene)[0][:, indexes] for scene in scenes]
    for index in range(count):
        series = arrays[index % len(arrays)]
        top = int(rng.integers(0, series.shape[-2] - patch_size + 1))
        left = int(rng.integers(0, series.shape[-1] - patch_size + 1))
        np.save(folder / f"series_{index:04d}.npy", series[..., top : top + patch_size, left : left + patch_size])
    return count


def band_statistics(scene: SceneFiles, bands: tuple[str, ...]) -> dict:
    """Per-band mean and std of a scene's valid pixels, in the JSON layout `training/finetune.py` reads."""
    series, _ = read_scene(scene)
    selected = series[:, [BANDS.index(band) for band in bands]].astype(np.float64)
    valid = (series != NODATA).all(axis=1)
    values = selected.transpose(1, 0, 2, 3)[:, valid]
    return {"band_names": list(bands), "image_mean": values.mean(axis=1).tolist(),
            "image_std": values.std(axis=1).tolist(), "nodata": NODATA}
