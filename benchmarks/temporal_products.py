"""Why the fast kernels pad the keys' and values' token copies on CPU (`attention_fast.key_frames`).

    python -m benchmarks.temporal_products                     # T = 6, 7, 14, 15, 22, 23, 30, 31 at stage 1 of 48 px
    python -m benchmarks.temporal_products --frames 30 --tokens 144 --heads 4 --repeats 200

The temporal part of STGA / D-STGA runs one small matrix product per token and head. Two of them write a `T x T`
block per token: the temporal logits `q k^T` (forward) and their gradient's `grad v^T` (backward). With the keys and
values padded by zero frames to `key_frames(T)` frames, those blocks are `T x key_frames(T)` wide instead. This
script times both products both ways, alternately in one process, and prints the medians and their ratios (above 1:
padding pays). Frame counts that `key_frames` leaves alone (pass them with `--frames`; the default list holds only
padded ones) are timed padded to the next multiple of `FRAME_ALIGNMENT`, to show what padding them would gain.
"""

import argparse
import statistics

import torch

from timo_hf.attention_fast import FRAME_ALIGNMENT, key_frames

from .common import alternate_runs, machine_info


def product_times(frames: int, padded: int, batch: int, head_dim: int, repeats: int) -> dict:
    """Median milliseconds of `[batch, T, d] x [batch, d, K]` (with K = T and K = padded), the keys transposed views
    as in the kernels, results written into preallocated outputs."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(batch, frames, head_dim, generator=generator)
    keys = torch.randn(batch, padded, head_dim, generator=generator)
    outputs = {width: torch.empty(batch, frames, width) for width in (frames, padded)}

    def product(width):
        return lambda: torch.bmm(rows, keys[:, :width].transpose(1, 2), out=outputs[width])

    times = alternate_runs({"unpadded_ms": product(frames), "padded_ms": product(padded)}, repeats)
    return {name: statistics.median(seconds) * 1e3 for name, seconds in times.items()}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[6, 7, 14, 15, 22, 23, 30, 31])
    parser.add_argument("--tokens", type=int, default=144, help="tokens per frame (stage 1 of 48 px: 144)")
    parser.add_argument("--heads", type=int, default=4, help="heads x batch (TiMo-Base stage 1: 4)")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args(argv)
    if min(*args.frames, args.tokens, args.heads, args.head_dim, args.repeats) < 1:
        parser.error("--frames, --tokens, --heads, --head-dim and --repeats must be at least 1")
    machine = machine_info("cpu")
    print(f"{machine.get('cpu', 'CPU')}, {machine['torch_threads']} threads, torch {machine['torch']}")
    print(f"per-token products [{args.heads * args.tokens}, T, {args.head_dim}] x [{args.head_dim}, K], "
          f"median of {args.repeats} alternate runs\n")
    print("| T | K padded | padded by key_frames | T x T ms | T x K ms | speed-up |")
    print("|---|---|---|---|---|---|")
    rows = []
    for frames in args.frames:
        padded = -(-frames // FRAME_ALIGNMENT) * FRAME_ALIGNMENT
        chosen = key_frames(frames, torch.device("cpu")) == padded != frames
        times = product_times(frames, padded, args.heads * args.tokens, args.head_dim, args.repeats)
        rows.append({"frames": frames, "padded_frames": padded, "chosen": chosen, **times})
        print(f"| {frames} | {padded} | {'yes' if chosen else 'no'} | {times['unpadded_ms']:.3f} | "
              f"{times['padded_ms']:.3f} | {times['unpadded_ms'] / times['padded_ms']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
