"""What glibc's heap trimming costs a CPU step: `python -m benchmarks.allocator`.

    python -m benchmarks.allocator                     # the three T=30 D-STGA fwd+bwd attention cases, 3 rounds
    python -m benchmarks.allocator --only backbone/D-D-M-M/T30-48px/fwdbwd/fast --rounds 2

glibc's `malloc` gives the free memory at the top of its heap back to the system once more of it is free than its
trim threshold (which it raises by itself as large blocks come and go). A training step frees most of what it
allocated, so on this kind of VM the next step takes the same memory back page by page, each first touch a page
fault that zero-fills 4 KiB. The eager fast kernels avoid most of it where frames are small, with their own buffer
pool (`timo_hf.buffer_pool`); compiled code allocates its own buffers and the reference kernels use the heap. The
process can, with glibc's tunables: `MALLOC_TRIM_THRESHOLD_` and `MALLOC_TOP_PAD_` keep freed memory in the heap (the
resident set stays at the largest step's), `MALLOC_MMAP_THRESHOLD_` serves blocks below 32 MiB from that heap.

This script runs suite cases (`python -m benchmarks --list` names them) with the harness of `python -m benchmarks`,
one fresh process per run, alternately with glibc's defaults and with those settings (`TUNED_MALLOC`), and prints
the medians side by side with the minor page faults per step (attention cases), and the ratio of the compiled fast
D-STGA step to the reference eager one (issue #9's compiled target) under each setting where both ran. Nothing is
written to RESULTS.md: the suite measures with the defaults.
"""

import argparse
import os
import statistics

from .__main__ import all_cases, run_case


TUNED_MALLOC = {
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_TOP_PAD_": str(64 << 20),
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
}
SETTINGS = ("default", "tuned")
DEFAULT_CASES = [
    "attention/dstga/T30-48px/fwdbwd/reference",
    "attention/dstga/T30-48px/fwdbwd/fast",
    "attention/dstga/T30-48px/fwdbwd/fast+compile",
]
COMPILED_TARGET = ("attention/dstga/T30-48px/fwdbwd/reference", "attention/dstga/T30-48px/fwdbwd/fast+compile")


def environment(setting: str) -> dict:
    """This process's environment with glibc's malloc tunables removed (`default`) or set (`tuned`)."""
    env = {name: value for name, value in os.environ.items() if name not in TUNED_MALLOC}
    return {**env, **TUNED_MALLOC} if setting == "tuned" else env


def measure(cases: list[dict], rounds: int, timeout: int, idle_wait: float) -> dict:
    """`{case id: {setting: [result of each round]}}`; each round runs every case under both settings, in
    alternating order, so that drifts of the machine hit both alike."""
    results = {case["id"]: {setting: [] for setting in SETTINGS} for case in cases}
    for round_index in range(rounds):
        order = SETTINGS if round_index % 2 == 0 else SETTINGS[::-1]
        for case in cases:
            for setting in order:
                result = run_case(case, timeout, idle_wait, env=environment(setting))
                if "error" in result:
                    raise SystemExit(f"{case['id']} ({setting} malloc) failed: {result['error']}")
                results[case["id"]][setting].append(result)
    return results


def summary(runs: list[dict]) -> dict:
    """Median over the rounds of each process's median step time (ms) and of its page faults per step."""
    faults = [run["minor_faults_per_run"] for run in runs if "minor_faults_per_run" in run]
    return {
        "ms": statistics.median(run["time_s"] for run in runs) * 1e3,
        "faults": statistics.median(faults) if faults else None,
    }


def report(results: dict) -> str:
    lines = [
        "| case | default ms | tuned ms | speed-up | default faults / step | tuned faults / step |",
        "|---|---|---|---|---|---|",
    ]
    summaries = {case: {setting: summary(runs[setting]) for setting in SETTINGS} for case, runs in results.items()}
    for case, by_setting in summaries.items():
        default, tuned = by_setting["default"], by_setting["tuned"]
        faults = [f"{entry['faults']:.0f}" if entry["faults"] is not None else "n/a" for entry in (default, tuned)]
        lines.append(
            f"| {case} | {default['ms']:.1f} | {tuned['ms']:.1f} | {default['ms'] / tuned['ms']:.2f}x | "
            f"{faults[0]} | {faults[1]} |"
        )
    if all(case in summaries for case in COMPILED_TARGET):
        reference, compiled = (summaries[case] for case in COMPILED_TARGET)
        ratios = ", ".join(
            f"{setting} {reference[setting]['ms'] / compiled[setting]['ms']:.2f}x" for setting in SETTINGS
        )
        lines.append(f"\nD-STGA T=30 48px fwd+bwd, fast compiled vs reference eager: {ratios}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=DEFAULT_CASES, help="case ids (exact)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per case and setting")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per process")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per process")
    parser.add_argument("--idle-wait", type=float, default=60.0, help="longest wait for an idle machine per process")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be at least 1")
    known = {case["id"]: case for case in all_cases("cpu", args.repeats)}
    unknown = [case_id for case_id in args.only if case_id not in known]
    if unknown:
        parser.error(f"unknown case ids {unknown}; python -m benchmarks --list names them")
    results = measure([known[case_id] for case_id in args.only], args.rounds, args.timeout, args.idle_wait)
    print(f"glibc malloc: defaults vs {' '.join(f'{name}={value}' for name, value in TUNED_MALLOC.items())}; "
          f"medians over {args.rounds} processes each\n")
    print(report(results))
    return results


if __name__ == "__main__":
    main()
