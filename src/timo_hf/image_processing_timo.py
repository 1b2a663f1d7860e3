"""TiMoImageProcessor: satellite image time series (T, C, H, W) -> TiMo model inputs.

Steps, per sample, in this order:

1. band selection by name (``band_names``; "B04" matches "B4"), so inputs may carry extra bands in any order;
2. valid-pixel mask: a pixel is valid when every selected band is finite and differs from ``nodata_value``;
3. temporal sampling of the chronologically ordered frames: "all", "first" (first k), "evenly_spaced" (k indices
   of linspace(0, T-1, k)), "random" (k distinct frames, kept in chronological order), k = ``num_frames``; with
   ``min_valid_fraction`` set, among the frames with at least that fraction of valid pixels only (cloudy or
   out-of-swath dates marked as nodata are dropped; a sample where none qualifies keeps its most valid frame);
4. per-band normalisation (x - mean) / std in float32; invalid values are then replaced by ``fill_value``
   (in normalised units, so the default 0.0 is the band mean);
5. optional resize to ``size`` (bilinear/nearest/bicubic; masks and labels nearest), optional crop to
   ``crop_size`` (centre, or random with ``random_crop``), then zero-cost padding at the bottom/right up to a
   multiple of ``size_divisor`` (32 by default; padded pixels are invalid, labels get ``label_pad_value``);
6. batching: frames are padded at the end to ``num_frames`` (or the longest sample) with ``frame_mask`` False;
7. ``temporal_positions``: with ``temporal_encoding="index"`` (default, the official model's semantics) the frame
   index 0..T-1; with "days" the float number of days since the sample's first selected date (padded frames 0).

The result is a ``BatchFeature`` with ``pixel_values`` [B, T, C, H, W] float32, ``temporal_positions`` [B, T],
``frame_mask`` [B, T] bool, ``valid_mask`` [B, T, H, W] bool and, when labels are given, ``labels`` (masks
[B, H, W] / [B, T, H, W] or ids [B] / [B, T], padded with ``label_pad_value`` / -100).

Random choices (``temporal_sampling="random"``, ``random_crop``) come from a numpy generator:

* a call with ``seed=...`` draws from a generator made from that seed alone, so its result is fixed by it;
* otherwise, in the process that made the processor, successive calls continue one generator seeded with the
  processor's ``seed`` (fresh entropy when None): the same sequence of calls gives the same results;
* in a ``torch.utils.data.DataLoader`` worker, the generator is re-seeded from the processor's ``seed`` and the
  worker's torch seed (``get_worker_info().seed``), which DataLoader draws from the main process's torch RNG for
  every worker of every epoch: draws differ between workers and epochs, and ``torch.manual_seed`` in the main
  process makes a run reproducible.

Normalisation presets (``normalization=...``) and their sources:

* ``s2_l2a_10`` / ``s2_l2a_12`` / ``s2_l2a_13`` / ``s2_rgb``: Sentinel-2 L2A reflectance x 1e4, SSL4EO-S12 v1.0
  statistics (Wang et al. 2022, "SSL4EO-S12", zhu-xlab/SSL4EO-S12 ``ssl4eo_dataset.py`` S2A_MEAN/S2A_STD,
  computed on 50k samples). L2A has no B10: the 13-band preset takes B10 from the L1C statistics below.
* ``s2_l1c_13``: Sentinel-2 L1C, SSL4EO-S12 S2C_MEAN/S2C_STD (same source).
* ``s1_vv_vh``: Sentinel-1 GRD backscatter in dB, SSL4EO-S12 S1_MEAN/S1_STD (same source).
* ``rgb_uint8``: 8-bit RGB (B4, B3, B2) divided by 255 (mean 0, std 255), as TiMo's MillionST pre-training.
* ``reflectance_1e4``: any bands multiplied by 1e-4 (mean 0, std 1e4), as the official MultiSenGE, MTLCC and
  Sen12Flood loaders.

``python -m timo_hf.data.stats`` computes statistics over a dataset; ``TiMoImageProcessor.from_statistics`` uses
them.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs


_L2A = dict(zip(
    ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"),
    zip((752.40087073, 884.29673756, 1144.16202635, 1297.47289228, 1624.90992062, 2194.6423161, 2422.21248945,
         2517.76053101, 2581.64687018, 2645.51888987, 2368.51236873, 1805.06846033),
        (1108.02887453, 1155.15170768, 1183.6292542, 1368.11351514, 1370.265037, 1355.55390699, 1416.51487101,
         1474.78900051, 1439.3086061, 1582.28010962, 1455.52084939, 1343.48379601)),
))
_L1C = dict(zip(
    ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"),
    zip((1605.57504906, 1390.78157673, 1314.8729939, 1363.52445545, 1549.44374991, 2091.74883118, 2371.7172463,
         2299.90463006, 2560.29504086, 830.06605044, 22.10351321, 2177.07172323, 1524.06546312),
        (786.78685367, 850.34818441, 875.06484736, 1138.84957046, 1122.17775652, 1161.59187054, 1274.39184232,
         1248.42891965, 1345.52684884, 577.31607053, 51.15431158, 1336.09932639, 1136.53823676)),
))
_S1 = {"VV": (-12.54847273, 5.25697717), "VH": (-20.19237134, 5.91150917)}
_SSL4EO = "SSL4EO-S12 v1.0 statistics (zhu-xlab/SSL4EO-S12, ssl4eo_dataset.py, 50k samples)"


def _preset(table: dict, bands: tuple[str, ...], source: str) -> dict:
    return {"band_names": list(bands), "image_mean": [table[b][0] for b in bands],
            "image_std": [table[b][1] for b in bands], "source": source}


NORMALIZATION_PRESETS = {
    "s2_l2a_10": _preset(_L2A, ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"), "L2A " + _SSL4EO),
    "s2_l2a_12": _preset(_L2A, tuple(_L2A), "L2A " + _SSL4EO),
    "s2_l2a_13": _preset({**_L2A, "B10": _L1C["B10"]}, tuple(_L1C), "L2A " + _SSL4EO + "; B10 from L1C"),
    "s2_l1c_13": _preset(_L1C, tuple(_L1C), "L1C " + _SSL4EO),
    "s2_rgb": _preset(_L2A, ("B4", "B3", "B2"), "L2A " + _SSL4EO),
    "s1_vv_vh": _preset(_S1, ("VV", "VH"), "S1 GRD dB " + _SSL4EO),
    "rgb_uint8": {"band_names": ["B4", "B3", "B2"], "image_mean": [0.0] * 3, "image_std": [255.0] * 3,
                  "source": "TiMo MillionST pre-training: uint8 / 255, no mean/std"},
    "reflectance_1e4": {"band_names": None, "image_mean": 0.0, "image_std": 1e4,
                        "source": "official TiMo loaders: reflectance x 1e-4"},
}
TEMPORAL_SAMPLING = ("all", "first", "evenly_spaced", "random")
TEMPORAL_ENCODING = ("index", "days")
_RESIZE_MODES = ("bilinear", "nearest", "bicubic")


def _check_sample(index: int, image: np.ndarray) -> None:
    """Raise a ValueError naming sample `index` unless it is a `(T, C, H, W)` array of numbers with frames."""
    if image.ndim != 4:
        hint = " (one date: add a time axis, image[None])" if image.ndim == 3 else ""
        raise ValueError(f"sample {index} has shape {image.shape}; each sample must be a (T, C, H, W) array{hint}")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"sample {index} has dtype {image.dtype}; pixel values must be integers or floats")
    if image.shape[0] == 0:
        raise ValueError(f"sample {index} has no frames (shape {image.shape})")


def _per_sample(values, count: int, name: str) -> list:
    """`values` as one entry per sample: `None` for each where not given, a flat list (of names or dates) shared by
    every sample, else a list that must hold `count` entries (a shorter one would silently drop samples)."""
    if values is None:
        return [None] * count
    if not len(values) or isinstance(values[0], (str, datetime.date, np.datetime64)):
        return [values] * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} samples")
    return list(values)


def _parse_dates(index: int, dates, num_frames: int) -> list[datetime.date] | None:
    """Sample `index`'s dates as `datetime.date`s (ISO strings, dates or datetimes), one per frame, in the
    chronological order that temporal sampling and day offsets assume."""
    if dates is None:
        return None
    if len(dates) != num_frames:
        raise ValueError(f"sample {index} has {num_frames} frames but {len(dates)} dates")
    try:
        parsed = [datetime.date.fromisoformat(str(date)[:10]) for date in dates]
    except ValueError:
        raise ValueError(f"sample {index}: dates must be ISO dates (YYYY-MM-DD), got {list(dates)}") from None
    if parsed != sorted(parsed):
        raise ValueError(f"sample {index}: frames must be in chronological order (sort them by date), got dates "
                         f"{[date.isoformat() for date in parsed]}")
    return parsed


def canonical_band(name: str) -> str:
    """'B04' -> 'B4', 'b8a' -> 'B8A', 'vv' -> 'VV'."""
    name = str(name).upper()
    return re.sub(r"^B0+(\d)", r"B\1", name)


def _band_rows(available, wanted, what: str) -> list[int]:
    """Positions of the `wanted` bands in `available` ("B04" matches "B4"); `what` names `available` in the error."""
    canonical = [canonical_band(name) for name in available]
    missing = [band for band in wanted if canonical_band(band) not in canonical]
    if missing:
        raise ValueError(f"bands {missing} not in {what} {list(available)}")
    return [canonical.index(canonical_band(band)) for band in wanted]


def _size_dict(size) -> dict | None:
    if size is None:
        return None
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, dict):
        return {"height": int(size["height"]), "width": int(size["width"])}
    height, width = size
    return {"height": int(height), "width": int(width)}


class TiMoImageProcessorKwargs(ImagesKwargs, total=False):
    band_names: list[str] | None
    normalization: str | None
    num_frames: int | None
    temporal_sampling: str
    pad_frames: bool
    temporal_encoding: str
    resize_mode: str
    random_crop: bool
    size_divisor: int | None
    nodata_value: float | None
    min_valid_fraction: float | None
    fill_value: float
    label_pad_value: int
    seed: int | None


class TiMoImageProcessor(BaseImageProcessor):
    """Image processor for TiMo; see the module docstring for the steps, options, how random draws are seeded (in
    DataLoader workers too) and the normalisation presets."""

    model_input_names = ["pixel_values", "temporal_positions", "frame_mask", "valid_mask"]
    valid_kwargs = TiMoImageProcessorKwargs
    _CONFIG_KEYS = ("band_names", "image_mean", "image_std", "normalization", "num_frames", "temporal_sampling",
                    "pad_frames", "temporal_encoding", "size", "resize_mode", "crop_size", "random_crop",
                    "size_divisor", "nodata_value", "min_valid_fraction", "fill_value", "label_pad_value", "seed")

    def __init__(
        self,
        band_names: list[str] | None = None,
        image_mean: float | list[float] | None = None,
        image_std: float | list[float] | None = None,
        normalization: str | None = None,
        num_frames: int | None = None,
        temporal_sampling: str = "all",
        pad_frames: bool = True,
        temporal_encoding: str = "index",
        size: int | dict | None = None,
        resize_mode: str = "bilinear",
        crop_size: int | dict | None = None,
        random_crop: bool = False,
        size_divisor: int | None = 32,
        nodata_value: float | None = None,
        min_valid_fraction: float | None = None,
        fill_value: float = 0.0,
        label_pad_value: int = 255,
        seed: int | None = None,
        **kwargs,
    ):
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        if normalization is not None:
            if normalization not in NORMALIZATION_PRESETS:
                raise ValueError(f"unknown normalization {normalization!r}; presets: {sorted(NORMALIZATION_PRESETS)}")
            preset = NORMALIZATION_PRESETS[normalization]
            band_names = band_names if band_names is not None else preset["band_names"]
            image_mean = image_mean if image_mean is not None else preset["image_mean"]
            image_std = image_std if image_std is not None else preset["image_std"]
        self._check_choice("temporal_sampling", temporal_sampling, TEMPORAL_SAMPLING)
        self._check_choice("temporal_encoding", temporal_encoding, TEMPORAL_ENCODING)
        self._check_choice("resize_mode", resize_mode, _RESIZE_MODES)
        if temporal_sampling in ("first", "evenly_spaced", "random") and not num_frames:
            raise ValueError(f"temporal_sampling={temporal_sampling!r} needs num_frames")
        if min_valid_fraction is not None and not 0.0 < min_valid_fraction <= 1.0:
            raise ValueError(f"min_valid_fraction must be in (0, 1] (or None: every frame), got {min_valid_fraction}")
        self.band_names = list(band_names) if band_names is not None else None
        self.image_mean = self._per_band(image_mean, "image_mean")
        self.image_std = self._per_band(image_std, "image_std")
        self.normalization = normalization
        self.num_frames = num_frames
        self.temporal_sampling = temporal_sampling
        self.pad_frames = pad_frames
        self.temporal_encoding = temporal_encoding
        self.size = _size_dict(size)
        self.resize_mode = resize_mode
        self.crop_size = _size_dict(crop_size)
        self.random_crop = random_crop
        self.size_divisor = size_divisor
        self.nodata_value = nodata_value
        self.min_valid_fraction = min_valid_fraction
        self.fill_value = fill_value
        self.label_pad_value = label_pad_value
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._rng_worker_seed = None  # the DataLoader worker seed `_rng` was made for (None: this process)

    def _generator(self, seed: int | None) -> np.random.Generator:
        """The generator of one call: from the call's `seed`, else the processor's own, re-seeded once in each
        DataLoader worker (a forked worker starts with a copy of the parent's generator, identical in every worker
        and in every epoch's fresh workers)."""
        if seed is not None:
            return np.random.default_rng(seed)
        worker = get_worker_info()
        if worker is not None and worker.seed != self._rng_worker_seed:
            entropy = [worker.seed] if self.seed is None else [worker.seed, self.seed]
            self._rng = np.random.default_rng(entropy)
            self._rng_worker_seed = worker.seed
        return self._rng

    @staticmethod
    def _check_choice(name, value, choices):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")

    def _per_band(self, values, name):
        """`values` as given when a number (shared by every band), else as a list of floats, one per band."""
        if values is None:
            return None
        if isinstance(values, (int, float)):
            self._check_statistic([float(values)], ["every band"], name)
            return values
        values = [float(v) for v in values]
        if self.band_names is not None and len(values) != len(self.band_names):
            raise ValueError(f"{name} has {len(values)} values for {len(self.band_names)} bands")
        self._check_statistic(values, self.band_names or [f"band {index}" for index in range(len(values))], name)
        return values

    @staticmethod
    def _check_statistic(values: list[float], bands: list[str], name: str) -> None:
        """Refuse a mean or std that would turn pixels into NaN/inf while the valid mask still says valid."""
        positive = name == "image_std"
        bad = [f"{band}: {value}" for band, value in zip(bands, values)
               if not math.isfinite(value) or (positive and value <= 0)]
        if not bad:
            return
        if positive:
            raise ValueError(f"image_std must be a positive finite number for every band, got {', '.join(bad)}; a "
                             "zero std comes from a band that is constant (or all nodata) in the statistics: leave "
                             "that band out (band_names=[...]) or give it a std")
        raise ValueError(f"{name} must be a finite number for every band, got {', '.join(bad)}")

    # ------------------------------------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        output = {key: getattr(self, key) for key in self._CONFIG_KEYS}
        output["image_processor_type"] = type(self).__name__
        if getattr(self, "auto_map", None):  # set by save_pretrained for remote code: AutoImageProcessor needs it
            output["auto_map"] = self.auto_map
        return output

    @classmethod
    def from_statistics(cls, statistics: dict | str | Path, **kwargs) -> TiMoImageProcessor:
        """A processor normalising with statistics from ``timo_hf.data.compute_band_statistics`` (dict or JSON);
        ``band_names=[...]`` keeps the statistics of those bands only (e.g. to leave out a constant band)."""
        if not isinstance(statistics, dict):
            statistics = json.loads(Path(statistics).read_text())
        kwargs.setdefault("nodata_value", statistics.get("nodata"))
        names, mean, std = statistics["band_names"], statistics["image_mean"], statistics["image_std"]
        selected = kwargs.pop("band_names", None)
        if selected is not None:
            if names is None:
                raise ValueError("band_names=... picks bands by name, but these statistics name none")
            rows = _band_rows(names, selected, "the bands of the statistics")
            names, mean, std = list(selected), [mean[row] for row in rows], [std[row] for row in rows]
        return cls(band_names=names, image_mean=mean, image_std=std, **kwargs)

    # ------------------------------------------------------------------------------------------- inputs
    @staticmethod
    def _batch(images, dates, band_names, labels):
        """Normalise the call's inputs to per-sample lists, checking that every sample is a `(T, C, H, W)` array of
        numbers and that per-sample arguments have one entry per sample."""
        if isinstance(images, dict):
            images = [images]
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], dict):
            dates = [example.get("dates") for example in images] if dates is None else dates
            band_names = [example.get("band_names") for example in images] if band_names is None else band_names
            labels = [example.get("label") for example in images] if labels is None else labels
            if all(label is None for label in labels):
                labels = None
            images = [example["pixel_values"] for example in images]
        if isinstance(images, (np.ndarray, torch.Tensor)):
            if images.ndim not in (4, 5):
                raise ValueError(f"images has shape {tuple(images.shape)}; pass one sample as (T, C, H, W) (one date: "
                                 "add a time axis, image[None]) or a batch as (B, T, C, H, W)")
            if images.ndim == 4:
                images = [images]
                labels = [labels] if labels is not None else None
        images = [image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
                  for image in images]
        for index, image in enumerate(images):
            _check_sample(index, image)
        count = len(images)
        if labels is not None and len(labels) != count:
            raise ValueError(f"labels has {len(labels)} entries for {count} samples")
        return images, _per_sample(dates, count, "dates"), _per_sample(band_names, count, "band_names"), labels

    # ------------------------------------------------------------------------------------------- per-sample steps
    def _select_bands(self, image: np.ndarray, names) -> np.ndarray:
        if self.band_names is None:
            return image
        if names is None:
            if image.shape[1] != len(self.band_names):
                raise ValueError(f"image has {image.shape[1]} bands, the processor expects {self.band_names}; "
                                 "pass band_names=... to select by name")
            return image
        return image[:, _band_rows(names, self.band_names, "the input bands")]

    def _valid(self, image: np.ndarray) -> np.ndarray:
        """Where values are finite and not `nodata_value`."""
        valid = np.isfinite(image)
        if self.nodata_value is not None:
            valid &= image != self.nodata_value
        return valid

    def _usable_frames(self, image: np.ndarray, names) -> np.ndarray:
        """Indices of the frames with at least `min_valid_fraction` of their pixels valid in every band (all frames
        when it is unset); where none qualifies, the frame with the most valid pixels."""
        if self.min_valid_fraction is None:
            return np.arange(image.shape[0])
        fraction = self._valid(self._select_bands(image, names)).all(axis=1).mean(axis=(1, 2))
        usable = np.flatnonzero(fraction >= self.min_valid_fraction)
        return usable if usable.size else np.array([int(fraction.argmax())])

    def _frame_indices(self, num_available: int, rng: np.random.Generator) -> np.ndarray:
        k = self.num_frames
        if self.temporal_sampling == "all" or not k or num_available <= k:
            return np.arange(num_available)
        if self.temporal_sampling == "first":
            return np.arange(k)
        if self.temporal_sampling == "evenly_spaced":
            return np.unique(np.round(np.linspace(0, num_available - 1, k)).astype(int))
        return np.sort(rng.choice(num_available, size=k, replace=False))

    def _normalize(self, image: np.ndarray) -> np.ndarray:
        image = image.astype(np.float32)
        mean = self._band_values(self.image_mean, 0.0, "image_mean", image.shape[1])
        std = self._band_values(self.image_std, 1.0, "image_std", image.shape[1])
        return (image - mean[None, :, None, None]) / std[None, :, None, None]

    @staticmethod
    def _band_values(values, default: float, name: str, channels: int) -> np.ndarray:
        """One float32 per band: a number is shared by every band, a list must have one value per band (without
        band_names the band count is only known here)."""
        values = default if values is None else values
        if not isinstance(values, (int, float)) and len(values) != channels:
            raise ValueError(f"{name} has {len(values)} values but the image has {channels} bands: give one value "
                             "per band, one number for every band, or band_names=[...] to select the bands the "
                             "values describe")
        return np.broadcast_to(np.asarray(values, np.float32), (channels,))

    def _resize(self, tensor: torch.Tensor, mode: str) -> torch.Tensor:
        if self.size is None:
            return tensor
        shape = (self.size["height"], self.size["width"])
        if tuple(tensor.shape[-2:]) == shape:
            return tensor
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        return F.interpolate(tensor, size=shape, mode=mode, **kwargs)

    def _crop_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        if self.crop_size is None:
            return 0, 0, height, width
        crop_h, crop_w = min(self.crop_size["height"], height), min(self.crop_size["width"], width)
        if self.random_crop:
            top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
        else:
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return top, left, crop_h, crop_w

    def _spatial(self, pixels, valid, label, rng):
        """Resize + crop one sample: pixels (T, C, H, W), valid (T, H, W), label (..., H, W) or None."""
        pixels = self._resize(torch.from_numpy(pixels), self.resize_mode)
        valid = self._resize(torch.from_numpy(valid[:, None].astype(np.float32)), "nearest")[:, 0] > 0.5
        if label is not None and label.ndim >= 2:
            flat = torch.from_numpy(label.reshape(-1, 1, *label.shape[-2:]).astype(np.float32))
            label = self._resize(flat, "nearest").reshape(*label.shape[:-2], *self._out_hw(label.shape[-2:]))
            label = label.round().long().numpy()
        top, left, height, width = self._crop_box(*pixels.shape[-2:], rng)
        window = (Ellipsis, slice(top, top + height), slice(left, left + width))
        if label is not None and label.ndim >= 2:
            label = label[window]
        return pixels[window].numpy(), valid[window].numpy(), label

    def _out_hw(self, shape):
        return (self.size["height"], self.size["width"]) if self.size is not None else tuple(shape)

    # ------------------------------------------------------------------------------------------- main entry
    def preprocess(self, images, dates=None, band_names=None, labels=None, return_tensors="pt", seed=None,
                   **kwargs) -> BatchFeature:
        """Process one sample (T, C, H, W), a batch (list of samples or [B, T, C, H, W]) or dataset examples.

        dates: ISO dates, one per frame, per sample or one list shared by every sample (needed for
        temporal_encoding="days", checked whenever given); band_names: the input's band names (shared or per sample)
        for band selection; labels: per-sample masks (H, W) / (T, H, W), or class ids (scalar / per frame). Dataset
        examples (dicts with pixel_values, dates, band_names, label) may be passed directly as `images`.
        """
        rng = self._generator(seed)
        images, dates, band_names, labels = self._batch(images, dates, band_names, labels)
        samples = []
        for index, (image, sample_dates, names) in enumerate(zip(images, dates, band_names)):
            label = None if labels is None or labels[index] is None else np.asarray(labels[index])
            sample_dates = _parse_dates(index, sample_dates, image.shape[0])
            usable = self._usable_frames(image, names)
            keep = usable[self._frame_indices(len(usable), rng)]
            image = self._select_bands(image[keep], names)
            valid = self._valid(image)
            pixels = self._normalize(image)
            pixels[~valid] = self.fill_value
            if label is not None and label.ndim in (1, 3):  # per-frame ids / per-frame masks follow the frames
                label = label[keep]
            pixels, frame_valid, label = self._spatial(pixels, valid.all(axis=1), label, rng)
            positions = self._positions(keep, sample_dates)
            samples.append((pixels, frame_valid, label, positions))
        return BatchFeature(self._collate(samples, labels is not None), tensor_type=return_tensors)

    __call__ = preprocess

    def _positions(self, keep: np.ndarray, sample_dates: list[datetime.date] | None) -> np.ndarray | None:
        """Day offsets from the first kept date ("days"); None for "index" (filled in by `_collate`)."""
        if self.temporal_encoding == "index":
            return None
        if sample_dates is None:
            raise ValueError('temporal_encoding="days" needs the dates of every sample')
        chosen = [sample_dates[i] for i in keep]
        return np.asarray([(date - chosen[0]).days for date in chosen], dtype=np.float32)

    def _collate(self, samples, with_labels: bool) -> dict:
        frames = max(len(pixels) for pixels, *_ in samples)
        if self.pad_frames and self.num_frames:
            frames = max(frames, self.num_frames)
        divisor = self.size_divisor or 1
        height = math.ceil(max(pixels.shape[-2] for pixels, *_ in samples) / divisor) * divisor
        width = math.ceil(max(pixels.shape[-1] for pixels, *_ in samples) / divisor) * divisor
        channels = samples[0][0].shape[1]
        batch = len(samples)
        pixel_values = np.full((batch, frames, channels, height, width), self.fill_value, dtype=np.float32)
        valid_mask = np.zeros((batch, frames, height, width), dtype=bool)
        frame_mask = np.zeros((batch, frames), dtype=bool)
        positions = np.zeros((batch, frames), dtype=np.float32)
        out_labels = []
        for b, (pixels, valid, label, pos) in enumerate(samples):
            t, _, h, w = pixels.shape
            pixel_values[b, :t, :, :h, :w] = pixels
            valid_mask[b, :t, :h, :w] = valid
            frame_mask[b, :t] = True
            positions[b] = np.arange(frames) if self.temporal_encoding == "index" else np.pad(pos, (0, frames - t))
            out_labels.append(label)
        data = {"pixel_values": pixel_values, "temporal_positions": positions, "frame_mask": frame_mask,
                "valid_mask": valid_mask}
        if with_labels:
            data["labels"] = self._collate_labels(out_labels, frames, height, width)
        return data

    def _collate_labels(self, labels, frames, height, width) -> np.ndarray:
        ndims = {np.ndim(label) for label in labels}
        if len(ndims) != 1:
            raise ValueError("all labels of a batch must be of the same kind")
        ndim = ndims.pop()
        if ndim == 0:
            return np.asarray(labels, dtype=np.int64)
        if ndim == 1:
            out = np.full((len(labels), frames), -100, dtype=np.int64)
            for b, label in enumerate(labels):
                out[b, : len(label)] = label
            return out
        shape = (len(labels), height, width) if ndim == 2 else (len(labels), frames, height, width)
        out = np.full(shape, self.label_pad_value, dtype=np.int64)
        for b, label in enumerate(labels):
            out[(b,) + tuple(slice(0, n) for n in label.shape)] = label
        return out
