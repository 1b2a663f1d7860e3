"""The machinery every raw-data builder shares: config, example schema, splits, fault handling, build summary.

A dataset builder subclasses :class:`TiMoRawBuilder` and implements two methods:

* ``_list_samples()`` -> sorted list of :class:`SampleRef` (cheap: file names and small index files only);
* ``_read_sample(ref)`` -> :class:`RawSample` (reads the rasters; raises :class:`SampleError` on any fault).

Everything else is here: the features (probed from the first readable sample), deterministic splits by group,
chronological ordering of frames, shape/dtype checks, skipping faulty samples with a warning and a
:class:`BuildSummary` (or raising with ``strict=True``), and a build report that survives the Arrow cache and
``num_proc`` workers.

Every example has the columns ``sample_id`` (stable), ``pixel_values`` (T, C, H, W, raw values, native dtype;
``Array4D`` with variable T), ``dates`` (ISO ``YYYY-MM-DD``, sorted), ``band_names``, ``label`` (see
``LABEL_KIND``), ``crs`` (WKT or None), ``transform`` (affine a, b, c, d, e, f or None), ``center_lon``,
``center_lat`` (or None), plus the dataset's extra columns.
"""

from __future__ import annotations

import datetime
import re
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError
from datasets.table import InMemoryTable

from .faults import BuildSummary, FaultKind, SampleError, SkippedSample, SkippedSampleWarning
from .raster import GeoInfo, raster_env
from .splits import split_shuffled_groups


logger = datasets.logging.get_logger(__name__)

_FAULTS_SHOWN = 5  # faults listed when no sample can be read


@dataclass
class TiMoBuilderConfig(datasets.BuilderConfig):
    """Options shared by all raw-data builders (each builder documents its own defaults and extra options).

    strict: raise the first :class:`SampleError` instead of skipping the sample.
    bands: band names to keep, in this order (default: the dataset's default selection); one name is one band.
    image_size: (H, W) to resample every raster to, or one int for a square (default: native size; samples must
        then agree in size).
    resampling: rasterio resampling used when a raster is put on another grid ("nearest", "bilinear", ...).
    num_frames: keep at most this many dates per sample (which ones is the builder's documented rule).
    min_frames: a sample with fewer dates than this, counted before ``num_frames`` keeps some of them, is a
        ``missing_timestamps`` fault (default: the builder's); so ``num_frames`` may be below ``min_frames``.
    split_mode: "default" (documented, deterministic) or "official" (the TiMo code's behaviour, where offered).
    split_fractions: (train, validation, test) fractions of groups for fraction-based splits.
    split_seed: seed of the local RNG used by shuffled group splits.
    """

    strict: bool = False
    bands: tuple[str, ...] | None = None
    image_size: tuple[int, int] | None = None
    resampling: str | None = None
    num_frames: int | None = None
    min_frames: int | None = None
    split_mode: str = "default"
    split_fractions: tuple[float, float, float] | None = None
    split_seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.bands, str):
            self.bands = (self.bands,)
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        for name in ("bands", "image_size", "split_fractions"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))
        if self.image_size is not None and (len(self.image_size) != 2 or not all(map(_is_count, self.image_size))):
            raise ValueError(f"image_size must be (height, width) in pixels or one int for a square, "
                             f"got {self.image_size!r}")
        for name in ("num_frames", "min_frames"):
            if getattr(self, name) is not None and not _is_count(getattr(self, name)):
                raise ValueError(f"{name} must be a whole number of dates >= 1 (or None), got {getattr(self, name)!r}")
        if self.split_mode not in ("default", "official"):
            raise ValueError(f"split_mode must be 'default' or 'official', got {self.split_mode!r}")


def _is_count(value) -> bool:
    """A whole number >= 1 (bools excluded: `True` is an int to Python, not a size)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class SampleRef:
    """A listed raw sample: stable id, split group (tile/location/event/...) and what the reader needs."""

    sample_id: str
    group: str
    payload: Any = None


@dataclass
class RawSample:
    """What a reader returns: per-date (C, H, W) frames in any order, their dates, label and geo-metadata."""

    frames: list[np.ndarray]
    dates: list[datetime.date]
    geo: GeoInfo = field(default_factory=GeoInfo)
    label: Any = None
    extras: dict = field(default_factory=dict)


def parse_date(text: str) -> datetime.date:
    """Parse the first 8 digits of 'YYYYMMDD...', 'YYYY_MM_DD' or 'YYYY-MM-DD' as a date."""
    digits = re.sub(r"\D", "", text)[:8]
    try:
        return datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        raise SampleError(FaultKind.CORRUPT_FILE, f"cannot parse a date from {text!r}") from None


def require_dates(count: int, required: int) -> None:
    """Raise the `missing_timestamps` fault of a sample with `count` dates where `required` are needed."""
    if count < required:
        raise SampleError(FaultKind.MISSING_TIMESTAMPS, f"{count} dates found, at least {required} required")


def natural_key(text: str) -> tuple:
    """Sort key that orders '2' before '10' (sequence ids, tile ids)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


class TiMoRawBuilder(datasets.GeneratorBasedBuilder):
    """Base class; see the module docstring. Subclasses document source, layout, bands, classes, splits, licence."""

    BUILDER_CONFIG_CLASS = TiMoBuilderConfig
    DEFAULT_WRITER_BATCH_SIZE = 8  # samples are MBs each: keep the Arrow writer's buffer small
    VERSION = datasets.Version("1.0.0")

    BAND_NAMES: tuple[str, ...] = ()
    DEFAULT_BANDS: tuple[str, ...] | None = None
    LABEL_KIND = "mask"
    CLASS_NAMES: tuple[str, ...] = ()
    DEFAULT_MIN_FRAMES = 1
    DEFAULT_NUM_FRAMES: int | None = None
    KEEP_LATEST_FRAMES = False  # `num_frames` keeps the first dates (False) or the latest ones (True)
    DEFAULT_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
    DEFAULT_RESAMPLING = "bilinear"
    HOMEPAGE = ""
    LICENSE = ""
    CITATION = ""

    def __init__(self, *args, **kwargs):
        self.summary = BuildSummary()
        self._sample_refs: list[SampleRef] | None = None
        super().__init__(*args, **kwargs)

    # ----------------------------------------------------------------------------------------------- to implement
    def _list_samples(self) -> list[SampleRef]:
        raise NotImplementedError

    def _read_sample(self, ref: SampleRef) -> RawSample:
        raise NotImplementedError

    def _official_splits(self, refs: list[SampleRef]) -> dict[str, list[SampleRef]]:
        raise ValueError(f"{type(self).__name__} has no official split to reproduce; use split_mode='default'")

    def _extra_features(self) -> dict:
        return {}

    # ----------------------------------------------------------------------------------------------- options
    @property
    def root(self) -> Path:
        if not self.config.data_dir:
            raise ValueError(f"{type(self).__name__} needs data_dir=<folder with the raw download>")
        root = Path(self.config.data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{type(self).__name__}: data_dir {root} does not exist or is not a folder")
        return root

    def available_bands(self) -> tuple[str, ...]:
        return self.BAND_NAMES

    @property
    def band_names(self) -> tuple[str, ...]:
        bands = self.config.bands or self.DEFAULT_BANDS or self.available_bands()
        unknown = [band for band in bands if band not in self.available_bands()]
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown bands {unknown}; "
                             f"available: {list(self.available_bands())}")
        return tuple(bands)

    def band_indexes(self) -> list[int]:
        """1-based positions of the selected bands in the stored band order (for multi-band files)."""
        return [self.available_bands().index(band) + 1 for band in self.band_names]

    @property
    def min_frames(self) -> int:
        return self.config.min_frames if self.config.min_frames is not None else self.DEFAULT_MIN_FRAMES

    @property
    def resampling(self) -> str:
        return self.config.resampling or self.DEFAULT_RESAMPLING

    @property
    def num_frames(self) -> int | None:
        return self.config.num_frames if self.config.num_frames is not None else self.DEFAULT_NUM_FRAMES

    def limit_frames(self, items: list, dates: list[datetime.date]) -> list:
        """The `num_frames` rule: keep the first (or, with `KEEP_LATEST_FRAMES`, the latest) `num_frames` items in
        chronological order, once `min_frames` is checked on all the items (raises SampleError)."""
        require_dates(len(items), self.min_frames)
        order = sorted(range(len(items)), key=lambda i: dates[i])
        if self.num_frames:
            order = order[-self.num_frames:] if self.KEEP_LATEST_FRAMES else order[: self.num_frames]
        return [items[i] for i in order]

    @property
    def frames_after_limit(self) -> int:
        """Dates a sample must still have once `num_frames` kept some (`min_frames` counts them before)."""
        return min(self.min_frames, self.num_frames) if self.num_frames else self.min_frames

    # ----------------------------------------------------------------------------------------------- listing
    def samples(self) -> list[SampleRef]:
        """All listed samples (cached); raises a clear error when nothing matches the documented layout."""
        if self._sample_refs is None:
            refs = self._list_samples()
            if not refs:
                raise FileNotFoundError(
                    f"{type(self).__name__}: no samples found under {self.root}; expected the layout described in "
                    f"the {type(self).__name__} docstring"
                )
            ids = [ref.sample_id for ref in refs]
            if len(set(ids)) != len(ids):
                raise ValueError(f"{type(self).__name__}: duplicate sample ids in the listing")
            self._sample_refs = refs
        return self._sample_refs

    # ----------------------------------------------------------------------------------------------- schema
    def _probe(self) -> tuple[int, int, str]:
        """(H, W, dtype) of the first readable sample (or `image_size`). Faulty samples before it are passed over
        (the build skips and reports them, or raises with ``strict=True``); only a dataset where no sample reads
        fails here, with the first faults."""
        faults = []
        for ref in self.samples():
            try:
                frame = self._first_frame(ref)
            except SampleError as err:
                err.sample_id = err.sample_id or ref.sample_id
                faults.append(str(err))
                continue
            height, width = self.config.image_size or frame.shape[-2:]
            return int(height), int(width), str(frame.dtype)
        listed = "\n  ".join(faults[:_FAULTS_SHOWN])
        raise FileNotFoundError(f"{type(self).__name__}: none of the {len(faults)} samples under {self.root} could be "
                                f"read; fix the files (or the options) behind the first faults:\n  {listed}")

    def _first_frame(self, ref: SampleRef) -> np.ndarray:
        """The first frame of sample `ref` as read (raises SampleError)."""
        with raster_env():
            frames = self._read_sample(ref).frames
        if not frames:
            raise SampleError(FaultKind.MISSING_TIMESTAMPS, "no dates found")
        return frames[0]

    def _label_features(self, height: int, width: int) -> dict:
        if self.LABEL_KIND == "mask":
            return {"label": datasets.Array2D((height, width), "uint8")}
        if self.LABEL_KIND == "frame_masks":
            return {"label": datasets.Array3D((None, height, width), "uint8")}
        if self.LABEL_KIND == "frame_ids":
            return {"label": datasets.List(datasets.Value("int64"))}
        return {}

    def _info(self) -> datasets.DatasetInfo:
        height, width, dtype = self._probe()
        features = datasets.Features({
            "sample_id": datasets.Value("string"),
            "pixel_values": datasets.Array4D((None, len(self.band_names), height, width), dtype),
            "dates": datasets.List(datasets.Value("string")),
            "band_names": datasets.List(datasets.Value("string")),
            **self._label_features(height, width),
            "crs": datasets.Value("string"),
            "transform": datasets.List(datasets.Value("float64")),
            "center_lon": datasets.Value("float64"),
            "center_lat": datasets.Value("float64"),
            **self._extra_features(),
        })
        description = (type(self).__doc__ or "").strip().split("\n\n")[0]
        return datasets.DatasetInfo(description=description, features=features, homepage=self.HOMEPAGE,
                                    license=self.LICENSE, citation=self.CITATION)

    # ----------------------------------------------------------------------------------------------- splits
    def _default_group_splits(self, groups: list[str]) -> dict[str, list[str]]:
        fractions = self.config.split_fractions or self.DEFAULT_SPLIT_FRACTIONS
        return split_shuffled_groups(groups, fractions, seed=self.config.split_seed)

    @staticmethod
    def refs_in_groups(refs: list[SampleRef], group_splits: dict[str, list[str]]) -> dict[str, list[SampleRef]]:
        """Samples of each split, given the groups of each split."""
        group_sets = {name: set(groups) for name, groups in group_splits.items()}
        return {name: [ref for ref in refs if ref.group in groups] for name, groups in group_sets.items()}

    def assign_splits(self) -> dict[str, list[SampleRef]]:
        """The samples of each split; raises when the split rule puts none of the listed samples in any split."""
        refs = self.samples()
        if self.config.split_mode == "official":
            splits = self._official_splits(refs)
        else:
            splits = self.refs_in_groups(refs, self._default_group_splits([ref.group for ref in refs]))
        if not any(splits.values()):
            groups = sorted({ref.group for ref in refs}, key=natural_key)
            raise ValueError(f"{type(self).__name__}: split_mode={self.config.split_mode!r} puts none of the "
                             f"{len(refs)} samples found under {self.root} in a split; check the split options "
                             f"against the sample groups found: {groups[:10]}")
        return splits

    def _split_generators(self, dl_manager):
        return [
            datasets.SplitGenerator(name=name, gen_kwargs={"samples": refs, "split": name})
            for name, refs in self.assign_splits().items()
            if refs
        ]

    # ----------------------------------------------------------------------------------------------- examples
    def _prepare_split(self, split_generator, **kwargs):
        # Each generation job writes its part of the build report next to the Arrow files it produces.
        split_generator.gen_kwargs = {**split_generator.gen_kwargs, "report_dir": self._output_dir}
        return super()._prepare_split(split_generator, **kwargs)

    def _generate_examples(self, samples: list[SampleRef], split: str, report_dir: str | None = None):
        job_summary = BuildSummary(num_examples={split: 0})
        for ref in samples:
            try:
                with raster_env():
                    raw = self._read_sample(ref)
                example = self._finalize(ref, raw)
            except SampleError as err:
                err.sample_id = err.sample_id or ref.sample_id
                if self.config.strict:
                    raise
                skipped = SkippedSample(split, ref.sample_id, err.kind, str(err))
                for summary in (job_summary, self.summary):
                    summary.record_skip(skipped)
                warnings.warn(f"{self.name}: skipping {err}", SkippedSampleWarning, stacklevel=2)
                continue
            for summary in (job_summary, self.summary):
                summary.record_example(split)
            yield ref.sample_id, example
        if report_dir is not None:
            job_summary.write_report(report_dir, f"{split}-{uuid.uuid4().hex[:12]}")

    def _finalize(self, ref: SampleRef, raw: RawSample) -> dict:
        """Check and order one raw sample and turn it into an example dict (raises SampleError)."""
        require_dates(len(raw.frames), self.frames_after_limit)
        shapes = {frame.shape for frame in raw.frames}
        if len(shapes) > 1:
            detail = ", ".join(f"{date}: {frame.shape}" for date, frame in zip(raw.dates, raw.frames))
            raise SampleError(FaultKind.SHAPE_MISMATCH, f"frames differ in shape between dates ({detail})")
        order = sorted(range(len(raw.frames)), key=lambda i: raw.dates[i])
        pixel_values = np.stack([raw.frames[i] for i in order])
        feature = self.info.features["pixel_values"]
        if pixel_values.shape[1:] != tuple(feature.shape[1:]):
            raise SampleError(FaultKind.SHAPE_MISMATCH,
                              f"frames have shape {pixel_values.shape[1:]}, the dataset has {tuple(feature.shape[1:])} "
                              "(pass image_size=(H, W) to resample every sample to one size)")
        if pixel_values.dtype != np.dtype(feature.dtype):
            if not np.can_cast(pixel_values.dtype, feature.dtype, "safe"):
                raise SampleError(FaultKind.DTYPE_MISMATCH,
                                  f"dtype {pixel_values.dtype}, the dataset has {feature.dtype}")
            pixel_values = pixel_values.astype(feature.dtype)
        example = {
            "sample_id": ref.sample_id,
            "pixel_values": pixel_values,
            "dates": [raw.dates[i].isoformat() for i in order],
            "band_names": list(self.band_names),
            **self._finalize_label(raw.label, order, pixel_values.shape),
            **raw.geo.as_columns(),
            **raw.extras,
        }
        return example

    def _finalize_label(self, label, order: list[int], shape: tuple[int, ...]) -> dict:
        if self.LABEL_KIND == "none":
            return {}
        if label is None:
            raise SampleError(FaultKind.MISSING_LABEL, "no label")
        if self.LABEL_KIND == "frame_ids":
            return {"label": [int(label[i]) for i in order]}
        label = np.asarray(label)
        expected = shape[2:] if self.LABEL_KIND == "mask" else (shape[0], *shape[2:])
        if self.LABEL_KIND == "frame_masks":
            label = label[order]
        if label.shape != expected:
            raise SampleError(FaultKind.SHAPE_MISMATCH, f"label has shape {label.shape}, expected {expected}")
        return {"label": label.astype(np.uint8)}

    # ----------------------------------------------------------------------------------------------- entry points
    def as_dataset(self, split=None, **kwargs):
        """Like datasets' ``as_dataset``, but a split whose samples were all skipped is an empty Dataset."""
        if split is None:
            return datasets.DatasetDict({name: self.as_dataset(name, **kwargs) for name in self.info.splits})
        split_info = self.info.splits.get(str(split)) if self.info.splits else None
        if split_info is not None and split_info.num_examples == 0:
            table = InMemoryTable(self.info.features.arrow_schema.empty_table())
            return datasets.Dataset(table, info=self.info.copy(), split=str(split))
        return super().as_dataset(split=split, **kwargs)

    def build(self, **download_and_prepare_kwargs) -> BuildSummary:
        """`download_and_prepare` (or restore from the cache) and return the build's :class:`BuildSummary`.

        With ``strict=True`` the first :class:`SampleError` is raised as it is (not wrapped by datasets); with
        ``num_proc > 1`` it arrives as datasets' ``DatasetGenerationError`` whose traceback names the sample.
        """
        try:
            self.download_and_prepare(**download_and_prepare_kwargs)
        except DatasetGenerationError as err:
            cause = err.__cause__
            while cause is not None and not isinstance(cause, SampleError):
                cause = cause.__cause__
            if isinstance(cause, SampleError):
                raise cause from None
            raise
        self.summary = BuildSummary.from_reports(self._output_dir)
        if self.summary.num_skipped:
            logger.warning(f"{self.name}: {self.summary}")
        return self.summary
