"""The figure of the suite's D-STGA sweep over T, written beside the report (`python -m benchmarks`)."""

from collections.abc import Callable
from pathlib import Path

from timo_hf.plotting import pyplot


MIB = 2**20
GUIDE_STYLES = (":", "--", "-.")


def sweep_figure_path(report: Path) -> Path:
    """Where the figure of a report goes: beside it, named after it (`RESULTS.md` -> `RESULTS-dstga-over-T.png`)."""
    return report.with_name(f"{report.stem}-dstga-over-T.png")


def plot_sweep(
    series: dict[str, list[tuple[int, float, int]]], guides: dict[str, Callable[[int], float]], title: str, path: Path
) -> Path | None:
    """Forward+backward time and peak memory over T, one line per implementation (`series`: its measured
    `(frames, seconds, peak bytes)`), the memory panel with `guides` (label: bytes as a function of T) as black
    guide lines. Returns None, writing nothing, where no point was measured."""
    frames = sorted({point[0] for points in series.values() for point in points})
    if not frames:
        return None
    plt = pyplot()
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 5), dpi=100)
    for implementation, points in series.items():
        if points:
            counts, seconds, peaks = zip(*sorted(points))
            time_axis.plot(counts, [1e3 * s for s in seconds], marker="o", label=implementation)
            memory_axis.plot(counts, [peak / MIB for peak in peaks], marker="o", label=implementation)
    for (label, size), style in zip(guides.items(), GUIDE_STYLES):
        memory_axis.plot(frames, [size(t) / MIB for t in frames], style, color="black", linewidth=1, label=label)
    for axis, label in ((time_axis, "forward+backward time (ms)"), (memory_axis, "peak memory (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(frames, [str(t) for t in frames])
        axis.set_xlabel("frames T")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
