"""Masked-image-modelling pre-training step vs a full-image step, and pre-training throughput.

    python -m benchmarks.mim_step                          # TiMo-Base, [T=3, 3 x 224 x 224], this machine
    python -m benchmarks.mim_step --preset base --batch-size 4 --repeats 5 --output mim_step.json
    python -m benchmarks.mim_step --repeats 5 --markdown benchmarks/MIM_STEP.md   # the committed results

1. Ratio (batch 1): one `TiMoForMaskedImageModeling` forward + backward at mask ratio 0.75 (sparse all-MHSA
   encoder over the visible units, then the decoder) against one forward + backward of the same all-MHSA encoder
   (`TiMoModel`, every stage MHSA) on the full image, same input. Both are timed in this process, alternately,
   `--repeats` times after one warm-up each; the best and the median times, their ratios and the median of the
   paired ratios are printed (on a shared machine the best runs are the least disturbed), with the counted FLOPs
   (`timo_hf.flops.count_flops`).
2. Throughput: a full pre-training step (forward, backward, AdamW step) at `--batch-size`, in samples/s, and the
   achieved FLOP/s (best run) as a fraction of this machine's measured float32 matmul peak
   (`benchmarks.common.matmul_peak`).
"""

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

from timo_hf import TiMoConfig, TiMoForMaskedImageModeling, TiMoModel
from timo_hf.flops import count_flops

from .common import alternate_runs, load_average, machine_info, matmul_peak


def write_markdown(path: str, lines: list[str], results: dict, argv) -> None:
    """The printed results as a Markdown page with the command line and the machine."""
    command = " ".join(["python -m benchmarks.mim_step", *(sys.argv[1:] if argv is None else argv)])
    machine = "\n".join(f"- {key}: {value}" for key, value in results["machine"].items())
    Path(path).write_text(
        f"# Masked-image-modelling step vs full-image step\n\nWritten by `{command}` on "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; every number comes from that run.\n\n"
        f"## Machine\n\n{machine}\n\n## Results\n\n```\n" + "\n".join(lines) + "\n```\n"
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None, help="also write the results as JSON to this path")
    parser.add_argument("--markdown", default=None, help="also write the printed results as Markdown to this path")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    config = TiMoConfig.from_preset(args.preset, num_channels=args.channels)
    mim = TiMoForMaskedImageModeling(config).train()
    full = TiMoModel(TiMoConfig.from_preset(args.preset, num_channels=args.channels, attention_types=["mhsa"] * 4))
    full.train()
    shape = (1, args.frames, args.channels, args.size, args.size)
    pixel_values = torch.randn(shape)
    num_units = args.frames * (args.size // config.mask_unit_size) ** 2
    noise = torch.rand(1, num_units)

    def mim_step():
        mim(pixel_values, noise=noise).loss.backward()
        mim.zero_grad(set_to_none=True)

    def full_step():
        full(pixel_values).last_hidden_state.float().square().mean().backward()
        full.zero_grad(set_to_none=True)

    times = alternate_runs({"mim": mim_step, "full": full_step}, args.repeats)
    medians = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    pair_ratio = statistics.median(m / f for m, f in zip(times["mim"], times["full"]))
    flops_mim = count_flops(mim, pixel_values, backward=True, noise=noise)["total"]
    flops_full = count_flops(full, pixel_values, backward=True)["total"]
    mim.zero_grad(set_to_none=True)
    full.zero_grad(set_to_none=True)

    batch = torch.randn(args.batch_size, *shape[1:])
    batch_noise = torch.rand(args.batch_size, num_units)
    optimizer = torch.optim.AdamW(mim.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)

    def train_step():
        mim(batch, noise=batch_noise).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_seconds = min(alternate_runs({"train": train_step}, args.repeats)["train"])
    step_flops = count_flops(mim, batch, backward=True, noise=batch_noise)["total"]
    peak = matmul_peak("cpu")
    achieved = step_flops / step_seconds
    results = {
        "machine": machine_info("cpu"),
        "load_average": load_average(),
        "preset": args.preset,
        "input": list(shape),
        "mask_ratio": config.mask_ratio,
        "mim_fwd_bwd_s": times["mim"],
        "full_fwd_bwd_s": times["full"],
        "time_ratio_of_best": best["mim"] / best["full"],
        "time_ratio_of_medians": medians["mim"] / medians["full"],
        "median_of_paired_ratios": pair_ratio,
        "mim_fwd_bwd_gflops": flops_mim / 1e9,
        "full_fwd_bwd_gflops": flops_full / 1e9,
        "flop_ratio": flops_mim / flops_full,
        "train_batch_size": args.batch_size,
        "train_step_s": step_seconds,
        "samples_per_s": args.batch_size / step_seconds,
        "train_step_gflops": step_flops / 1e9,
        "achieved_gflops_per_s": achieved / 1e9,
        "matmul_peak_gflops_per_s": peak["flops_per_s"] / 1e9,
        "fraction_of_matmul_peak": achieved / peak["flops_per_s"],
    }
    lines = [
        f"TiMo-{args.preset} {list(shape)}, mask ratio {config.mask_ratio}, {torch.get_num_threads()} threads, "
        f"load {results['load_average']}",
        "                                  best s  median s      GFLOP",
        f"  MIM step (fwd+bwd):             {best['mim']:8.3f}  {medians['mim']:8.3f}  {flops_mim / 1e9:9.1f}",
        f"  full-image all-MHSA (fwd+bwd):  {best['full']:8.3f}  {medians['full']:8.3f}  {flops_full / 1e9:9.1f}",
        f"  ratio MIM / full:               {results['time_ratio_of_best']:8.3f}  "
        f"{results['time_ratio_of_medians']:8.3f}  {results['flop_ratio']:9.3f}   "
        f"(median of paired ratios {pair_ratio:.3f})",
        f"  pre-training step, batch {args.batch_size}:    {step_seconds:8.3f} s  = "
        f"{results['samples_per_s']:.3f} samples/s",
        f"  achieved {results['achieved_gflops_per_s']:.1f} GFLOP/s of a measured matmul peak "
        f"{results['matmul_peak_gflops_per_s']:.1f} GFLOP/s = {results['fraction_of_matmul_peak']:.1%}",
    ]
    print("\n".join(lines))
    if args.markdown:
        write_markdown(args.markdown, lines, results, argv)
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
