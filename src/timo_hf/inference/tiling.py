"""Sliding windows over a scene and streaming, seam-free blending of their overlapping predictions.

:class:`TileGrid` places square tiles of `tile_size` pixels every `tile_size - overlap` pixels; the last row and
column are moved back to end at the scene edge, so every pixel is seen with full context and no tile is padded
(except in scenes smaller than one tile). Tiles may predict on a coarser grid (`scale`: 4 for the stem, 32 for the
last stage), in which case their origins are kept on multiples of `scale`.

:class:`BlendAccumulator` adds each tile's prediction weighted by :func:`blend_weights` (1 in the middle, falling
smoothly towards the tile border over the overlap) and hands out a region, normalised by the summed weights, as soon
as every tile covering it has been added. Tiles are processed row by row, so only the regions still waiting for the
next row of tiles are held: memory is about `overlap x scene width`, never the scene.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from rasterio.windows import Window


MODEL_MULTIPLE = 32  # TiMo's coarsest stage has stride 32: tiles are multiples of it


@dataclass(frozen=True)
class Tile:
    """One window: `window` in scene pixels (it may reach past the bottom/right edge of scenes smaller than a
    tile), `out_window` the part of the output grid it predicts (clipped to the grid), `row`/`col` its grid cell."""

    row: int
    col: int
    window: Window
    out_window: Window


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tile_origins(length: int, tile: int, stride: int, multiple: int = 1) -> list[int]:
    """Origins `0, stride, 2 * stride, ...` and a last one ending at `length` (rounded up to `multiple`)."""
    if length <= tile:
        return [0]
    origins = list(range(0, length - tile, stride))
    last = round_up(length - tile, multiple)
    if last > origins[-1]:
        origins.append(last)
    return origins


@lru_cache(maxsize=16)
def blend_weights(height: int, width: int, ramp: int) -> np.ndarray:
    """`(height, width)` float32 weights: 1 inside, rising as `sin^2` over `ramp` pixels from each border.

    Never 0, so a pixel seen by a single tile (at the scene border) still gets that tile's value exactly after
    normalisation.
    """

    def profile(length: int) -> np.ndarray:
        ramp_length = min(ramp, length // 2)
        weights = np.ones(length, dtype=np.float64)
        if ramp_length > 0:
            rise = np.sin(0.5 * np.pi * (np.arange(ramp_length) + 0.5) / ramp_length) ** 2
            weights[:ramp_length] = rise
            weights[length - ramp_length :] = rise[::-1]
        return weights

    weights = np.outer(profile(height), profile(width)).astype(np.float32)
    weights.setflags(write=False)
    return weights


class TileGrid:
    """The tiles of a `height x width` scene, row-major; see the module docstring.

    Args:
        tile_size: tile side in pixels (a multiple of 32; shrunk to the scene for small scenes).
        overlap: pixels shared by neighbouring tiles (a multiple of `scale`, less than `tile_size`).
        scale: the prediction's pixel size in scene pixels (1 for segmentation maps).
    """

    def __init__(self, height: int, width: int, tile_size: int, overlap: int, scale: int = 1):
        if tile_size < MODEL_MULTIPLE or tile_size % MODEL_MULTIPLE:
            raise ValueError(f"tile size must be a positive multiple of {MODEL_MULTIPLE}, got {tile_size}")
        if not 0 <= overlap < tile_size:
            raise ValueError(f"overlap must be in [0, tile size {tile_size}), got {overlap}")
        if overlap % scale:
            raise ValueError(f"overlap must be a multiple of the output stride {scale}, got {overlap}")
        self.height, self.width, self.scale = height, width, scale
        self.tile_height = min(tile_size, round_up(height, MODEL_MULTIPLE))
        self.tile_width = min(tile_size, round_up(width, MODEL_MULTIPLE))
        self.overlap = overlap
        stride = tile_size - overlap
        self.row_origins = tile_origins(height, self.tile_height, stride, scale)
        self.col_origins = tile_origins(width, self.tile_width, stride, scale)
        self.out_height, self.out_width = math.ceil(height / scale), math.ceil(width / scale)

    def __len__(self) -> int:
        return len(self.row_origins) * len(self.col_origins)

    def out_span(self, origin: int, tile: int, limit: int) -> tuple[int, int]:
        start = origin // self.scale
        return start, min(start + tile // self.scale, limit)

    def __iter__(self):
        for row, y in enumerate(self.row_origins):
            top, bottom = self.out_span(y, self.tile_height, self.out_height)
            for col, x in enumerate(self.col_origins):
                left, right = self.out_span(x, self.tile_width, self.out_width)
                yield Tile(row, col, Window(x, y, self.tile_width, self.tile_height),
                           Window(left, top, right - left, bottom - top))

    @property
    def out_tile_shape(self) -> tuple[int, int]:
        return self.tile_height // self.scale, self.tile_width // self.scale


def _cells(spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Edges of the intervals that the spans cut an axis into, and how many spans cover each interval."""
    edges = sorted({edge for span in spans for edge in span})
    cover = [sum(start <= lo and hi <= stop for start, stop in spans) for lo, hi in zip(edges[:-1], edges[1:])]
    return edges, cover


class BlendAccumulator:
    """Weighted sums of tile predictions on the output grid of `grid`, released region by region when complete.

    `add(tile, values, missing)` takes the tile's `(channels, h, w)` prediction on the output grid (the full tile,
    `grid.out_tile_shape`) and its `(h, w)` missing-data mask, and returns the regions it completed as
    `(out_window, blended (channels, h, w), missing (h, w))`. A pixel is missing when any tile saw it missing (all
    tiles see the same input there).
    """

    def __init__(self, grid: TileGrid, channels: int):
        self.grid, self.channels = grid, channels
        rows = [grid.out_span(y, grid.tile_height, grid.out_height) for y in grid.row_origins]
        cols = [grid.out_span(x, grid.tile_width, grid.out_width) for x in grid.col_origins]
        self._row_edges, self._row_cover = _cells(rows)
        self._col_edges, self._col_cover = _cells(cols)
        self._pending: dict[tuple[int, int], list] = {}
        out_h, out_w = grid.out_tile_shape
        self._weights = blend_weights(out_h, out_w, grid.overlap // grid.scale)

    @property
    def pending_pixels(self) -> int:
        """Output pixels held while waiting for more tiles (the accumulator's memory, per channel)."""
        return sum(entry[1].size for entry in self._pending.values())

    def add(self, tile: Tile, values: np.ndarray, missing: np.ndarray) -> list[tuple[Window, np.ndarray, np.ndarray]]:
        window = tile.out_window
        top, left = int(window.row_off), int(window.col_off)
        bottom, right = top + int(window.height), left + int(window.width)
        first_row = bisect.bisect_right(self._row_edges, top) - 1
        first_col = bisect.bisect_right(self._col_edges, left) - 1
        done = []
        i = first_row
        while i < len(self._row_cover) and self._row_edges[i] < bottom:
            r0, r1 = self._row_edges[i], self._row_edges[i + 1]
            j = first_col
            while j < len(self._col_cover) and self._col_edges[j] < right:
                c0, c1 = self._col_edges[j], self._col_edges[j + 1]
                rows, cols = slice(r0 - top, r1 - top), slice(c0 - left, c1 - left)
                weights = self._weights[rows, cols]
                entry = self._pending.get((i, j))
                if entry is None:
                    entry = self._pending[(i, j)] = [
                        np.zeros((self.channels, r1 - r0, c1 - c0), np.float32),
                        np.zeros((r1 - r0, c1 - c0), np.float32),
                        np.zeros((r1 - r0, c1 - c0), bool),
                        0,
                    ]
                entry[0] += values[:, rows, cols] * weights
                entry[1] += weights
                entry[2] |= missing[rows, cols]
                entry[3] += 1
                if entry[3] == self._row_cover[i] * self._col_cover[j]:
                    del self._pending[(i, j)]
                    done.append((Window(c0, r0, c1 - c0, r1 - r0), entry[0] / entry[1], entry[2]))
                j += 1
            i += 1
        return done
