"""Georeferenced GeoTIFF output written window by window, published as a Cloud-Optimized GeoTIFF in one rename.

:class:`GeoTiffWriter` writes windows into a hidden `.<name>.<pid>.partial.tif` next to the output (tiled, fast
deflate), then copies it with GDAL's COG driver (tiled, deflate-compressed, with overviews) to another hidden name
and renames that onto the output path. An interrupted or failed run removes its temporary files, and a killed one
leaves only hidden `.partial` files: the output path never holds a half-written raster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window


# GDAL's raster block cache (MB): large enough for a row of output blocks, small and fixed so that memory does not
# grow with the scene.
GDAL_CACHE_MB = 64


def check_output_path(path: str | os.PathLike, overwrite: bool) -> Path:
    """The output path, refusing an existing file unless `overwrite` and a folder given as the file; its folder is
    created where missing."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name such as {path / 'map.tif'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class GeoTiffWriter:
    """One output raster on the grid `crs` / `transform` / `height` x `width`; see the module docstring.

    Args:
        path: final output path.
        count, dtype, nodata: bands, data type and nodata value.
        descriptions: one name per band.
        colormap: `{value: (r, g, b, a)}` for band 1 (uint8 class maps), shown by GIS viewers.
        tags: dataset metadata (values are JSON-encoded unless strings).
        scale: per-band value scale, e.g. 1/250 for probabilities stored as 0..250.
        overview_resampling: how the COG overviews are computed ("nearest" for classes, "average" for values).
        overwrite: replace an existing `path` at the end.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        crs,
        transform,
        height: int,
        width: int,
        count: int,
        dtype: str,
        nodata: float | None,
        descriptions: list[str] | None = None,
        colormap: dict[int, tuple[int, int, int, int]] | None = None,
        tags: dict | None = None,
        scale: float | None = None,
        overview_resampling: str = "nearest",
        overwrite: bool = False,
    ):
        self.path = check_output_path(path, overwrite)
        self.overwrite = overwrite
        self.overview_resampling = overview_resampling
        self._partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial.tif")
        self._cog = self.path.with_name(f".{self.path.name}.{os.getpid()}.cog.tif")
        profile = dict(
            driver="GTiff", height=height, width=width, count=count, dtype=dtype, nodata=nodata, crs=crs,
            transform=transform, tiled=True, blockxsize=512, blockysize=512, compress="deflate", zlevel=1,
            bigtiff="IF_SAFER",
        )
        self._dataset = rasterio.open(self._partial, "w", **profile)
        if descriptions:
            for band, description in enumerate(descriptions, start=1):
                self._dataset.set_band_description(band, description)
        if colormap:
            self._dataset.write_colormap(1, colormap)
        if tags:
            self._dataset.update_tags(**{k: v if isinstance(v, str) else json.dumps(v) for k, v in tags.items()})
        if scale is not None:
            self._dataset.scales = [scale] * count

    def write(self, window: Window, array: np.ndarray) -> None:
        """Write `(count, h, w)` (or `(h, w)` for one band) values at `window`."""
        self._dataset.write(array if array.ndim == 3 else array[None], window=window)

    def finish(self) -> None:
        """Close the window-by-window file and convert it to a COG under a hidden name."""
        self._dataset.close()
        try:
            rasterio.shutil.copy(
                self._partial, self._cog, driver="COG", compress="deflate", blocksize=512, bigtiff="IF_SAFER",
                overview_resampling=self.overview_resampling,
            )
        except BaseException:
            self._remove_temporary()
            raise
        self._partial.unlink(missing_ok=True)

    def publish(self) -> Path:
        """Rename the finished COG onto the output path (atomic on one file system); returns the path."""
        if self.path.exists() and not self.overwrite:
            self._remove_temporary()
            raise FileExistsError(f"{self.path} appeared while predicting; pass --overwrite to replace it")
        os.replace(self._cog, self.path)
        return self.path

    def commit(self) -> Path:
        """`finish()` then `publish()`."""
        self.finish()
        return self.publish()

    def abort(self) -> None:
        """Drop everything written so far (the output path is left as it was)."""
        if not self._dataset.closed:
            self._dataset.close()
        self._remove_temporary()

    def _remove_temporary(self) -> None:
        for temporary in (self._partial, self._cog):
            temporary.unlink(missing_ok=True)
            Path(f"{temporary}.aux.xml").unlink(missing_ok=True)

    def __enter__(self) -> "GeoTiffWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
