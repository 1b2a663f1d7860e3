"""Benchmark suite: reference vs fast STGA / D-STGA kernels, the whole TiMo-Base backbone, memory, FLOPs.

    python -m benchmarks                       # everything; writes benchmarks/RESULTS.md
    python -m benchmarks --list                # the case ids
    python -m benchmarks --only attention/dstga --repeats 3 --no-write
    python -m benchmarks --device cuda --dtype bfloat16 --in-process --processes 1 \
        --json cuda.json --output benchmarks/RESULTS-cuda.md
    python -m benchmarks.profile attention/dstga/T30-48px/fwdbwd/fast+compile   # where one case's time goes
    python -m benchmarks.allocator             # the T=30 D-STGA cases under glibc's defaults, its tunables, huge pages

Every case runs in its own Python process (fresh allocator, no page-cache effects carried from one case to the
next) unless `--in-process` (meant for CUDA, where a case's start-up would cost more than its measurement and the
allocator's statistics are reset per case); times are medians over `--repeats` runs after one warm-up run (two
under torch.compile). The attention cases (the sweep over T included) run in `--processes` processes whose timed
runs are pooled: on CPU a process's median moves with the allocator's state (page faults: up to ~20% at T=30,
1.5x for the multi-GB reference at 256 px), more than between runs of one process. The cases a ratio compares
(reference, fast, and at T=30 the compiled ones) alternate process by process, so that a drift of the machine
between minutes of a run does not land on one side of the ratio only. Memory is the peak
extra memory of one more run (resident set on CPU, allocated memory on CUDA). The ratios are computed from numbers
of the same run only, and every number written to RESULTS.md comes from this script; the report names the commit
it measured and any uncommitted changes to the checkout.
"""

import argparse
import datetime
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import code_version, cpu_times, load_average, wait_until_idle
from .figures import plot_sweep, sweep_figure_path
from .flops_table7 import format_table7


SHAPES = {
    "T3-256px": (1, 3, 3, 256, 256),
    "T12-128px": (1, 12, 10, 128, 128),
    "T30-48px": (1, 30, 13, 48, 48),
}
SWEEP_FRAMES = (2, 4, 8, 16, 32)
# The sweep's 64x64 px frames give N = 256 stage-1 tokens, attended by 4 heads of 32 channels (batch 1, float32).
SWEEP_TOKENS, SWEEP_HEADS, SWEEP_HEAD_DIM = 256, 4, 32
# One N x N float32 matrix per (batch, head), times batch x heads.
SWEEP_LOGITS_BYTES = SWEEP_HEADS * SWEEP_TOKENS**2 * 4
# The memory rule for the fast D-STGA, `N^2 + O(T * N * (T + d))` per (batch, head), against the reference's
# `T * N^2`; the figure draws each term (times batch x heads, float32) beside the measured peaks.
SWEEP_GUIDES = {
    "N^2 per (batch, head)": lambda frames: SWEEP_LOGITS_BYTES,
    "T x N^2 per (batch, head)": lambda frames: frames * SWEEP_LOGITS_BYTES,
    "T x N x (T + d) per (batch, head)": (
        lambda frames: SWEEP_HEADS * frames * SWEEP_TOKENS * (frames + SWEEP_HEAD_DIM) * 4
    ),
}
LAYOUTS = {
    "M-M-M-M": ("mhsa", "mhsa", "mhsa", "mhsa"),
    "S-M-M-M": ("stga", "mhsa", "mhsa", "mhsa"),
    "D-M-M-M": ("dstga", "mhsa", "mhsa", "mhsa"),
    "D-D-M-M": ("dstga", "dstga", "mhsa", "mhsa"),
    "D-D-D-M": ("dstga", "dstga", "dstga", "mhsa"),
    "D-D-D-D": ("dstga", "dstga", "dstga", "dstga"),
}
IMPLEMENTATIONS = ("reference", "fast")
START_PEAK_CASE, END_PEAK_CASE = "matmul_peak", "matmul_peak/end"
PEAK_CASES = (START_PEAK_CASE, END_PEAK_CASE)
MEMORY_LIMIT_BYTES = 24 * 2**30
# Paper Table 7: the D-D-M-M fine-tuning step at the MultiEarth setting took 14.2 GB on an RTX 4090; the GPU target is
# half of that.
PAPER_FINETUNE_BYTES = 14.2e9
FINETUNE_SHAPE = (2, 3, 3, 256, 256)
FINETUNE_LABELS = 2  # MultiEarth deforestation: binary masks
# Issue targets on ratios of two attention cases: (label, slower case, faster case, measured key, target or None).
RATIO_TARGETS = [
    ("D-STGA stage-1 fwd+bwd speed-up, T=3 256px", "dstga/T3-256px/fwdbwd/reference", "dstga/T3-256px/fwdbwd/fast",
     "time_s", 5),
    ("D-STGA stage-1 fwd+bwd speed-up, T=30 48px, eager", "dstga/T30-48px/fwdbwd/reference",
     "dstga/T30-48px/fwdbwd/fast", "time_s", 2),
    ("D-STGA fwd+bwd, T=30 48px: fast compiled vs reference eager", "dstga/T30-48px/fwdbwd/reference",
     "dstga/T30-48px/fwdbwd/fast+compile", "time_s", 4),
    ("D-STGA fwd+bwd, T=30 48px: fast compiled vs reference compiled", "dstga/T30-48px/fwdbwd/reference+compile",
     "dstga/T30-48px/fwdbwd/fast+compile", "time_s", None),
    ("D-STGA stage-1 fwd+bwd memory reduction, T=3 256px", "dstga/T3-256px/fwdbwd/reference",
     "dstga/T3-256px/fwdbwd/fast", "peak_bytes", 20),
    ("STGA stage-1 fwd+bwd speed-up, T=3 256px", "stga/T3-256px/fwdbwd/reference", "stga/T3-256px/fwdbwd/fast",
     "time_s", 3),
    ("STGA stage-1 fwd+bwd memory reduction, T=3 256px", "stga/T3-256px/fwdbwd/reference",
     "stga/T3-256px/fwdbwd/fast", "peak_bytes", None),
]
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def all_cases(device: str, repeats: int, processes: int = 1) -> list[dict]:
    """Every case, cheapest first and compiled ones last (a run cut short keeps the most; the compiled attention
    cases run with the eager ones they are compared with, see `run_group`). On an accelerator also
    the whole-model compiled cases and the fine-tuning step, which would take minutes per step on a CPU."""
    accelerator = device != "cpu"
    cases = [{"id": START_PEAK_CASE, "kind": "matmul_peak"}]
    for shape_id, shape in SHAPES.items():
        for attention in ("dstga", "stga"):
            for mode in ("fwd", "fwdbwd"):
                for implementation in IMPLEMENTATIONS:
                    cases.append(
                        {
                            "id": f"attention/{attention}/{shape_id}/{mode}/{implementation}",
                            "kind": "attention", "attention": attention, "shape": shape, "mode": mode,
                            "implementation": implementation, "repeats": repeats,
                            "processes": processes,
                        }
                    )
    for frames in SWEEP_FRAMES:
        for implementation in IMPLEMENTATIONS:
            cases.append(
                {
                    "id": sweep_case_id(frames, implementation),
                    "kind": "attention", "attention": "dstga", "shape": (1, frames, 3, 64, 64), "mode": "fwdbwd",
                    "implementation": implementation, "repeats": repeats, "processes": processes,
                }
            )
    for shape_id, shape in SHAPES.items():
        for mode in ("fwd", "fwdbwd"):
            for implementation in IMPLEMENTATIONS:
                cases.append(
                    {
                        "id": f"backbone/D-D-M-M/{shape_id}/{mode}/{implementation}",
                        "kind": "backbone", "layout": LAYOUTS["D-D-M-M"], "shape": shape, "mode": mode,
                        "implementation": implementation, "repeats": max(1, repeats - 2),
                    }
                )
    for name, layout in LAYOUTS.items():
        cases.append(
            {
                "id": f"layout_memory/{name}/B2-T3-256px/fwdbwd/fast",
                "kind": "layout_memory", "layout": layout, "shape": (2, 3, 3, 256, 256), "implementation": "fast",
                "repeats": 1,
            }
        )
    if accelerator:  # in both precisions whatever --dtype: the paper's 14.2 GB were measured with mixed precision
        for dtype in ("float32", "bfloat16"):
            for implementation in IMPLEMENTATIONS:
                cases.append(finetune_case(implementation, dtype, repeats))
        cases.append(finetune_case("fast", "bfloat16", repeats, checkpointing=True))
    for implementation in IMPLEMENTATIONS:
        cases.append(
            {
                "id": f"attention/dstga/T30-48px/fwdbwd/{implementation}+compile",
                "kind": "attention", "attention": "dstga", "shape": SHAPES["T30-48px"], "mode": "fwdbwd",
                "implementation": implementation, "compile": True, "repeats": repeats, "processes": processes,
            }
        )
    if accelerator:
        cases.append(
            {
                "id": "backbone/D-D-M-M/T3-256px/fwdbwd/fast+compile",
                "kind": "backbone", "layout": LAYOUTS["D-D-M-M"], "shape": SHAPES["T3-256px"], "mode": "fwdbwd",
                "implementation": "fast", "compile": True, "repeats": repeats,
            }
        )
        cases.append(finetune_case("fast", "bfloat16", repeats, compile=True))
    # Measured again at the end: one short measurement moved by 10% between runs, and the fractions of the peak
    # are judged against the higher of the two.
    cases.append({"id": END_PEAK_CASE, "kind": "matmul_peak"})
    for case in cases:
        case["device"] = device
    return cases


def finetune_case(
    implementation: str, dtype: str, repeats: int, compile: bool = False, checkpointing: bool = False
) -> dict:
    variant = implementation + ("+compile" if compile else "") + ("+checkpointing" if checkpointing else "")
    return {
        "id": f"finetune/D-D-M-M/B2-T3-256px/{dtype}/{variant}",
        "kind": "finetune_step", "layout": LAYOUTS["D-D-M-M"], "shape": FINETUNE_SHAPE, "dtype": dtype,
        "num_labels": FINETUNE_LABELS, "implementation": implementation, "compile": compile,
        "checkpointing": checkpointing, "repeats": repeats,
    }


def run_in_process(case: dict) -> dict:
    """`run_case` without the fresh process: Dynamo's caches and the CUDA allocator's cache are cleared first."""
    import gc

    import torch

    from . import cases

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    start = time.monotonic()
    try:
        result = cases.run_spec(case)
    except Exception as error:  # one failed case (e.g. out of memory) must not end the run
        result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    return {**result, "wall_s": time.monotonic() - start}


def comparison_group(case: dict) -> str | None:
    """The cases an attention case is compared with share its id up to the implementation (`.../reference`,
    `.../fast`, `.../fast+compile`): their processes alternate (see `run_group`). Other cases run alone."""
    return case["id"].rsplit("/", 1)[0] if case.get("kind") == "attention" else None


def run_group(cases: list[dict], timeout: int, idle_wait: float, in_process: bool = False) -> dict:
    """`{case id: result}` for cases that are compared with each other (`comparison_group`), each run in
    `case["processes"]` processes (default one) and pooled as `pool_runs` does. The processes alternate in rounds,
    the order reversed every other round (reference, fast, fast, reference, ...): a drift of the machine over the
    minutes of a run then hits both sides of a ratio alike, and round `i` of each case ran side by side."""
    if in_process:
        return {case["id"]: run_in_process(case) for case in cases}
    runs = {case["id"]: [] for case in cases}
    for round_index in range(max(case.get("processes", 1) for case in cases)):
        for case in cases if round_index % 2 == 0 else reversed(cases):
            if round_index < case.get("processes", 1):
                runs[case["id"]].append(run_case(case, timeout, idle_wait))
    together = [case["id"] for case in cases]
    return {
        case_id: {**pooled, "interleaved_with": together} if len(together) > 1 and "error" not in pooled else pooled
        for case_id, pooled in ((case_id, pool_runs(case_runs)) for case_id, case_runs in runs.items())
    }


def pool_runs(runs: list[dict]) -> dict:
    """One case's runs (processes) pooled: `time_s` is the median over all their timed runs, `process_times_s`
    each process's median; memory is the largest peak seen. A failed run stands for the case."""
    failed = [run for run in runs if "error" in run or "times_s" not in run]
    if len(runs) == 1 or failed:
        return failed[0] if failed else runs[0]
    pooled = dict(runs[0], times_s=[time_s for run in runs for time_s in run["times_s"]])
    pooled["time_s"] = statistics.median(pooled["times_s"])
    pooled["process_times_s"] = [run["time_s"] for run in runs]
    if all("minor_faults_per_run" in run for run in runs):
        pooled["process_minor_faults_per_run"] = [run["minor_faults_per_run"] for run in runs]
        pooled["minor_faults_per_run"] = statistics.median(pooled["process_minor_faults_per_run"])
    for key in ("peak_bytes", "peak_resident_bytes", "others_cpu_share"):
        if all(key in run for run in runs):
            pooled[key] = max(run[key] for run in runs)
    return pooled


def run_case(case: dict, timeout: int, idle_wait: float, env: dict | None = None) -> dict:
    """Run one case in a fresh process (with environment `env`, default this process's), after waiting for the
    machine to be idle; records how much CPU other processes took while it ran (`others_cpu_share`, a fraction of
    all CPUs)."""
    busy_before = wait_until_idle(max_wait=idle_wait) if idle_wait > 0 else None
    command = [sys.executable, "-m", "benchmarks.cases", json.dumps(case)]
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, total0 = cpu_times()
    start = time.monotonic()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    busy1, total1 = cpu_times()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (children_after.ru_utime + children_after.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    ticks = os.sysconf("SC_CLK_TCK")
    others = max(0.0, (busy1 - busy0) / ticks - own) / max((total1 - total0) / ticks, 1e-9)
    context = {"busy_before_start": busy_before, "others_cpu_share": round(others, 3), "wall_s": time.monotonic() - start}
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT ") :]), **context}
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
    return {"error": f"exit code {completed.returncode}: " + " | ".join(tail), **context}


# ---------------------------------------------------------------------------------------------------------------
# Report


def _ms(result):
    return f"{1e3 * result['time_s']:.1f}" if result and "time_s" in result else "n/a"


def _mib(result):
    return f"{result['peak_bytes'] / 2**20:.1f}" if result and "peak_bytes" in result else "n/a"


def _peak_fraction(result, peak):
    """The fraction of the matmul peak a case reaches (its counted FLOPs over its time, over the peak), or None."""
    if not (result and "flops" in result and "time_s" in result and peak):
        return None
    return result["flops"] / result["time_s"] / peak


def _rounded_down(value: float, decimals: int) -> float:
    """`value` cut to `decimals` decimals: a number shown at or above a target is one that meets it (rounded to
    nearest, 4.996x would show as 5.00x beside "NOT met"). The tolerance keeps 2.29 from showing as 2.28."""
    scale = 10**decimals
    return math.floor(value * scale + 1e-9) / scale


def _peak_share(result, peak):
    """`_peak_fraction` as a percentage (rounded down, see `_rounded_down`)."""
    fraction = _peak_fraction(result, peak)
    return f"{_rounded_down(100 * fraction, 1):.1f}%" if fraction is not None else "n/a"


def _ratio(numerator, denominator, key):
    try:
        return numerator[key] / max(denominator[key], 1e-12)
    except (TypeError, KeyError):
        return None


def _fmt_ratio(value):
    return f"{_rounded_down(value, 2):.2f}x" if value is not None else "n/a"


def round_ratios(slower: dict | None, faster: dict | None) -> list[float]:
    """The ratio of the two cases' process medians round by round, where their processes alternated in one group
    (`run_group`); empty otherwise (e.g. one of them kept from an earlier invocation by `--resume`)."""
    if not (slower and faster and "process_times_s" in slower and "process_times_s" in faster):
        return []
    if slower.get("interleaved_with") != faster.get("interleaved_with") or not slower.get("interleaved_with"):
        return []
    return [a / max(b, 1e-12) for a, b in zip(slower["process_times_s"], faster["process_times_s"])]


def describe_code(info: dict) -> str:
    """Where the measured code came from (`code_version`), for the report's first line; empty for raw results
    written before runs recorded it."""
    text = _describe_code(info.get("code"))
    if info.get("resumed_codes"):
        unknown = " with code of which nothing was recorded"
        earlier = ";".join(_describe_code(code) or unknown for code in info["resumed_codes"])
        text += f" (cases kept from the resumed invocation(s) ran{earlier})"
    return text


def _describe_code(code: dict | None) -> str:
    if code is None:
        return ""
    if code["commit"] is None:
        return " with code outside a git checkout (its commit is not known)"
    changed = code["changed"]
    suffix = f", plus uncommitted changes to {', '.join(f'`{path}`' for path in changed)}" if changed else ""
    return f" with the code of commit {code['commit'][:12]}{suffix}"


def measured_peak(results: dict) -> dict | None:
    """The higher of the matmul peaks measured at the start and at the end of the run (`flops_per_s`, `size`, ...),
    with `rates`: each measurement's FLOP/s in that order; `None` where neither was measured."""
    measured = [
        results[case_id]["matmul_peak"]
        for case_id in PEAK_CASES
        if "matmul_peak" in (results.get(case_id) or {})
    ]
    if not measured:
        return None
    return {**max(measured, key=lambda peak: peak["flops_per_s"]), "rates": [peak["flops_per_s"] for peak in measured]}


def _verdict(value, target):
    if value is None:
        return "not measured"
    return "met" if value >= target else "NOT met"


def sweep_case_id(frames: int, implementation: str) -> str:
    return f"sweep/dstga/T{frames}-64px/fwdbwd/{implementation}"


def sweep_series(results: dict) -> dict[str, list[tuple[int, float, int]]]:
    """The sweep's measured `(frames, seconds, peak bytes)` per implementation (cases that failed left out)."""
    series = {}
    for implementation in IMPLEMENTATIONS:
        measured = [(frames, results.get(sweep_case_id(frames, implementation))) for frames in SWEEP_FRAMES]
        series[implementation] = [
            (frames, result["time_s"], result["peak_bytes"])
            for frames, result in measured
            if result and "time_s" in result and "peak_bytes" in result
        ]
    return series


def build_report(results: dict, info: dict, sweep_figure: str | None = None) -> str:
    """The report in Markdown; `sweep_figure`: the file name of the sweep's figure (`plot_sweep`), beside it."""
    get = results.get
    best_peak = measured_peak(results)
    peak = best_peak and best_peak["flops_per_s"]
    machine = (get(START_PEAK_CASE) or {}).get("machine", {})
    on_cpu = info.get("device", "cpu") == "cpu"
    dtype = info.get("dtype", "float32")
    lines = ["# timo_hf benchmark results", ""]
    where = (
        "all cases ran in one process"
        if info.get("in_process")
        else "each case ran in its own process (the attention cases in several, their repeats pooled, the processes "
        "of the cases a ratio compares alternating; the raw results list each process's median as `process_times_s`)"
    )
    origin = (
        f"that run and the {info['resumed']} earlier invocation(s) it resumed (`--resume`: their cases were kept, "
        "failed ones measured again)"
        if info.get("resumed")
        else "that one run"
    )
    lines += [
        f"Written by `python -m benchmarks` on {info['date']} ({info['command']}){describe_code(info)}. "
        f"Every number below comes from {origin}; {where}; times are medians of the listed repeats after a warm-up "
        "run. Memory (`MiB`) is the peak of the tensors created by the measured code and alive at once (inputs and "
        "weights, and views or in-place results of them, excluded; a pooled buffer of the fast kernels counted whole "
        "while a tensor uses it; counted at the dispatcher, so scratch space inside a kernel is not seen, and where "
        "two gradients of one tensor meet, their sum, which autograd makes in place in a plain run and out of place "
        "under a dispatcher hook, counts as one tensor more); the raw results also hold the peak growth of the "
        "process's resident set on CPU, of the CUDA allocator's allocated memory on CUDA (`peak_resident_bytes`); "
        "compiled cases have only the latter (on CPU no tensor peak is measured for them)."
        + (
            ""
            if dtype == "float32"
            else f" Precision: the model code ran under {dtype} autocast (attention cases: {dtype} projections in)"
            + (", MHSA held to SDPA's flash kernel." if not on_cpu else ".")
        ),
        "",
        *([f"Note: {info['note']}", ""] if info.get("note") else []),
        "## Machine",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    clock = {"wall": "wall-clock time", "cpu": "process CPU time (one thread)"}[info.get("clock", "wall")]
    lines += [f"- times measured as: {clock}; torch threads per case: {machine.get('torch_threads')}"]
    lines += [f"- load average (1, 5, 15 min) before / after the run: {info['load_before']} / {info['load_after']}"]
    if peak:
        size, rates = best_peak["size"], " and ".join(f"{rate / 1e9:.1f}" for rate in best_peak["rates"])
        lines += [
            f"- measured {dtype} matmul peak: {peak / 1e9:.1f} GFLOP/s ({size}x{size} products; the higher of the "
            f"measurements at the start and the end of the run, {rates} GFLOP/s)"
        ]
    lines += [""]

    # Key ratios -------------------------------------------------------------------------------------------------
    def att(attention, shape, mode, implementation):
        return get(f"attention/{attention}/{shape}/{mode}/{implementation}")

    rows = []

    def add(name, value, target, detail="", per_round=""):
        rows.append((name, _fmt_ratio(value) if not isinstance(value, str) else value, target, detail, per_round))

    def cpu_target(text, verdict):
        """The issue's ratio and peak targets are set for its CPU: elsewhere they are shown for information."""
        return (text, verdict) if on_cpu else (f"({text} on the CPU)", "")

    for label, slower, faster, key, target in RATIO_TARGETS:
        slower_result, faster_result = get(f"attention/{slower}"), get(f"attention/{faster}")
        value = _ratio(slower_result, faster_result, key)
        text, verdict = cpu_target(f">= {target}x", _verdict(value, target)) if target else ("(info)", "")
        rounds = round_ratios(slower_result, faster_result) if key == "time_s" else []
        add(label, value, text, verdict, ", ".join(_fmt_ratio(ratio) for ratio in rounds))
    for mode, target in (("fwd", 0.5), ("fwdbwd", 0.4)):
        result = get(f"backbone/D-D-M-M/T3-256px/{mode}/fast")
        fraction = _peak_fraction(result, peak)
        label = "forward" if mode == "fwd" else "forward+backward"
        add(
            f"TiMo-Base D-D-M-M {label} at [1,3,3,256,256], fraction of matmul peak",
            _peak_share(result, peak),
            *cpu_target(f">= {int(100 * target)}%", _verdict(fraction, target)),
        )
    layout_results = [get(f"layout_memory/{name}/B2-T3-256px/fwdbwd/fast") for name in LAYOUTS]
    if all(r and "peak_bytes" in r for r in layout_results):
        largest = max(r["peak_bytes"] for r in layout_results)
        add(
            "Six Table-7 layouts fwd+bwd at [2,3,3,256,256]: largest peak",
            f"{largest / 2**30:.2f} GiB",
            "< 24 GiB",
            "met" if largest < MEMORY_LIMIT_BYTES else "NOT met",
        )
    else:
        add("Six Table-7 layouts fwd+bwd at [2,3,3,256,256]", "n/a", "< 24 GiB", "not measured (or failed)")
    for variant, how in (("fast", ""), ("fast+checkpointing", ", activation checkpointing")):
        finetune = get(f"finetune/D-D-M-M/B2-T3-256px/bfloat16/{variant}")
        if on_cpu:
            break
        if finetune and "peak_reserved_bytes" in finetune:
            held = finetune["peak_reserved_bytes"]
            add(
                "Fine-tuning step, TiMo-Base D-D-M-M + UperNet, [2,3,3,256,256], per-frame output, bfloat16 "
                f"autocast{how}: peak memory held by the allocator",
                f"{held / 1e9:.2f} GB ({100 * held / PAPER_FINETUNE_BYTES:.0f}% of the paper's 14.2 GB)",
                f"<= {PAPER_FINETUNE_BYTES / 2e9:.1f} GB",
                "met" if held <= PAPER_FINETUNE_BYTES / 2 else "NOT met",
            )
        else:
            add(f"Fine-tuning step{how}, peak memory", "n/a", f"<= {PAPER_FINETUNE_BYTES / 2e9:.1f} GB", "not measured")
    lines += [
        "## Targets (issue #9)",
        "",
        "`per round`: for a speed-up, the ratio of the two cases' medians in each round of processes that ran side "
        "by side (see `run_group`); `measured` is the ratio of their pooled medians.",
        "",
        "| what | measured | target | verdict | per round |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    lines += [""]

    # Attention kernels ------------------------------------------------------------------------------------------
    lines += [
        "## Stage-1 attention kernels (TiMo-Base stage 1: 4 heads x 32 channels, batch 1)",
        "",
        "`TiMoAttention.attend`: from the query and key/value projections to the output projection's input "
        "(`[B, T*N, C]`, where the fast kernels' output is a view and the reference's a copy); D-STGA includes its "
        "two temporal medians and the offset branch. `fwd` without autograd, `fwdbwd` forward and backward. "
        "`% peak`: the FLOPs of the matrix products each implementation runs (counted by FlopCounterMode; the fast "
        "kernels run a few percent more, their backward recomputing the spatial logits and at T=30 the keys padded "
        "to 32 frames, and on CPU unroll the products over at most 4 frames into element-wise operations, which are "
        "not counted) per second, as a fraction of the measured matmul peak.",
        "",
        "| attention | input | N | mode | reference ms | fast ms | speed-up | reference MiB | fast MiB | memory ratio "
        "| reference % peak | fast % peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape_id in SHAPES:
        for attention in ("dstga", "stga"):
            for mode in ("fwd", "fwdbwd"):
                ref, fast = att(attention, shape_id, mode, "reference"), att(attention, shape_id, mode, "fast")
                tokens = (fast or ref or {}).get("tokens", "")
                lines.append(
                    f"| {attention} | {shape_id} | {tokens} | {mode} | {_ms(ref)} | {_ms(fast)} | "
                    f"{_fmt_ratio(_ratio(ref, fast, 'time_s'))} | {_mib(ref)} | {_mib(fast)} | "
                    f"{_fmt_ratio(_ratio(ref, fast, 'peak_bytes'))} | {_peak_share(ref, peak)} | "
                    f"{_peak_share(fast, peak)} |"
                )
    lines += [""]
    lines += [
        "torch.compile (fullgraph, default mode) of the same D-STGA step, T=30 48px, fwd+bwd:",
        "",
        "| implementation | eager ms | compiled ms | compiled speed-up over eager reference | compiled % peak |",
        "|---|---|---|---|---|",
    ]
    eager_reference = att("dstga", "T30-48px", "fwdbwd", "reference")
    for implementation in IMPLEMENTATIONS:
        eager = att("dstga", "T30-48px", "fwdbwd", implementation)
        compiled = att("dstga", "T30-48px", "fwdbwd", f"{implementation}+compile")
        speedup = _fmt_ratio(_ratio(eager_reference, compiled, "time_s"))
        lines.append(
            f"| {implementation} | {_ms(eager)} | {_ms(compiled)} | {speedup} | {_peak_share(compiled, peak)} |"
        )
    lines += [""]
    # The cases behind the speed-up targets, process by process.
    per_process = {}
    for attention, shape_id, variants in (
        ("dstga", "T3-256px", IMPLEMENTATIONS),
        ("stga", "T3-256px", IMPLEMENTATIONS),
        ("dstga", "T30-48px", [*IMPLEMENTATIONS, *(f"{implementation}+compile" for implementation in IMPLEMENTATIONS)]),
    ):
        for variant in variants:
            result = att(attention, shape_id, "fwdbwd", variant)
            if result and "process_times_s" in result:
                per_process[f"attention/{attention}/{shape_id}/fwdbwd/{variant}"] = result
    if per_process:
        lines += [
            "The fwd+bwd cases behind the speed-up targets, process by process (CPU: minor page faults per step are "
            "first touches of memory the allocator took from the system during the timed steps; "
            "`python -m benchmarks.allocator` times cases with freed memory kept in the heap):",
            "",
            "| case | medians per process, ms | minor page faults per step, per process |",
            "|---|---|---|",
        ]
        for case_id, result in per_process.items():
            times = ", ".join(f"{1e3 * seconds:.1f}" for seconds in result["process_times_s"])
            faults = ", ".join(f"{count:.0f}" for count in result.get("process_minor_faults_per_run", [])) or "n/a"
            lines.append(f"| {case_id} | {times} | {faults} |")
        lines += [""]

    # Sweep -------------------------------------------------------------------------------------------------------
    lines += [
        "## D-STGA over T at 64x64 px (N = 256 tokens per frame, 4 heads), forward+backward",
        "",
        "`N^2/(b,h)` is the size of one N x N float32 matrix per (batch, head) times batch x heads; the reference "
        "holds several `T x N x (T + N)` tensors.",
        "",
        *(
            [
                "The figure draws the same cases on log scales, the memory panel with the terms of the issue's memory "
                f"rule as guides: `N^2`, `T x N^2` and `T x N x (T + d)` per (batch, head), d = {SWEEP_HEAD_DIM}.",
                "",
                f"![D-STGA time and memory over T]({sweep_figure})",
                "",
            ]
            if sweep_figure
            else []
        ),
        "| T | reference ms | fast ms | speed-up | reference MiB | fast MiB | memory ratio | N^2/(b,h) MiB "
        "| T*N^2/(b,h) MiB | reference % peak | fast % peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for frames in SWEEP_FRAMES:
        ref, fast = get(sweep_case_id(frames, "reference")), get(sweep_case_id(frames, "fast"))
        n2 = SWEEP_LOGITS_BYTES / 2**20
        lines.append(
            f"| {frames} | {_ms(ref)} | {_ms(fast)} | {_fmt_ratio(_ratio(ref, fast, 'time_s'))} | {_mib(ref)} | "
            f"{_mib(fast)} | {_fmt_ratio(_ratio(ref, fast, 'peak_bytes'))} | {n2:.1f} | {frames * n2:.1f} | "
            f"{_peak_share(ref, peak)} | {_peak_share(fast, peak)} |"
        )
    lines += [""]

    # Backbone ----------------------------------------------------------------------------------------------------
    lines += [
        "## Whole TiMo-Base backbone (D-D-M-M, eval mode)",
        "",
        "GFLOPs counted by `timo_hf.flops.count_flops` for the pass that was timed, on the same device (the fast "
        "kernels recompute the spatial logits in backward, which is counted).",
        "",
        "| input | mode | implementation | ms | peak MiB | counted GFLOPs | GFLOP/s | fraction of matmul peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape_id in SHAPES:
        for mode in ("fwd", "fwdbwd"):
            for implementation in (*IMPLEMENTATIONS, "fast+compile"):
                result = get(f"backbone/D-D-M-M/{shape_id}/{mode}/{implementation}")
                if implementation.endswith("+compile") and result is None:
                    continue  # compiled backbones run on accelerators only
                if result and "flops" in result:
                    rate = result["flops"] / result["time_s"]
                    lines.append(
                        f"| {shape_id} | {mode} | {implementation} | {_ms(result)} | {_mib(result)} | "
                        f"{result['flops'] / 1e9:.2f} | {rate / 1e9:.1f} | {_peak_share(result, peak)} |"
                    )
                else:
                    error = (result or {}).get("error", "not run")
                    lines.append(f"| {shape_id} | {mode} | {implementation} | n/a | n/a | n/a | n/a | {error} |")
    lines += [""]

    # Layout memory -----------------------------------------------------------------------------------------------
    lines += [
        "## Paper Table 7 layouts: one training step (train mode, forward+backward) at [2, 3, 3, 256, 256], fast kernels",
        "",
        "`peak MiB`: the tensor peak of the step plus the model's weights and buffers.",
        "",
        "| layout | peak MiB | seconds | within 24 GiB |",
        "|---|---|---|---|",
    ]
    for name in LAYOUTS:
        result = get(f"layout_memory/{name}/B2-T3-256px/fwdbwd/fast")
        if result and "peak_bytes" in result:
            ok = "yes" if result["peak_bytes"] < MEMORY_LIMIT_BYTES else "NO"
            lines.append(f"| {name} | {_mib(result)} | {result['time_s']:.1f} | {ok} |")
        else:
            lines.append(f"| {name} | n/a | n/a | {(result or {}).get('error', 'not run')} |")
    lines += [""]

    finetune_results = {key: value for key, value in results.items() if key.startswith("finetune/")}
    if finetune_results:
        lines += [
            "## Fine-tuning step at the paper's MultiEarth setting (Table 7: 14.2 GB on an RTX 4090)",
            "",
            "`TiMoForSemanticSegmentation`, TiMo-Base D-D-M-M + UperNet, per-frame output, 2 classes, batch 2, "
            "[3, 3, 256, 256]; forward with labels, backward, AdamW step, after a warm-up step. `total` is "
            "everything alive at the step's peak (weights, gradients, AdamW state, activations); `held` is what "
            "the CUDA caching allocator held from the driver at most.",
            "",
            "| precision | implementation | ms per step | parameters (M) | weights + AdamW state GB | peak total GB "
            "| peak held GB |",
            "|---|---|---|---|---|---|---|",
        ]
        for case_id, result in finetune_results.items():
            dtype, implementation = case_id.split("/")[-2:]
            if "time_s" not in result:
                error = result.get("error", "not run")
                lines.append(f"| {dtype} | {implementation} | n/a | n/a | n/a | n/a | {error} |")
                continue
            held = result.get("peak_reserved_bytes")
            lines.append(
                f"| {dtype} | {implementation} | {_ms(result)} | {result['parameters'] / 1e6:.2f} | "
                f"{result['state_bytes'] / 1e9:.2f} | {result['peak_total_bytes'] / 1e9:.2f} | "
                f"{f'{held / 1e9:.2f}' if held is not None else 'n/a'} |"
            )
        lines += [""]
    if info.get("table7"):
        lines += [
            "## Paper Table 7 FLOPs (reference kernels, counted on the meta device)",
            "",
            format_table7(info["table7"]),
            "",
        ]
    disturbed = {
        case_id: r["others_cpu_share"]
        for case_id, r in results.items()
        if r and r.get("others_cpu_share") is not None and r["others_cpu_share"] > 0.05
    }
    lines += ["## Contention", ""]
    if info.get("in_process"):
        lines += ["Not measured: the cases ran in one process (`--in-process`)."]
    elif disturbed:
        lines += [
            "Other processes on this shared machine took more than 5% of the CPUs while these cases ran, so their "
            "times are pessimistic (multi-threaded operators wait for a descheduled thread):",
            "",
        ]
        lines += [f"- {case_id}: {100 * share:.0f}%" for case_id, share in disturbed.items()]
    else:
        lines += ["No case ran while other processes took more than 5% of the CPUs."]
    lines += [""]
    errors = {case_id: r["error"] for case_id, r in results.items() if r and "error" in r}
    if errors:
        lines += ["## Failed cases", ""] + [f"- {case_id}: {error}" for case_id, error in errors.items()] + [""]
    lines += ["## Raw results", "", "```json", json.dumps(results, indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)


def describe(result: dict) -> str:
    """One case's result in a few words, for the progress lines."""
    if "error" in result:
        return "FAILED: " + result["error"]
    if "time_s" not in result:
        return "done"
    others = result.get("others_cpu_share")
    if "peak_bytes" in result:
        memory = f"peak {result['peak_bytes'] / 2**20:.1f} MiB"
    else:
        memory = f"resident set grew {result.get('peak_resident_bytes', 0) / 2**20:.1f} MiB"
    return f"{1e3 * result['time_s']:.1f} ms, {memory}" + (
        f" (others used {100 * others:.0f}% of the CPUs meanwhile)" if others is not None else ""
    )


def write_report(results: dict, info: dict, output: Path | None) -> None:
    """Print the report (its raw results left out) and, unless `output` is None, write it there with the sweep's
    figure beside it (where the sweep was measured; else a figure of an earlier report there is removed, so that
    none is left beside a report that does not show it)."""
    figure = None
    if output is not None:
        device = (results.get(START_PEAK_CASE) or {}).get("machine", {}).get("device", info.get("device", "cpu"))
        title = (
            f"D-STGA stage-1 attention over T at 64x64 px (N = {SWEEP_TOKENS}, {SWEEP_HEADS} heads), "
            f"forward+backward, {device} {info.get('dtype', 'float32')}"
        )
        figure_path = sweep_figure_path(output)
        figure = plot_sweep(sweep_series(results), SWEEP_GUIDES, title, figure_path)
        if figure is None:
            figure_path.unlink(missing_ok=True)
    report = build_report(results, info, sweep_figure=figure.name if figure else None)
    print(report.split("## Raw results")[0])
    if output is not None:
        output.write_text(report)
        print(f"written {output}" + (f" and {figure}" if figure else ""))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32",
        help="bfloat16: the model code runs under bfloat16 autocast (on CUDA with MHSA held to flash attention)",
    )
    parser.add_argument(
        "--in-process", action="store_true",
        help="run the cases in this process (for CUDA: no per-case start-up; the allocator and Dynamo are reset)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (backbone cases: 2 fewer)")
    parser.add_argument("--only", nargs="*", default=None, help="run only the cases whose id contains one of these")
    parser.add_argument("--list", action="store_true", help="list the case ids and exit")
    parser.add_argument(
        "--processes", type=int, default=3, help="processes per attention case (the T sweep included), runs pooled"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every case (default: torch's)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall-clock time (default) or process CPU time (with --threads 1 only; for a busy shared machine)",
    )
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per case")
    parser.add_argument(
        "--idle-wait", type=float, default=300.0,
        help="before each case, wait up to this many seconds for other processes to leave the CPUs (0: no wait)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="report path (default benchmarks/RESULTS.md)")
    parser.add_argument("--no-write", action="store_true", help="print the report, do not write it")
    parser.add_argument(
        "--json", type=Path, default=None, help="also save the raw results as JSON here (rewritten after each case)"
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="keep the cases already measured without error in --json (of an interrupted run) and run the others",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="measure nothing: rebuild the report from the raw results in --json"
    )
    parser.add_argument("--note", default=None, help="a remark printed in the report's header (kept in --json)")
    args = parser.parse_args(argv)
    if min(args.repeats, args.processes) < 1:
        parser.error("--repeats and --processes must be at least 1")
    if (args.resume or args.report_only) and not args.json:
        parser.error("--resume and --report-only need --json (the raw results of a run)")
    if args.report_only:
        if not args.json.is_file():
            parser.error(f"--report-only: no raw results at {args.json}")
        saved = json.loads(args.json.read_text())
        if args.note:
            saved["info"]["note"] = args.note
            args.json.write_text(json.dumps(saved, indent=1))
        write_report(saved["results"], saved["info"], None if args.no_write else args.output)
        return

    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1")
    cases = all_cases(args.device, args.repeats, args.processes)
    for case in cases:
        case.update(threads=args.threads, clock=args.clock)
        case.setdefault("dtype", args.dtype)
    if args.only:
        cases = [c for c in cases if c["id"] in PEAK_CASES or any(key in c["id"] for key in args.only)]
    if args.list:
        print("\n".join(c["id"] for c in cases))
        return
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_before": load_average(),
        "code": code_version(ROOT),
        "threads": args.threads,
        "clock": args.clock,
        "device": args.device,
        "dtype": args.dtype,
        "in_process": args.in_process,
        "note": args.note,
    }
    results = {}
    if args.resume and args.json.exists():
        previous = json.loads(args.json.read_text())
        results = {key: value for key, value in previous["results"].items() if "error" not in value}
        info["command"] = previous["info"]["command"] + " (resumed by: " + info["command"] + ")"
        info["resumed"] = previous["info"].get("resumed", 0) + 1
        info["note"] = args.note or previous["info"].get("note")
        # The code every earlier invocation measured, where it differs from this one's: some kept cases ran it.
        earlier = [*previous["info"].get("resumed_codes", []), previous["info"].get("code")]
        info["resumed_codes"] = [
            code for index, code in enumerate(earlier) if code != info["code"] and code not in earlier[:index]
        ]
        print(f"resuming: {len(results)} cases already measured in {args.json}")
    position = {case["id"]: index for index, case in enumerate(cases, 1)}
    for case in cases:
        if case["id"] in results:
            continue
        group_key = comparison_group(case)
        group = [c for c in cases if c["id"] not in results and group_key and comparison_group(c) == group_key]
        group = group or [case]
        print(
            f"[{', '.join(str(position[c['id']]) for c in group)}/{len(cases)}] "
            f"{', '.join(c['id'] for c in group)} ...",
            flush=True,
        )
        results.update(run_group(group, args.timeout, args.idle_wait, args.in_process))
        if args.json:  # after every group, so that an interrupted run loses nothing (see --resume)
            args.json.write_text(json.dumps({"info": info, "results": results}, indent=1))
        for member in group:
            print(f"  {member['id']}: {describe(results[member['id']])}", flush=True)
    if not args.only or any("table7" in key for key in args.only):
        from timo_hf.flops import table7

        info["table7"] = table7()
    info["load_after"] = load_average()
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": results}, indent=1))
    write_report(results, info, None if args.no_write else args.output)


if __name__ == "__main__":
    main()
