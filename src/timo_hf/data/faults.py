"""Faulty raw samples: the error raised while reading one, and the summary of what a build skipped.

A builder never yields zeros in place of unreadable data. When one sample cannot be read (corrupt or truncated
file, missing band file, missing timestamps, shapes that differ between dates, missing label, ...) the builder
raises :class:`SampleError` from its reader; the shared generation loop then either re-raises it (``strict=True``)
or skips the sample, emits a :class:`SkippedSampleWarning` and records a :class:`SkippedSample` in the build's
:class:`BuildSummary`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path


class FaultKind:
    """The kinds of per-sample faults (plain strings, so they serialise as they are)."""

    CORRUPT_FILE = "corrupt_file"
    MISSING_FILE = "missing_file"
    MISSING_BAND = "missing_band"
    MISSING_TIMESTAMPS = "missing_timestamps"
    SHAPE_MISMATCH = "shape_mismatch"
    DTYPE_MISMATCH = "dtype_mismatch"
    MISSING_LABEL = "missing_label"


class SampleError(Exception):
    """One raw sample cannot be turned into an example; `kind` is one of :class:`FaultKind`."""

    def __init__(self, kind: str, message: str, sample_id: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.sample_id = sample_id

    def __reduce__(self):  # keep kind/sample_id when the error crosses a process boundary
        return (type(self), (self.kind, self.args[0], self.sample_id))

    def __str__(self) -> str:
        prefix = f"[{self.kind}] " + (f"sample {self.sample_id}: " if self.sample_id else "")
        return prefix + self.args[0]


class SkippedSampleWarning(UserWarning):
    """Emitted once per skipped sample when a builder runs with ``strict=False``."""


@dataclass(frozen=True)
class SkippedSample:
    split: str
    sample_id: str
    kind: str
    message: str


@dataclass
class BuildSummary:
    """What one build produced: examples per split and the samples it skipped (with the reason)."""

    num_examples: dict[str, int] = field(default_factory=dict)
    skipped: list[SkippedSample] = field(default_factory=list)

    REPORT_GLOB = "timo_build_report-*.json"

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def counts_by_kind(self) -> dict[str, int]:
        return dict(Counter(item.kind for item in self.skipped))

    def record_example(self, split: str) -> None:
        self.num_examples[split] = self.num_examples.get(split, 0) + 1

    def record_skip(self, item: SkippedSample) -> None:
        self.skipped.append(item)

    def merge(self, other: BuildSummary) -> None:
        for split, count in other.num_examples.items():
            self.num_examples[split] = self.num_examples.get(split, 0) + count
        self.skipped.extend(other.skipped)

    def to_dict(self) -> dict:
        return {"num_examples": dict(self.num_examples), "skipped": [asdict(item) for item in self.skipped]}

    @classmethod
    def from_dict(cls, data: dict) -> BuildSummary:
        return cls(dict(data["num_examples"]), [SkippedSample(**item) for item in data["skipped"]])

    def write_report(self, directory: str | Path, name: str) -> None:
        """Write this (partial) summary as one report file; a build with several jobs writes one per job."""
        path = Path(directory) / self.REPORT_GLOB.replace("*", name)
        path.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_reports(cls, directory: str | Path) -> BuildSummary:
        """Merge every report a build left in `directory` (also works on a build restored from the cache)."""
        summary = cls()
        for path in sorted(Path(directory).glob(cls.REPORT_GLOB)):
            summary.merge(cls.from_dict(json.loads(path.read_text())))
        summary.skipped.sort(key=lambda item: (item.split, item.sample_id))
        return summary

    def __str__(self) -> str:
        built = ", ".join(f"{split}={count}" for split, count in sorted(self.num_examples.items())) or "none"
        kinds = ", ".join(f"{kind}={count}" for kind, count in sorted(self.counts_by_kind().items()))
        return f"built: {built}; skipped: {self.num_skipped}" + (f" ({kinds})" if kinds else "")
