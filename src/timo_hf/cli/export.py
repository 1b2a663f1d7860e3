"""`timo export`: a TiMo model folder -> ONNX and/or `torch.export` program, checked against PyTorch."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..inference.exporting import (
    FORMATS, example_inputs, export_onnx, export_program, output_name, parity, reference_output, run_onnx,
    run_program,
)
from ..inference.loading import PROCESSOR_FILE, load_any_model
from ._common import at_least, input_size, optional_processor, reports_errors


FILES = {"onnx": "model.onnx", "torch-export": "model.pt2"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="export a TiMo model to ONNX and/or torch.export with a parity check",
        description="Export a TiMo model folder (segmentation, classification or bare encoder) as an ONNX graph "
        "(run with onnxruntime) and/or a torch.export program (.pt2), for a fixed number of dates, bands and tile "
        "size, and check that each reproduces the PyTorch outputs on fresh random inputs. The output folder also "
        "gets config.json, the image processor and export.json (inputs, outputs, parity).",
    )
    parser.add_argument("--model", required=True, help="model folder (save_pretrained) or Hub id")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS),
                        help="what to write (default: both)")
    parser.add_argument("--frames", type=at_least(1), default=3, help="dates T of the exported input (default: 3)")
    parser.add_argument("--height", type=at_least(1),
                        help="input height, a multiple of 32 (default: processor size, else 224)")
    parser.add_argument("--width", type=at_least(1), help="input width (default: the height)")
    parser.add_argument("--batch-size", type=at_least(1), default=1, help="batch of the example input (default: 1)")
    parser.add_argument("--dynamic-batch", action="store_true", help="let the batch dimension vary")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    parser.add_argument("--atol", type=float, default=1e-4, help="parity tolerance: atol + rtol * max|output|")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--no-check", action="store_true", help="skip the parity check")
    parser.add_argument("--overwrite", action="store_true", help="replace existing exports in --out")
    return parser


@reports_errors
def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    existing = [out / FILES[fmt] for fmt in args.format if (out / FILES[fmt]).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{', '.join(map(str, existing))} exist; pass --overwrite to replace them")
    model = load_any_model(args.model)
    processor = optional_processor(args.model)
    height, width = input_size(processor, args.height, args.width)
    if height % 32 or width % 32:
        raise ValueError(f"--height and --width must be multiples of 32, got {height}x{width}")
    out.mkdir(parents=True, exist_ok=True)
    # A dynamic batch is traced at 2 or more (torch.export specialises a size of 1) and checked at another size.
    trace_batch = max(2, args.batch_size) if args.dynamic_batch else args.batch_size
    inputs = example_inputs(model.config, trace_batch, args.frames, height, width, seed=0)
    check_batch = trace_batch + 1 if args.dynamic_batch else args.batch_size
    check_inputs = example_inputs(model.config, check_batch, args.frames, height, width, seed=1)
    expected = None if args.no_check else reference_output(model, check_inputs)
    report = {
        "model": str(args.model), "architecture": type(model).__name__,
        "inputs": {"pixel_values": ["batch" if args.dynamic_batch else args.batch_size, args.frames,
                                    model.config.num_channels, height, width],
                   "temporal_positions": ["batch" if args.dynamic_batch else args.batch_size, args.frames]},
        "output": output_name(model), "files": {}, "parity": {},
    }
    exporters = {"onnx": (lambda p: export_onnx(model, p, inputs, args.opset, args.dynamic_batch), run_onnx),
                 "torch-export": (lambda p: export_program(model, p, inputs, args.dynamic_batch), run_program)}
    failed = []
    for fmt in args.format:
        write, execute = exporters[fmt]
        target = out / FILES[fmt]
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial{target.suffix}")
        print(f"timo export: writing {fmt} ...", flush=True)
        try:
            write(partial)
            if expected is not None:
                result = parity(expected, execute(partial, check_inputs), args.atol, args.rtol)
                report["parity"][fmt] = result
                print(f"  parity vs PyTorch: max |diff| {result['max_abs_diff']:.3g} "
                      f"(tolerance {result['tolerance']:.3g}) {'ok' if result['ok'] else 'FAILED'}")
                if not result["ok"]:
                    failed.append(fmt)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        report["files"][fmt] = str(target)
        print(f"  {target}")
    model.config.to_json_file(out / "config.json")
    if processor is not None:
        processor.to_json_file(out / PROCESSOR_FILE)
    (out / "export.json").write_text(json.dumps(report, indent=2))
    if failed:
        print(f"timo export: error: parity check failed for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
