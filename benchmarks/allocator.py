"""What the process's memory settings cost a CPU step: `python -m benchmarks.allocator`.

    python -m benchmarks.allocator                     # the three T=30 D-STGA fwd+bwd attention cases, 3 rounds
    python -m benchmarks.allocator --only backbone/D-D-M-M/T30-48px/fwdbwd/fast --rounds 2 --settings default tuned

glibc's `malloc` gives the free memory at the top of its heap back to the system once more of it is free than its
trim threshold (which it raises by itself as large blocks come and go). A training step frees most of what it
allocated, so on this kind of VM the next step takes the same memory back page by page, each first touch a page
fault that zero-fills 4 KiB. The eager fast kernels avoid most of it where frames are small, with their own buffer
pool (`timo_hf.buffer_pool`); compiled code allocates its own buffers and the reference kernels use the heap. The
process can, with glibc's tunables (`tuned`): `MALLOC_TRIM_THRESHOLD_` and `MALLOC_TOP_PAD_` keep freed memory in
the heap (the resident set stays at the largest step's), `MALLOC_MMAP_THRESHOLD_` serves blocks below 32 MiB from
that heap. Or with PyTorch's own switch (`thp`): `THP_MEM_ALLOC_ENABLE=1` aligns tensors of 2 MiB and more to
2 MiB and asks the kernel for transparent huge pages there, one fault per 2 MiB instead of 512 (where the kernel's
transparent_hugepage setting is `madvise` or `always`).

This script runs suite cases (`python -m benchmarks --list` names them) with the harness of `python -m benchmarks`,
one fresh process per run, under each setting in turn (the order rotated round by round), and prints the medians
side by side with the minor page faults per step (attention cases), and the ratio of the compiled fast D-STGA step
to the reference eager one (issue #9's compiled target) under each setting where both ran. Nothing is written to
RESULTS.md: the suite measures with the defaults.
"""

import argparse
import os
import statistics
from pathlib import Path

from .__main__ import all_cases, run_case


TUNED_MALLOC = {
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_TOP_PAD_": str(64 << 20),
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
}
# Each setting's variables on top of the caller's environment, from which every variable named here is removed.
SETTINGS = {
    "default": {},
    "tuned": TUNED_MALLOC,
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
}
DEFAULT_CASES = [
    "attention/dstga/T30-48px/fwdbwd/reference",
    "attention/dstga/T30-48px/fwdbwd/fast",
    "attention/dstga/T30-48px/fwdbwd/fast+compile",
]
COMPILED_TARGET = ("attention/dstga/T30-48px/fwdbwd/reference", "attention/dstga/T30-48px/fwdbwd/fast+compile")


def environment(setting: str) -> dict:
    """This process's environment with the variables of every setting removed, then those of `setting` set."""
    managed = {name for variables in SETTINGS.values() for name in variables}
    env = {name: value for name, value in os.environ.items() if name not in managed}
    return {**env, **SETTINGS[setting]}


def describe(setting: str) -> str:
    """The variables `setting` sets, as a shell would."""
    return " ".join(f"{name}={value}" for name, value in SETTINGS[setting].items()) or "none of these variables"


def transparent_hugepages() -> str:
    """The kernel's transparent huge page mode (the bracketed word of its setting), on which `thp` depends."""
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return setting[setting.find("[") + 1 : setting.find("]")] if "[" in setting else setting.strip()


def measure(cases: list[dict], settings: list[str], rounds: int, timeout: int, idle_wait: float) -> dict:
    """`{case id: {setting: [result of each round]}}`; each round runs every case under every setting, the order
    rotated from round to round, so that drifts of the machine hit all alike."""
    results = {case["id"]: {setting: [] for setting in settings} for case in cases}
    for round_index in range(rounds):
        shift = round_index % len(settings)
        order = settings[shift:] + settings[:shift]
        for case in cases:
            for setting in order:
                result = run_case(case, timeout, idle_wait, env=environment(setting))
                if "error" in result:
                    raise SystemExit(f"{case['id']} ({setting} memory settings) failed: {result['error']}")
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
    """Per case, each setting's time, its speed-up over the first setting's and its page faults per step."""
    summaries = {case: {setting: summary(runs[setting]) for setting in runs} for case, runs in results.items()}
    settings = list(next(iter(summaries.values())))
    baseline, others = settings[0], settings[1:]
    lines = [
        "| case | " + " | ".join(
            [f"{setting} ms" for setting in settings] + [f"{setting} speed-up" for setting in others]
            + [f"{setting} faults / step" for setting in settings]
        ) + " |",
        "|---|" + "---|" * (2 * len(settings) + len(others)),
    ]
    for case, by_setting in summaries.items():
        cells = [f"{by_setting[setting]['ms']:.1f}" for setting in settings]
        cells += [f"{by_setting[baseline]['ms'] / by_setting[setting]['ms']:.2f}x" for setting in others]
        cells += [
            f"{by_setting[setting]['faults']:.0f}" if by_setting[setting]["faults"] is not None else "n/a"
            for setting in settings
        ]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    if all(case in summaries for case in COMPILED_TARGET):
        reference, compiled = (summaries[case] for case in COMPILED_TARGET)
        ratios = ", ".join(
            f"{setting} {reference[setting]['ms'] / compiled[setting]['ms']:.2f}x" for setting in settings
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
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="memory settings to compare, the first one the baseline of the speed-ups")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be at least 1")
    known = {case["id"]: case for case in all_cases("cpu", args.repeats)}
    unknown = [case_id for case_id in args.only if case_id not in known]
    if unknown:
        parser.error(f"unknown case ids {unknown}; python -m benchmarks --list names them")
    settings = list(dict.fromkeys(args.settings))
    results = measure([known[case_id] for case_id in args.only], settings, args.rounds, args.timeout, args.idle_wait)
    described = "; ".join(f"{setting}: {describe(setting)}" for setting in settings)
    print(f"{described}; transparent huge pages: {transparent_hugepages()}; "
          f"medians over {args.rounds} processes each\n")
    print(report(results))
    return results


if __name__ == "__main__":
    main()
