"""SEN12-FLOOD (Rambour et al. 2020): Sentinel-2 sequences with a flooding flag per acquisition."""

from __future__ import annotations

import json

from .base import RawSample, SampleRef, TiMoRawBuilder, natural_key, parse_date
from .faults import FaultKind, SampleError
from .raster import read_band_files
from .splits import split_by_counts


class Sen12Flood(TiMoRawBuilder):
    """SEN12-FLOOD: ~336 Sentinel-2 sequences of flood events (2018-2019), binary FLOODING label per image.

    Source: IEEE DataPort / Radiant MLHub collections ``sen12floods_s2_{source,labels}`` (Source Cooperative
    mirror since MLHub closed).

    Raw layout (``data_dir`` is the root)::

        S2list.json   {"<seq>": {"folder": "<folder>", "count": n,
                                 "1": {"filename": "<name>", "date": "YYYY-MM-DD", "FLOODING": true|false}, ...}}
        <folder>/<name>_B01.tif ... <name>_B12.tif, <name>_B8A.tif   single-band GeoTIFFs (uint16, ~512 x 512)

    Bands: default ("B04", "B03", "B02") as TiMo uses; any of B01..B12, B8A via ``bands``. A missing band file is a
    ``missing_band`` fault (the official loader silently uses zeros). Images of different sizes need
    ``image_size=(H, W)`` (rasterio resampling; the official loader resizes to 224 x 224).

    One example per sequence with all its images sorted by date (the official loader draws 3 random frames after
    re-seeding the global numpy RNG; temporal sampling belongs to TiMoImageProcessor here).
    Label: the FLOODING flags per image (0/1, ``label`` is a list aligned with ``dates``).

    Splits: default: sequences (natural-sorted keys) shuffled with ``split_seed`` and cut 60/20/20.
    ``split_mode="official"``: the first 30 sequences in S2list.json order -> train, all others -> validation
    *and* test (the official code evaluates on its validation set; validation == test is a known flaw).

    Licence: CC-BY-4.0 (check the distributor's terms).
    Citation: Rambour, Audebert, Koeniguer, Le Saux, Crucianu, Datcu, "Flood detection in time series of
    optical and SAR images", ISPRS Archives XLIII-B2-2020.
    """

    BAND_NAMES = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
    DEFAULT_BANDS = ("B04", "B03", "B02")
    LABEL_KIND = "frame_ids"
    CLASS_NAMES = ("not flooded", "flooded")
    HOMEPAGE = "https://ieee-dataport.org/open-access/sen12-flood-sar-and-multispectral-dataset-flood-detection"
    LICENSE = "CC-BY-4.0"
    CITATION = ("@article{rambour2020sen12flood, title={Flood detection in time series of optical and SAR images}, "
                "author={Rambour, Cl{\\'e}ment and Audebert, Nicolas and Koeniguer, Elise and Le Saux, Bertrand and "
                "Crucianu, Michel and Datcu, Mihai}, journal={The International Archives of the Photogrammetry, "
                "Remote Sensing and Spatial Information Sciences}, volume={XLIII-B2-2020}, year={2020}}")

    def _listing(self) -> dict:
        path = self.root / "S2list.json"
        if not path.is_file():
            raise FileNotFoundError(f"Sen12Flood: {path} not found")
        return json.loads(path.read_text())

    def _list_samples(self) -> list[SampleRef]:
        listing = self._listing()
        return [SampleRef(f"seq{key}", key, listing[key]) for key in sorted(listing, key=natural_key)]

    def _official_splits(self, refs):
        in_file_order = list(self._listing())
        by_key = {ref.group: ref for ref in refs}
        blocks = split_by_counts(in_file_order, [30, None, 0])
        rest = [by_key[key] for key in blocks["validation"]]
        return {"train": [by_key[key] for key in blocks["train"]], "validation": rest, "test": list(rest)}

    def _read_sample(self, ref: SampleRef) -> RawSample:
        entry = ref.payload
        keys = sorted((key for key in entry if key.isdigit()), key=int)
        try:
            items = [entry[key] for key in keys]
            dates = [parse_date(item["date"]) for item in items]
        except (KeyError, TypeError) as err:
            raise SampleError(FaultKind.CORRUPT_FILE, f"malformed S2list.json entry: {err}") from err
        items = self.limit_frames(items, dates)
        frames, labels, geo = [], [], None
        for item in items:
            if "FLOODING" not in item:
                raise SampleError(FaultKind.MISSING_LABEL, f"no FLOODING flag for {item.get('filename')}")
            paths = [self.root / entry["folder"] / f"{item['filename']}_{band}.tif" for band in self.band_names]
            frame, frame_geo = read_band_files(paths, out_shape=self.config.image_size, resampling=self.resampling)
            frames.append(frame)
            labels.append(int(bool(item["FLOODING"])))
            geo = geo or frame_geo
        return RawSample(frames=frames, dates=[parse_date(item["date"]) for item in items], geo=geo, label=labels)
