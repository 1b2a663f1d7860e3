"""MTLCC (Russwurm & Koerner 2018): Sentinel-2 time series over Bavaria with crop-type masks (GeoTIFF version)."""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass

import numpy as np

from .base import RawSample, SampleRef, TiMoBuilderConfig, TiMoRawBuilder, parse_date
from .faults import FaultKind, SampleError
from .raster import read_raster


_DATE_FILE = re.compile(r"^(\d{8})_10m\.tif$")
_GROUPS = (("10m", ("B4", "B3", "B2", "B8")),
           ("20m", ("B5", "B6", "B7", "B8A", "B11", "B12")),
           ("60m", ("B1", "B9", "B10")))


@dataclass
class MTLCCConfig(TiMoBuilderConfig):
    """fold: which train_fold<k>/test_fold<k> tileid files define the train and validation splits."""

    fold: int = 0


class MTLCC(TiMoRawBuilder):
    """MTLCC: multi-temporal land-cover classification, Bavaria 2016/2017, Sentinel-2 L1C, 17 crop classes.

    Source: GeoTIFF version of TUM-LMF/MTLCC-pytorch (``download.sh`` -> corupublic/mtlcc/pytorch/data.zip);
    original tfrecords in MarcCoru/MTLCC.

    Raw layout (``data_dir`` is the dataset root)::

        data/<tileid>/<YYYYMMDD>_10m.tif   4 bands  B4, B3, B2, B8       (10 m grid, e.g. 48 x 48 px)
        data/<tileid>/<YYYYMMDD>_20m.tif   6 bands  B5, B6, B7, B8A, B11, B12 (20 m)
        data/<tileid>/<YYYYMMDD>_60m.tif   3 bands  B1, B9, B10          (60 m)
        data/<tileid>/y.tif                class ids (one mask per tile)
        classes.txt                        one "id|name" row per class; the row index is the label
        tileids/train_fold<k>.tileids, tileids/test_fold<k>.tileids, tileids/eval.tileids

    Bands: the 13 bands in the order 10 m + 20 m + 60 m as above (the official concatenation order); 20 m and 60 m
    bands are resampled onto the 10 m grid with ``resampling`` (default "nearest", as the official loader).
    Dates: every date with a ``_10m`` file, sorted; a date missing its 20 m or 60 m file is a ``missing_band``
    fault. ``num_frames`` keeps the first k dates chronologically; the official loader takes the first 30 dates in
    os.listdir order and drops tiles with fewer than 30 (``num_frames=30, min_frames=30`` is the deterministic
    equivalent).

    Labels: y.tif ids mapped to their row index in classes.txt; ids not in classes.txt become 0 (as official).

    Splits (official, reproduced): tiles of ``train_fold<fold>.tileids`` -> train, ``test_fold<fold>.tileids``
    -> validation, ``eval.tileids`` -> test (``fold`` option, default 0). Tiles listed nowhere are not used. The
    official code only shuffles the iteration order (seeds 6 and 10); here each split is sorted by tile id.
    Without a tileids folder the tiles are split by fractions (shuffled with ``split_seed``) with a warning.

    Licence: not stated by the authors (check before redistribution).
    Citation: Russwurm and Koerner, "Multi-Temporal Land Cover Classification with Sequential Recurrent
    Encoders", ISPRS International Journal of Geo-Information 7(4), 2018.
    """

    BAND_NAMES = tuple(band for _, bands in _GROUPS for band in bands)
    DEFAULT_RESAMPLING = "nearest"
    HOMEPAGE = "https://github.com/TUM-LMF/MTLCC-pytorch"
    LICENSE = "unknown"
    CITATION = ("@article{russwurm2018mtlcc, title={Multi-Temporal Land Cover Classification with Sequential Recurrent "
                "Encoders}, author={Ru{\\ss}wurm, Marc and K{\\\"o}rner, Marco}, journal={ISPRS International Journal "
                "of Geo-Information}, volume={7}, number={4}, year={2018}}")

    BUILDER_CONFIG_CLASS = MTLCCConfig

    @functools.cached_property
    def _class_index(self) -> dict[int, int]:
        path = self.root / "classes.txt"
        if not path.is_file():
            raise FileNotFoundError(f"MTLCC: {path} not found (rows 'id|name'; the row index is the label)")
        ids = [int(row.split("|")[0]) for row in path.read_text().splitlines() if row.split("|")[0].strip().isdigit()]
        return {class_id: index for index, class_id in enumerate(ids)}

    def _list_samples(self) -> list[SampleRef]:
        tiles = sorted(path.name for path in (self.root / "data").iterdir() if path.is_dir()) \
            if (self.root / "data").is_dir() else []
        return [SampleRef(tile, tile, tile) for tile in tiles]

    def _tileids(self, name: str) -> set[str]:
        return set((self.root / "tileids" / f"{name}.tileids").read_text().split())

    def _split_by_tileid_files(self, refs):
        names = {"train": f"train_fold{self.config.fold}", "validation": f"test_fold{self.config.fold}", "test": "eval"}
        members = {split: self._tileids(name) for split, name in names.items()}
        return {split: [ref for ref in refs if ref.group in tiles] for split, tiles in members.items()}

    def assign_splits(self):
        if (self.root / "tileids").is_dir():
            return self._split_by_tileid_files(self.samples())
        warnings.warn(f"MTLCC: no tileids folder under {self.root}; splitting tiles by fractions instead")
        return super().assign_splits()

    def _read_sample(self, ref: SampleRef) -> RawSample:
        folder = self.root / "data" / ref.payload
        stamps = sorted(match.group(1) for path in folder.iterdir() if (match := _DATE_FILE.match(path.name)))
        stamps = self.limit_frames(stamps, [parse_date(stamp) for stamp in stamps])
        frames, geo = [], None
        for stamp in stamps:
            grid, by_name = self.config.image_size, {}
            for suffix, bands in _GROUPS:
                array, part_geo = read_raster(folder / f"{stamp}_{suffix}.tif", out_shape=grid,
                                              resampling=self.resampling, missing_kind=FaultKind.MISSING_BAND)
                if array.shape[0] != len(bands):
                    raise SampleError(FaultKind.SHAPE_MISMATCH, f"{stamp}_{suffix}.tif has {array.shape[0]} bands, "
                                                                f"expected {len(bands)} ({', '.join(bands)})")
                grid = grid or array.shape[1:]  # the 10 m file defines the grid of the 20 m / 60 m files
                geo = geo or part_geo
                by_name.update(zip(bands, array))
            frames.append(np.stack([by_name[band] for band in self.band_names]))
        raw_label, _ = read_raster(folder / "y.tif", indexes=[1], out_shape=self.config.image_size,
                                   resampling="nearest", missing_kind=FaultKind.MISSING_LABEL)
        values, inverse = np.unique(raw_label[0], return_inverse=True)
        index = self._class_index
        label = np.array([index.get(int(value), 0) for value in values])[inverse].reshape(raw_label.shape[1:])
        return RawSample(frames=frames, dates=[parse_date(stamp) for stamp in stamps], geo=geo, label=label)
