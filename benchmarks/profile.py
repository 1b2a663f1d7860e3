"""Where the time of one benchmark case goes: `python -m benchmarks.profile CASE_ID`.

    python -m benchmarks.profile attention/dstga/T30-48px/fwdbwd/fast+compile
    python -m benchmarks.profile backbone/D-D-M-M/T3-256px/fwd/fast --steps 2 --rows 30

Builds the step of one attention or backbone case of the suite (`python -m benchmarks --list` names them) on the
CPU, runs the case's warm-up runs, then profiles `--steps` steps in this process with torch.profiler and prints,
per step: the operators that took the most time by self time (with their input shapes; the kernels inductor
generated, by name, for compiled cases), and how the step splits between matrix products (with the rate they reach
against the measured matmul peak), SDPA's fused attention kernels, generated kernels and everything else. The
profiler adds a cost to every operator call, so the step time it sees is above the suite's: the shares and the
rates are what this is for, the suite's numbers are the measurement.

Compiled cases are clocked without the profiler: each call of a kernel inductor generated and of a library product
the generated code calls (`extern_kernels`) is timed from Python, and the rest of the step (Dynamo's guards, the
graphs' wrappers and allocations, autograd, operators the graphs call directly) is one row. On this 2-core machine a
running profiler slows generated kernels several-fold, some far more than others (with inductor's own per-kernel
ranges, `cpp.enable_kernel_profile`, up to thirty-fold), so a profile of compiled code overstated the kernels' share
and blamed the wrong ones.
"""

import argparse
import contextlib
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import addmm_flop, baddbmm_flop, bmm_flop, mm_flop

from timo_hf.flops import IN_PLACE_PRODUCT_FLOPS

from .__main__ import all_cases
from .cases import PREPARERS, dtype_of, warmup_runs
from .common import matmul_peak


# Dense products (the rate of the rest is not a matmul rate), in place or not: the profiler counts the FLOPs of the
# out-of-place ones only, so those of the in-place ones (`baddbmm_`: a backward accumulating its blocks) are counted
# from their operands' shapes (`timo_hf.flops.IN_PLACE_PRODUCT_FLOPS`).
MATRIX_PRODUCTS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm")
IN_PLACE_PRODUCTS = {f"aten::{name}": formula for name, formula in IN_PLACE_PRODUCT_FLOPS.items()}
# FLOPs of the library products that compiled code calls, from their tensor arguments.
EXTERN_PRODUCT_FLOPS = {
    "mm": lambda left, right, *_: mm_flop(left.shape, right.shape),
    "bmm": lambda left, right, *_: bmm_flop(left.shape, right.shape),
    "addmm": lambda added, left, right, *_: addmm_flop(added.shape, left.shape, right.shape),
    "baddbmm": lambda added, left, right, *_: baddbmm_flop(added.shape, left.shape, right.shape),
}
REST_OF_STEP = "the rest of the step (Dynamo, graph wrappers, autograd, direct operator calls)"


def find_case(case_id: str, dtype: str) -> dict:
    cases = {case["id"]: case for case in all_cases("cpu", repeats=1)}
    if case_id not in cases:
        close = [known for known in cases if case_id in known]
        hint = f"cases like it: {', '.join(close)}" if close else "python -m benchmarks --list names them"
        raise SystemExit(f"no case {case_id!r}; {hint}")
    case = {**cases[case_id], "dtype": dtype}
    if case["kind"] not in PREPARERS:
        kinds = ", ".join(sorted(PREPARERS))
        raise SystemExit(f"case {case_id!r} is a {case['kind']} case, which is not profiled (kinds: {kinds})")
    return case


def kind_of(name: str) -> str:
    if name in MATRIX_PRODUCTS or name in IN_PLACE_PRODUCTS:
        return "matrix products"
    if name.startswith("aten::_scaled_dot_product"):  # SDPA's fused kernels (MHSA; STGA's per-frame spatial part)
        return "fused attention"
    if "cpp_fused" in name:
        return "generated kernels"
    return "everything else"


def profile_case(case: dict, steps: int):
    """Per-step rows `(milliseconds, calls, flops, name, input shapes)` of the case's operators, by self time."""
    run = PREPARERS[case["kind"]](case)
    for _ in range(warmup_runs(case)):
        run()
    if case.get("compile"):
        return clock_compiled_step(run, steps)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as profiler:
        for _ in range(steps):
            run()
    rows = [
        (event.self_cpu_time_total / 1e3 / steps, event.count / steps, operator_flops(event) / steps, event.key,
         str(event.input_shapes))
        for event in profiler.key_averages(group_by_input_shape=True)
        if event.self_cpu_time_total > 0
    ]
    return sorted(rows, reverse=True)


def clock_compiled_step(run, steps: int):
    """`profile_case`'s rows for a compiled step, clocked without the profiler (see the module's docstring)."""
    totals = defaultdict(lambda: [0.0, 0, 0])  # (name, shapes) -> [seconds, calls, flops]
    with clocked_generated_code(totals):
        start = time.perf_counter()
        for _ in range(steps):
            run()
        elapsed = time.perf_counter() - start
    rows = [
        (seconds * 1e3 / steps, calls / steps, flops / steps, name, shapes)
        for (name, shapes), (seconds, calls, flops) in totals.items()
    ]
    rows.append((elapsed * 1e3 / steps - sum(row[0] for row in rows), 1, 0, REST_OF_STEP, "[]"))
    return sorted(rows, reverse=True)


@contextlib.contextmanager
def clocked_generated_code(totals: dict):
    """Inside this block, every call of a kernel inductor has generated so far, named `graph G <kernel>` (G: its
    module's number in the order of compilation), and of a product its code calls (`aten::bmm`, ...) adds its
    seconds, one call and its FLOPs to `totals[(name, input shapes)]`; restored on exit."""
    # Inductor imports each generated module into sys.modules (whether its caches are on or off), in the order it
    # compiles them, and its wrapper looks kernels and `extern_kernels` up among the module's globals at each call.
    modules = [module for module in list(sys.modules.values()) if _generated_kernels(module)]
    originals = []
    for number, module in enumerate(modules):
        for name, kernel in _generated_kernels(module):
            originals.append((module, name, kernel))
            setattr(module, name, _clocked(kernel, f"graph {number} {name}", totals))
        if hasattr(module, "extern_kernels"):
            originals.append((module, "extern_kernels", module.extern_kernels))
            module.extern_kernels = _ClockedProducts(module.extern_kernels, totals)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def _generated_kernels(module) -> list:
    """`(name, kernel)` of the C++ kernels inductor generated into `module` (none for other modules)."""
    return [(name, value) for name, value in vars(module).items() if name.startswith("cpp_fused") and callable(value)]


def _clocked(function, name: str, totals: dict, flops=None):
    def run(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        seconds = time.perf_counter() - start
        shapes = str([list(arg.shape) for arg in args if isinstance(arg, torch.Tensor)]) if flops else "[]"
        entry = totals[(name, shapes)]
        entry[0] += seconds
        entry[1] += 1
        entry[2] += flops(*args) if flops else 0
        return result

    return run


class _ClockedProducts:
    """A generated module's `extern_kernels` whose products are clocked (as `aten::<name>`, with their shapes)."""

    def __init__(self, externs, totals: dict):
        self._externs, self._totals = externs, totals

    def __getattr__(self, name: str):
        function = getattr(self._externs, name)
        if name not in EXTERN_PRODUCT_FLOPS:
            return function
        return _clocked(function, f"aten::{name}", self._totals, EXTERN_PRODUCT_FLOPS[name])


def operator_flops(event) -> float:
    """FLOPs of all calls of a profiled operator: the profiler's count, or for an in-place product the count from
    its operands' shapes."""
    if event.key not in IN_PLACE_PRODUCTS or event.flops:
        return event.flops
    return IN_PLACE_PRODUCTS[event.key](*event.input_shapes[:3]) * event.count


def format_profile(case: dict, rows, peak_flops_per_s: float, limit: int) -> str:
    total = sum(row[0] for row in rows)
    how = "clocked per call, without the profiler" if case.get("compile") else "operator self time under the profiler"
    lines = [
        f"{case['id']} ({case['dtype']}, cpu): {total:.2f} ms per step, {how}",
        "",
        "| ms / step | share | calls / step | GFLOP/s | operator | input shapes |",
        "|---|---|---|---|---|---|",
    ]
    for milliseconds, calls, flops, name, shapes in rows[:limit]:
        rate = f"{flops / milliseconds / 1e6:.1f}" if flops and kind_of(name) == "matrix products" else ""
        lines.append(
            f"| {milliseconds:.3f} | {milliseconds / total:.1%} | {calls:g} | {rate} | {name[:70]} | {shapes[:90]} |"
        )
    shares = defaultdict(lambda: [0.0, 0.0])
    for milliseconds, _, flops, name, _ in rows:
        shares[kind_of(name)][0] += milliseconds
        shares[kind_of(name)][1] += flops
    lines.append("")
    for kind in ("matrix products", "fused attention", "generated kernels", "everything else"):
        milliseconds, flops = shares[kind]
        line = f"- {kind}: {milliseconds:.2f} ms per step ({milliseconds / total:.1%})"
        if kind == "matrix products" and flops and milliseconds:
            rate = flops / (milliseconds / 1e3)
            line += f", {rate / 1e9:.1f} GFLOP/s = {rate / peak_flops_per_s:.1%} of the measured matmul peak"
        lines.append(line)
    lines.append(f"- measured matmul peak: {peak_flops_per_s / 1e9:.1f} GFLOP/s")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", help="a case id of the suite (python -m benchmarks --list)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps (after the case's warm-up runs)")
    parser.add_argument("--rows", type=int, default=20, help="operators listed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rows < 1:
        parser.error(f"--steps and --rows must be at least 1 (got --steps {args.steps}, --rows {args.rows})")
    if args.threads:
        torch.set_num_threads(args.threads)
    case = find_case(args.case, args.dtype)
    rows = profile_case(case, args.steps)
    peak = matmul_peak("cpu", dtype_of(case), sizes=(2048,))["flops_per_s"]
    print(format_profile(case, rows, peak, args.rows))


if __name__ == "__main__":
    main(sys.argv[1:])
