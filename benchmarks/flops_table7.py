"""Paper Table 7: forward GFLOPs of the TiMo-Base backbone for the six attention layouts.

    python -m benchmarks.flops_table7 [--preset base] [--shape 1 3 3 256 256] [--stga-implementation reference]

Counted with `timo_hf.flops.count_flops` (FlopCounterMode, 2 FLOPs per multiply-add, backbone only, attention
counted explicitly) on the meta device, beside the official code's count and the paper's column (which is twice the
official count: it corresponds to batch 2).
"""

import argparse

from timo_hf.flops import TABLE7_GFLOPS, TABLE7_INPUT_SHAPE, table7


def format_table7(rows: list[dict]) -> str:
    lines = [
        "| layout | counted GFLOPs | attention GFLOPs | official GFLOPs | diff | paper Table 7 (= 2 x, batch 2) | 2 x counted |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        official, paper = row["official_gflops"], row["paper_gflops"]
        diff = f"{100 * (row['gflops'] / official - 1):+.3f}%" if official else "-"
        lines.append(
            f"| {row['layout']} | {row['gflops']:.2f} | {row['attention_gflops']:.2f} | "
            f"{official if official else '-'} | {diff} | {paper if paper else '-'} | {2 * row['gflops']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--shape", type=int, nargs=5, default=list(TABLE7_INPUT_SHAPE), metavar=("B", "T", "C", "H", "W"))
    parser.add_argument("--stga-implementation", default="reference", choices=["reference", "fast"])
    args = parser.parse_args(argv)
    rows = table7(args.preset, tuple(args.shape), args.stga_implementation, tuple(TABLE7_GFLOPS))
    print(f"TiMo-{args.preset} backbone forward FLOPs at {args.shape} ({args.stga_implementation} kernels)")
    print(format_table7(rows))
    return rows


if __name__ == "__main__":
    main()
