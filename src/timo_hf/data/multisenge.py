"""MultiSenGE (Wenger et al. 2022): Sentinel-2 time series of 2020 with 14-class land-use/land-cover masks."""

from __future__ import annotations

import json

import numpy as np

from .base import RawSample, SampleRef, TiMoRawBuilder, parse_date
from .faults import FaultKind, SampleError
from .raster import read_raster
from .splits import split_ranked_groups


class MultiSenGE(TiMoRawBuilder):
    """MultiSenGE: 8,157 256x256 patches over the Grand-Est region (France), Sentinel-2 L2A series of 2020, LULC masks.

    Source: Zenodo doi 10.5281/zenodo.6375466 (tools: github.com/r-wenger/MultiSenGE-Tools).

    Raw layout (``data_dir`` is the dataset root; the ``labels`` folder itself is accepted too)::

        labels/<tile>_<x>_<y>.json            {"corresponding_s2": "<s2 name>;<s2 name>;...", ...}
        s2/<tile>_<YYYYMMDD>_S2_<x>_<y>.tif   10-band uint16 GeoTIFF (UTM), one per date
        ground_reference/<tile>_GR_<x>_<y>.tif  uint8 classes 1..14, 0 = no data

    The label file name is the first S2 name with its ``<YYYYMMDD>_S2`` part replaced by ``GR``; the date is the
    ``YYYYMMDD`` part of each S2 name. All dates of a patch are kept (sorted); ``num_frames`` keeps the first k.

    Bands: B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12 (10 m / 20 m resampled to 10 m by the producers), raw
    reflectance x 1e4 as uint16 (the official loader multiplies by 1e-4; here values stay raw).

    Classes (label = raw - 1, so 0..13; raw 0 and values above 14 become 255 = ignore, explicitly rather than by
    uint8 wrap-around as in the official code): dense built-up, sparse built-up, specialized built-up areas,
    specialized but vegetative areas, large scale networks, arable lands, vineyards, orchards, grasslands,
    groves/hedges, forests, open spaces/mineral, wetlands, water surfaces.

    Splits: the 14 S2 tiles (first 5 characters of the JSON name) sorted; tiles [0:8] train, [8:11] validation,
    [11:14] test, as in the TiMo code (so ``split_mode="official"`` gives the same split). With another number of
    tiles the blocks are round(n*8/14), round(n*3/14) and the rest.

    Licence: CC-BY-4.0 per the Zenodo record (check it before redistribution).
    Citation: Wenger, Puissant, Weber, Idoumghar, Forestier, "MultiSenGE: a multimodal and multitemporal benchmark
    dataset for land use/land cover remote sensing applications", ISPRS Annals 2022.
    """

    BAND_NAMES = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
    CLASS_NAMES = ("dense built-up", "sparse built-up", "specialized built-up areas",
                   "specialized but vegetative areas", "large scale networks", "arable lands", "vineyards",
                   "orchards", "grasslands", "groves, hedges", "forests", "open spaces, mineral", "wetlands",
                   "water surfaces")
    DEFAULT_SPLIT_FRACTIONS = (8, 3, 3)
    HOMEPAGE = "https://doi.org/10.5281/zenodo.6375466"
    LICENSE = "CC-BY-4.0 (per the Zenodo record)"
    CITATION = ("@article{wenger2022multisenge, title={MultiSenGE: A Multimodal and Multitemporal Benchmark Dataset "
                "for Land Use/Land Cover Remote Sensing Applications}, author={Wenger, Romain and Puissant, Anne and "
                "Weber, Jonathan and Idoumghar, Lhassane and Forestier, Germain}, journal={ISPRS Annals of the "
                "Photogrammetry, Remote Sensing and Spatial Information Sciences}, year={2022}}")

    @property
    def dataset_root(self):
        return self.root.parent if self.root.name == "labels" else self.root

    def _list_samples(self) -> list[SampleRef]:
        labels = sorted((self.dataset_root / "labels").glob("*.json"))
        return [SampleRef(path.stem, path.stem[:5], path.name) for path in labels]

    def _default_group_splits(self, groups):
        return split_ranked_groups(groups, self.config.split_fractions or self.DEFAULT_SPLIT_FRACTIONS)

    def _official_splits(self, refs):
        return self.refs_in_groups(refs, split_ranked_groups([ref.group for ref in refs], self.DEFAULT_SPLIT_FRACTIONS))

    def _read_sample(self, ref: SampleRef) -> RawSample:
        root = self.dataset_root
        try:
            meta = json.loads((root / "labels" / ref.payload).read_text())
            names = [name.strip() for name in meta["corresponding_s2"].split(";") if name.strip()]
        except (OSError, ValueError, KeyError) as err:
            raise SampleError(FaultKind.CORRUPT_FILE, f"unreadable label JSON {ref.payload}: {err}") from err
        if not names:
            raise SampleError(FaultKind.MISSING_TIMESTAMPS, "no Sentinel-2 dates listed")
        dates = [parse_date(name[6:14]) for name in names]
        label_name = names[0][:6] + "GR" + names[0][17:]
        names = self.limit_frames(names, dates)
        frames, geo = [], None
        for name in names:
            array, frame_geo = read_raster(root / "s2" / name, indexes=self.band_indexes(),
                                           out_shape=self.config.image_size, resampling=self.resampling,
                                           missing_kind=FaultKind.MISSING_FILE)
            frames.append(array)
            geo = geo or frame_geo
        raw_label, _ = read_raster(root / "ground_reference" / label_name, indexes=[1],
                                   out_shape=self.config.image_size, resampling="nearest",
                                   missing_kind=FaultKind.MISSING_LABEL)
        raw_label = raw_label[0].astype(np.int64)
        label = np.where((raw_label >= 1) & (raw_label <= 14), raw_label - 1, 255).astype(np.uint8)
        return RawSample(frames=frames, dates=[parse_date(name[6:14]) for name in names], geo=geo, label=label)
