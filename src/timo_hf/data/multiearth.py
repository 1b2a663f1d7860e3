"""MultiEarth deforestation (CVPR 2022/2023 challenge): Amazon image time series paired with monthly masks."""

from __future__ import annotations

import datetime
import functools
import os
import re
from collections import defaultdict
from dataclasses import dataclass

import datasets

from . import netcdf
from .base import RawSample, SampleRef, TiMoBuilderConfig, TiMoRawBuilder, parse_date, require_dates
from .faults import FaultKind, SampleError
from .raster import GeoInfo, read_raster, stack_planes
from .splits import split_by_counts


SENSORS = {
    # folder: (file prefix, NetCDF data_source, bands, default bands)
    "sent2": ("Sentinel2", "Sentinel-2", ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12",
                                          "QA60"), ("B4", "B3", "B2")),
    "sent1": ("Sentinel1", "Sentinel-1", ("VV", "VH"), ("VV", "VH")),
    "landsat5": ("Landsat5", "Landsat-5", ("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B7", "ST_B6", "QA_PIXEL"),
                 ("SR_B3", "SR_B2", "SR_B1")),
    "landsat8": ("Landsat8", "Landsat-8", ("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7", "ST_B10",
                                           "QA_PIXEL"), ("SR_B4", "SR_B3", "SR_B2")),
}
_NAME = r"_(?P<lon>-?\d+(?:\.\d+)?)_(?P<lat>-?\d+(?:\.\d+)?)_(?P<date>\d{4}_\d{2}_\d{2})\.tiff?$"
_MASK = "deforestation"


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _month_index(date: datetime.date) -> int:
    return date.year * 12 + date.month - 1


@dataclass
class MultiEarthConfig(TiMoBuilderConfig):
    """sensor: sent2 | sent1 | landsat5 | landsat8. source: "tiff", "netcdf" or "auto" (TIFF folders if present).
    pairing: "mask" (one example per mask) or "per_frame" (one per location, a mask per frame).
    window_months: with pairing="mask", also use images of this many months before the mask's month."""

    sensor: str = "sent2"
    source: str = "auto"
    pairing: str = "mask"
    window_months: int = 0


class MultiEarth(TiMoRawBuilder):
    """MultiEarth deforestation: Sentinel-1/2 and Landsat-5/8 over the Amazon with monthly deforestation masks.

    Source: sites.google.com/view/rainforest-challenge; tools github.com/MIT-AI-Accelerator/multiearth-challenge.

    Raw layout, as the challenge distributes it (``data_dir`` is the folder holding the sensor folders)::

        sent2/Sentinel2_<band>_<lon>_<lat>_<YYYY_MM_DD>.tiff   single band, no CRS (centre lon/lat in the name)
        sent1/Sentinel1_<VV|VH>_..., landsat5/Landsat5_<band>_..., landsat8/Landsat8_<band>_...
        deforestation/Deforestation_<lon>_<lat>_<YYYY_MM_01>.tiff   monthly binary mask (uint8)
        *.nc    the same arrays as NetCDF (one file per sensor + one for the masks; see ``timo_hf.data.netcdf``)

    ``source="auto"`` reads the TIFF folders when ``<sensor>/`` exists, otherwise the NetCDF files (identified by
    their ``data_source`` attribute, else by file name). Locations are keyed by lon/lat rounded to 0.01 degree.

    Bands (``bands``; default RGB as TiMo uses): sent2 B1..B12, B8A, QA60 (default B4, B3, B2); sent1 VV, VH;
    landsat5 SR_B1..SR_B7, ST_B6, QA_PIXEL; landsat8 SR_B1..SR_B7, ST_B10, QA_PIXEL. Raw values, native dtype.

    Date matching (``pairing="mask"``, default): one example per mask (location, month). Its frames are the
    images of that location acquired in the mask's calendar month (plus the ``window_months`` months before);
    when there are more than ``num_frames`` (default 3, TiMo's T) the latest ones are kept, then sorted by date.
    A location may have fewer dates than requested: any number >= ``min_frames`` (default 1; counted before
    ``num_frames`` keeps some) is kept as it is.
    ``pairing="per_frame"`` (the TiMo setup, per-frame targets): one example per location; frames are the first
    ``num_frames`` image dates (chronologically) whose month has a mask, and the label is (T, H, W), frame t's
    month mask. Labels are the binary deforestation masks as stored (uint8, values as the challenge distributes them).

    Geo-metadata: no CRS or transform (the TIFFs have none); ``center_lon``/``center_lat`` from the name.
    Extra column ``label_date`` (mask pairing): the mask's date.

    Splits: by location. Default: sorted locations shuffled with ``split_seed``, cut 60/20/20.
    ``split_mode="official"``: locations in order of first appearance in os.listdir of the sensor folder (NetCDF:
    file order), first 78 train, next 78 validation, rest test (TiMo's listdir split; not reproducible across
    filesystems).

    Licence: tools MIT; data terms of the challenge (unclear; check before redistribution).
    Citation: Cha et al., "MultiEarth 2022 - Multimodal Learning for Earth and Environment Workshop and
    Challenge", CVPR 2022 workshops (arXiv 2204.07649).
    """

    BUILDER_CONFIG_CLASS = MultiEarthConfig
    CLASS_NAMES = ("no deforestation", "deforestation")
    DEFAULT_NUM_FRAMES = 3
    HOMEPAGE = "https://sites.google.com/view/rainforest-challenge"
    LICENSE = "challenge terms (unclear)"
    CITATION = ("@article{cha2022multiearth, title={MultiEarth 2022 -- Multimodal Learning for Earth and Environment "
                "Workshop and Challenge}, author={Cha, Miriam and others}, journal={arXiv preprint arXiv:2204.07649}, "
                "year={2022}}")

    # ------------------------------------------------------------------------------------------- options
    @property
    def sensor(self):
        if self.config.sensor not in SENSORS:
            raise ValueError(f"MultiEarth sensor must be one of {sorted(SENSORS)}, got {self.config.sensor!r}")
        return SENSORS[self.config.sensor]

    @property
    def LABEL_KIND(self):  # noqa: N802 (class-level constant on the other builders)
        if self.config.pairing not in ("mask", "per_frame"):
            raise ValueError(f"MultiEarth pairing must be 'mask' or 'per_frame', got {self.config.pairing!r}")
        return "mask" if self.config.pairing == "mask" else "frame_masks"

    @property
    def DEFAULT_BANDS(self):  # noqa: N802
        return self.sensor[3]

    def available_bands(self):
        return self.sensor[2]

    def _extra_features(self):
        return {"label_date": datasets.Value("string")} if self.config.pairing == "mask" else {}

    @functools.cached_property
    def source(self) -> str:
        source = self.config.source
        if source == "auto":
            source = "tiff" if (self.root / self.config.sensor).is_dir() else "netcdf"
        if source not in ("tiff", "netcdf"):
            raise ValueError(f"MultiEarth source must be 'auto', 'tiff' or 'netcdf', got {self.config.source!r}")
        if source == "netcdf" and self.config.image_size:
            raise ValueError("MultiEarth: image_size (resampling) is only supported with the TIFF source")
        return source

    # ------------------------------------------------------------------------------------------- index
    @functools.cached_property
    def _index(self):
        """(images[loc][date][band] -> locator, masks[loc][date] -> locator, locations in listing order)."""
        return self._tiff_index() if self.source == "tiff" else self._netcdf_index()

    def _tiff_index(self):
        images, masks, order = defaultdict(lambda: defaultdict(dict)), defaultdict(dict), []
        image_name = re.compile(rf"^{self.sensor[0]}_(?P<band>.+?)" + _NAME)
        for name in os.listdir(self.root / self.config.sensor):
            if match := image_name.match(name):
                loc = f"{float(match['lon']):.2f}_{float(match['lat']):.2f}"
                images[loc][parse_date(match["date"])][match["band"]] = ("tif", f"{self.config.sensor}/{name}")
                order.append(loc)
        mask_dir = self.root / _MASK
        for name in sorted(os.listdir(mask_dir)) if mask_dir.is_dir() else []:
            if match := re.match(r"^Deforestation" + _NAME, name):
                loc = f"{float(match['lon']):.2f}_{float(match['lat']):.2f}"
                masks[loc][parse_date(match["date"])] = ("tif", f"{_MASK}/{name}")
        return images, masks, list(dict.fromkeys(order))

    def _netcdf_index(self):
        images, masks, order = defaultdict(lambda: defaultdict(dict)), defaultdict(dict), []
        for path in sorted(self.root.glob("*.nc")):
            index = netcdf.read_index(path)
            kind = _normalise(index.source) or _normalise(path.stem)
            is_mask = _MASK in kind
            if not is_mask and _normalise(self.sensor[1]) not in kind and self.config.sensor not in path.stem:
                continue
            for position, (date, (lat, lon)) in enumerate(zip(index.dates, index.lat_lons)):
                loc = f"{lon:.2f}_{lat:.2f}"
                if is_mask:
                    masks[loc][date] = ("nc", path.name, position, None)
                    continue
                order.append(loc)
                for band_position, band in enumerate(index.bands or ()):
                    images[loc][date][band] = ("nc", path.name, position, band_position)
        return images, masks, list(dict.fromkeys(order))

    # ------------------------------------------------------------------------------------------- samples
    def _list_samples(self) -> list[SampleRef]:
        images, masks, _ = self._index
        refs = []
        for loc in sorted(masks):
            if self.config.pairing == "per_frame":
                dates = sorted(date for date in images.get(loc, {}) if self._mask_for(masks[loc], date))
                available = len(dates)
                dates = dates[: self.num_frames] if self.num_frames else dates
                frames = [(date, dict(images[loc][date]), self._mask_for(masks[loc], date)) for date in dates]
                refs.append(SampleRef(loc, loc, {"loc": loc, "frames": frames, "available": available}))
                continue
            for mask_date in sorted(masks[loc]):
                last = _month_index(mask_date)
                dates = sorted(date for date in images.get(loc, {})
                               if last - self.config.window_months <= _month_index(date) <= last)
                available = len(dates)
                dates = dates[-self.num_frames:] if self.num_frames else dates
                frames = [(date, dict(images[loc][date]), None) for date in dates]
                refs.append(SampleRef(f"{loc}_{mask_date:%Y-%m}", loc,
                                      {"loc": loc, "frames": frames, "mask": masks[loc][mask_date],
                                       "mask_date": mask_date.isoformat(), "available": available}))
        return refs

    @staticmethod
    def _mask_for(location_masks: dict, date: datetime.date):
        return next((locator for mask_date, locator in location_masks.items()
                     if _month_index(mask_date) == _month_index(date)), None)

    def _official_splits(self, refs):
        used = {ref.group for ref in refs}
        order = [loc for loc in self._index[2] if loc in used]
        return self.refs_in_groups(refs, split_by_counts(order, [78, 78, None]))

    def _read_plane(self, locator, missing_kind: str, resampling: str):
        if locator[0] == "nc":
            return netcdf.read_image(self.root / locator[1], locator[2], locator[3])
        array, _ = read_raster(self.root / locator[1], indexes=[1], out_shape=self.config.image_size,
                               resampling=resampling, missing_kind=missing_kind)
        return array[0]

    def _read_sample(self, ref: SampleRef) -> RawSample:
        require_dates(ref.payload["available"], self.min_frames)  # counted before num_frames, as every builder does
        frames, frame_masks = [], []
        for date, band_files, mask in ref.payload["frames"]:
            missing = [band for band in self.band_names if band not in band_files]
            if missing:
                raise SampleError(FaultKind.MISSING_BAND, f"no {', '.join(missing)} file for {date}")
            frames.append(stack_planes([self._read_plane(band_files[band], FaultKind.MISSING_BAND, self.resampling)
                                        for band in self.band_names], [f"{band} {date}" for band in self.band_names]))
            if mask is not None:
                frame_masks.append(self._read_plane(mask, FaultKind.MISSING_LABEL, "nearest"))
        lon, lat = (float(value) for value in ref.payload["loc"].split("_"))
        dates = [date for date, _, _ in ref.payload["frames"]]
        geo = GeoInfo(center_lon=lon, center_lat=lat)
        if self.config.pairing == "per_frame":
            label = stack_planes(frame_masks, [f"mask {date}" for date in dates]) if frame_masks else None
            return RawSample(frames, dates, geo, label=label)
        label = self._read_plane(ref.payload["mask"], FaultKind.MISSING_LABEL, "nearest")
        return RawSample(frames, dates, geo, label=label, extras={"label_date": ref.payload["mask_date"]})
