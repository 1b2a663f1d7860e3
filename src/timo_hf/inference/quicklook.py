"""PNG quicklook of a class map with a legend, read from the map's overviews (bounded memory)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling

from ..plotting import pyplot


NODATA_RGBA = (0, 0, 0, 0)


def class_colormap(num_classes: int) -> dict[int, tuple[int, int, int, int]]:
    """Distinct colours for classes 0..num_classes-1 (matplotlib's tab10 / tab20, then an evenly spread hsv)."""
    from matplotlib import colormaps

    if num_classes <= 10:
        colors = [colormaps["tab10"](i) for i in range(num_classes)]
    elif num_classes <= 20:
        colors = [colormaps["tab20"](i) for i in range(num_classes)]
    else:
        colors = [colormaps["hsv"](i / num_classes) for i in range(num_classes)]
    return {i: tuple(int(round(255 * c)) for c in color[:3]) + (255,) for i, color in enumerate(colors)}


def class_listed_colormap(num_classes: int):
    """`class_colormap` as a matplotlib colormap indexed by class (for `imshow(..., vmin=0, vmax=num_classes - 1)`),
    so that every figure of the package draws a class in the same colour."""
    from matplotlib.colors import ListedColormap

    colors = class_colormap(num_classes)
    return ListedColormap([np.asarray(colors[i][:3]) / 255 for i in range(num_classes)])


def write_quicklook(
    map_path: str | os.PathLike,
    png_path: str | os.PathLike,
    class_names: list[str],
    colormap: dict[int, tuple[int, int, int, int]],
    *,
    title: str | None = None,
    band: int = 1,
    max_size: int = 1024,
    class_fractions: list[float] | None = None,
) -> Path:
    """Render band `band` of the class map at most `max_size` pixels wide/high, with a legend of `class_names`
    (and their share of the valid pixels, when given); nodata is transparent."""
    plt = pyplot()
    from matplotlib.patches import Patch

    with rasterio.open(map_path) as dataset:
        factor = max(1, math.ceil(max(dataset.height, dataset.width) / max_size))
        shape = (math.ceil(dataset.height / factor), math.ceil(dataset.width / factor))
        classes = dataset.read(band, out_shape=shape, resampling=Resampling.nearest)
        nodata = dataset.nodata
        units = dataset.crs.linear_units if dataset.crs and dataset.crs.is_projected else None
        pixel = abs(dataset.transform.a) * factor
    lookup = np.zeros((max(int(classes.max(initial=0)) + 1, len(class_names), 256), 4), dtype=np.uint8)
    for value, rgba in colormap.items():
        lookup[value] = rgba
    if nodata is not None and 0 <= nodata < len(lookup):
        lookup[int(nodata)] = NODATA_RGBA
    image = lookup[classes]

    figure, axis = plt.subplots(figsize=(8, 8 * shape[0] / shape[1] + 0.6), dpi=110)
    axis.imshow(image, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    if title:
        axis.set_title(title, fontsize=10)
    if units:
        axis.set_xlabel(f"{pixel:g} {units} per displayed pixel", fontsize=8)
    labels = [
        name if class_fractions is None else f"{name} ({100 * class_fractions[i]:.1f}%)"
        for i, name in enumerate(class_names)
    ]
    handles = [Patch(color=np.asarray(colormap[i][:3]) / 255, label=label) for i, label in enumerate(labels)]
    if nodata is not None:
        handles.append(Patch(facecolor="white", edgecolor="grey", label="nodata"))
    axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    png_path = Path(png_path)
    partial = png_path.with_name(f".{png_path.name}.{os.getpid()}.partial.png")
    try:
        figure.savefig(partial, bbox_inches="tight")
        os.replace(partial, png_path)
    finally:
        plt.close(figure)
        partial.unlink(missing_ok=True)
    return png_path
