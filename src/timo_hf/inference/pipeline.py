"""Whole-scene inference: tiles read from a :class:`Scene`, run in batches, blended, written as GeoTIFFs.

`predict_scene` writes the class map (plus optional per-class probabilities and a PNG quicklook) of a segmentation
model; `embed_scene` writes one stage's features. Both stream: a batch of tiles is read, predicted and blended, and
every finished region is written at once, so memory is bounded by the tile size, the batch size and an `overlap`-high
band of the scene width (see `tiling`), whatever the scene size.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine
from tqdm.auto import tqdm

from .quicklook import class_colormap, write_quicklook
from .scene import Scene
from .tile_models import TileEmbedder, TileSegmenter
from .tiling import BlendAccumulator, TileGrid
from .writer import GDAL_CACHE_MB, GeoTiffWriter, check_output_path


PROBABILITY_SCALE = 250  # probabilities are stored as round(p * 250) in uint8; 255 is nodata


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pool_missing(missing: np.ndarray, scale: int, inside: tuple[int, int]) -> np.ndarray:
    """A `(h, w)` mask on a `scale`-times coarser grid: a cell is missing when any of its pixels inside the scene
    (the first `inside` rows and columns of the tile) is; padding beyond the scene edge does not count."""
    if scale == 1:
        return missing
    missing = missing.copy()
    missing[inside[0] :, :] = False
    missing[:, inside[1] :] = False
    height, width = missing.shape
    return missing.reshape(height // scale, scale, width // scale, scale).any(axis=(1, 3))


def check_scene(scene: Scene, tile_model, per_date: bool) -> None:
    """Refuse a scene that the tile model's outputs would misrepresent: read with `gaps="fill"` for per-date outputs
    (they would show values on the dates that miss the pixel), or not knowing the image processor's `nodata_value`
    (the processor fills those pixels, so the outputs would show predictions there instead of nodata)."""
    if scene.gaps == "fill" and per_date:
        raise ValueError(
            "--gaps fill (a scene read with gaps='fill') needs outputs that fuse the dates (a model with "
            "temporal_fusion='max', or timo embed's mean or max pooling): per-date outputs would show values on the "
            "dates that miss the pixel"
        )
    nodata = tile_model.processor.nodata_value
    if nodata is not None and not math.isnan(nodata) and nodata not in scene.nodata:
        raise ValueError(
            f"the model's image processor reads {nodata} as nodata but the scene does not (its nodata: "
            f"{list(scene.nodata)}): build it with Scene(..., nodata=[..., {nodata}]), as timo predict and timo embed "
            "do, so that those pixels are nodata in the outputs"
        )


def run_tiles(scene: Scene, grid: TileGrid, tile_model, channels: int, batch_size: int, on_region,
              description: str = "tiles", progress: bool = True) -> None:
    """Read, predict and blend every tile of `grid`; call `on_region(window, values, missing)` for each finished
    region of the output grid."""
    accumulator = BlendAccumulator(grid, channels)
    bar = tqdm(total=len(grid), desc=description, unit="tile", disable=not progress, dynamic_ncols=True)
    batch = []

    def flush():
        reads = [scene.read(tile.window) for tile in batch]
        outputs = tile_model(np.stack([values for values, _ in reads]))
        for tile, output, (_, missing) in zip(batch, outputs, reads):
            inside = (scene.height - int(tile.window.row_off), scene.width - int(tile.window.col_off))
            pooled = pool_missing(missing, grid.scale, inside)
            for window, values, region_missing in accumulator.add(tile, output, pooled):
                on_region(window, values, region_missing)
        bar.update(len(batch))
        batch.clear()

    try:
        for tile in grid:
            batch.append(tile)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        bar.close()


def pixel_rate(pixels: int, seconds: float) -> str:
    """Pixels per second with a unit that keeps small scenes readable: '2.41 Mpx/s', '33.6 kpx/s', '950 px/s'."""
    rate = pixels / max(seconds, 1e-9)
    for unit, scale, digits in (("Mpx/s", 1e6, 2), ("kpx/s", 1e3, 1)):
        if rate >= scale:
            return f"{rate / scale:.{digits}f} {unit}"
    return f"{rate:.0f} px/s"


@dataclass
class InferenceSummary:
    """What a run did; `format()` is the summary the command line prints."""

    scene: str
    tiles: int
    tile_size: int
    overlap: int
    pixels: int
    missing_pixels: int
    seconds: float
    device: str
    peak_memory_mb: float
    outputs: dict[str, Path] = field(default_factory=dict)
    class_names: list[str] | None = None
    class_counts: list[int] | None = None
    aligned: list[str] = field(default_factory=list)

    @property
    def class_fractions(self) -> list[float] | None:
        if self.class_counts is None:
            return None
        total = max(sum(self.class_counts), 1)
        return [count / total for count in self.class_counts]

    def format(self) -> str:
        valid = self.pixels - self.missing_pixels
        lines = [
            f"scene         {self.scene}",
            f"tiles         {self.tiles} of {self.tile_size} px, overlap {self.overlap} px, on {self.device}",
            f"pixels        {self.pixels:,} ({valid:,} predicted, {self.missing_pixels:,} nodata)",
            f"time          {self.seconds:.1f} s ({pixel_rate(self.pixels, self.seconds)}), "
            f"peak memory {self.peak_memory_mb:.0f} MB",
        ]
        if self.aligned:
            lines.append(f"aligned       {', '.join(self.aligned)} resampled onto the first date's grid")
        if self.class_counts is not None:
            shares = zip(self.class_names, self.class_fractions)
            shares = ", ".join(f"{name} {100 * share:.1f}%" for name, share in shares)
            lines.append(f"classes       {shares}")
        lines += [f"{kind:<13} {path}" for kind, path in self.outputs.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        data = dict(self.__dict__)
        data["outputs"] = {kind: str(path) for kind, path in self.outputs.items()}
        data["class_fractions"] = self.class_fractions
        return data


def class_names_of(config) -> list[str]:
    return [str(config.id2label.get(i, f"class_{i}")) for i in range(config.num_labels)]


def default_companion(output: Path, suffix: str) -> Path:
    """`map.tif` -> `map<suffix>` (e.g. `map.png`, `map_probabilities.tif`)."""
    return output.with_name(output.stem + suffix)


def predict_scene(
    scene: Scene,
    segmenter: TileSegmenter,
    output: str | Path,
    *,
    tile_size: int = 256,
    overlap: int = 64,
    batch_size: int = 4,
    probabilities: str | Path | None = None,
    quicklook: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    tags: dict | None = None,
) -> InferenceSummary:
    """Class map of `scene` (uint8, nodata 255, colour table) at `output`, optionally per-class probabilities
    (uint8 `round(p * 250)` with scale 1/250, nodata 255) and a PNG quicklook; every output is a COG on the scene's
    grid, written under a temporary name and renamed at the end."""
    started = time.perf_counter()
    maps = segmenter.maps_per_tile(scene.num_frames)
    check_scene(scene, segmenter, per_date=maps > 1)
    output = check_output_path(output, overwrite)
    probabilities = check_output_path(probabilities, overwrite) if probabilities else None
    quicklook = check_output_path(quicklook, overwrite) if quicklook else None
    config = segmenter.model.config
    names = class_names_of(config)
    num_labels = segmenter.num_labels
    dtype, nodata = ("uint8", 255) if num_labels <= 255 else ("uint16", 65535)
    colormap = class_colormap(num_labels)
    # one map per date for temporal_fusion="none" models: bands named by date (or frame index)
    when = [d.isoformat() for d in scene.dates] if scene.dates else [f"frame {t}" for t in range(maps)]
    when = [""] if maps == 1 else [f" {label}" for label in when]
    grid_tags = {
        "TIMO_CLASSES": {i: name for i, name in enumerate(names)},
        "TIMO_DATES": [d.isoformat() for d in scene.dates] if scene.dates else None,
        "TIMO_INPUTS": [frame.label for frame in scene.frames],
        **(tags or {}),
    }
    geo = dict(crs=scene.crs, transform=scene.transform, height=scene.height, width=scene.width)
    counts = np.zeros(num_labels, dtype=np.int64)
    missing_pixels = 0
    grid = TileGrid(scene.height, scene.width, tile_size, overlap)

    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        writers = [GeoTiffWriter(
            output, **geo, count=maps, dtype=dtype, nodata=nodata, descriptions=[f"class{w}" for w in when],
            colormap=colormap if dtype == "uint8" else None, tags=grid_tags, overwrite=overwrite,
        )]
        if probabilities:
            writers.append(GeoTiffWriter(
                probabilities, **geo, count=maps * num_labels, dtype="uint8", nodata=255,
                descriptions=[f"p({name}){w}" for w in when for name in names],
                tags=grid_tags, scale=1 / PROBABILITY_SCALE, overview_resampling="average", overwrite=overwrite,
            ))

        def on_region(window, values, missing):
            nonlocal missing_pixels
            values = values.reshape(maps, num_labels, *values.shape[-2:])
            classes = values.argmax(axis=1).astype(dtype)
            counts[:] += np.bincount(classes[:, ~missing].ravel(), minlength=num_labels)[:num_labels]
            classes[:, missing] = nodata
            missing_pixels += int(missing.sum())
            writers[0].write(window, classes)
            if probabilities:
                scaled = np.rint(values.reshape(maps * num_labels, *values.shape[-2:]) * PROBABILITY_SCALE)
                scaled = scaled.astype(np.uint8)
                scaled[:, missing] = 255
                writers[1].write(window, scaled)

        try:
            run_tiles(scene, grid, segmenter, maps * num_labels, batch_size, on_region, "predict", progress)
            for writer in writers:
                writer.finish()
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        outputs = {"map": writers[0].publish()}
        if probabilities:
            outputs["probabilities"] = writers[1].publish()

    summary = InferenceSummary(
        scene=scene.describe(), tiles=len(grid), tile_size=tile_size, overlap=overlap,
        pixels=scene.height * scene.width, missing_pixels=missing_pixels, seconds=0.0,
        device=str(segmenter.device), peak_memory_mb=0.0, class_names=names, class_counts=counts.tolist(),
        outputs=outputs, aligned=scene.aligned,
    )
    if quicklook:
        span = f", {scene.dates[0].isoformat()} to {scene.dates[-1].isoformat()}" if scene.dates else ""
        outputs["quicklook"] = write_quicklook(
            output, quicklook, names, colormap, band=maps, class_fractions=summary.class_fractions,
            title=f"{output.name}: {scene.num_frames} dates{span}",
        )
    summary.seconds = time.perf_counter() - started
    summary.peak_memory_mb = peak_memory_mb()
    return summary


def embed_scene(
    scene: Scene,
    embedder: TileEmbedder,
    output: str | Path,
    *,
    tile_size: int = 256,
    overlap: int = 64,
    batch_size: int = 4,
    overwrite: bool = False,
    progress: bool = True,
    tags: dict | None = None,
) -> InferenceSummary:
    """One stage's features of `scene` as a float32 COG: one band per channel (per date and channel without
    temporal pooling), on the stage's grid (the scene's transform scaled by the stage stride), NaN where any input
    pixel of a cell is nodata."""
    started = time.perf_counter()
    check_scene(scene, embedder, per_date=embedder.temporal_pooling == "none")
    output = check_output_path(output, overwrite)
    stride = embedder.stride
    grid = TileGrid(scene.height, scene.width, tile_size, overlap, scale=stride)
    channels = embedder.channels * (scene.num_frames if embedder.temporal_pooling == "none" else 1)
    if embedder.temporal_pooling == "none":
        descriptions = [f"t{t}_c{c}" for t in range(scene.num_frames) for c in range(embedder.channels)]
    else:
        descriptions = [f"c{c}" for c in range(channels)]
    missing_pixels = 0
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        writer = GeoTiffWriter(
            output, crs=scene.crs, transform=scene.transform @ Affine.scale(stride), height=grid.out_height,
            width=grid.out_width, count=channels, dtype="float32", nodata=float("nan"), descriptions=descriptions,
            overview_resampling="average", overwrite=overwrite,
            tags={"TIMO_STRIDE": stride, "TIMO_TEMPORAL_POOLING": embedder.temporal_pooling,
                  "TIMO_DATES": [d.isoformat() for d in scene.dates] if scene.dates else None,
                  "TIMO_INPUTS": [frame.label for frame in scene.frames], **(tags or {})},
        )

        def on_region(window, values, missing):
            nonlocal missing_pixels
            values[:, missing] = np.nan
            missing_pixels += int(missing.sum())
            writer.write(window, values)

        with writer:
            run_tiles(scene, grid, embedder, channels, batch_size, on_region, "embed", progress)
            path = writer.commit()
    return InferenceSummary(
        scene=scene.describe(), tiles=len(grid), tile_size=tile_size, overlap=overlap,
        pixels=grid.out_height * grid.out_width, missing_pixels=missing_pixels,
        seconds=time.perf_counter() - started, device=str(embedder.device), peak_memory_mb=peak_memory_mb(),
        outputs={"embeddings": path}, aligned=scene.aligned,
    )


def write_summary_json(summary: InferenceSummary, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(summary.to_dict(), indent=2, default=str))
    return path
