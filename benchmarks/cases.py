"""One benchmark case per process: `python -m benchmarks.cases '<json spec>'` prints `RESULT <json>` last.

Kinds of case (the spec's `kind`):

- `attention`: the stage-1 STGA or D-STGA attention of TiMo-Base (4 heads of 32 channels, `N = H/4 * W/4` tokens
  per frame), `TiMoAttention.attend`: from the query and key/value projections to the output projection's input,
  D-STGA's medians and offset branch included; `mode` `fwd` (no grad) or `fwdbwd` (forward and backward of a fixed
  random output gradient); optionally under `torch.compile`.
- `backbone`: the whole TiMo-Base `TiMoModel` (eval mode) on `pixel_values` of `shape`, `fwd` or `fwdbwd`, with
  its FLOPs counted by `timo_hf.flops.count_flops` on the same device for the same pass.
- `layout_memory`: one training step's forward and backward (train mode) of TiMo-Base with an attention layout.
- `matmul_peak`: the device's measured float32 matmul throughput.
"""

import json
import statistics
import sys

import torch

from timo_hf import TiMoConfig, TiMoModel
from timo_hf.flops import count_flops
from timo_hf.modeling_timo import TiMoAttention

from . import common
from .common import PeakMemory, TensorMemory, machine_info, matmul_peak, measure_memory, time_runs


STAGE1_WIDTH, STAGE1_HEADS = 128, 4


def stage1_tokens(shape) -> int:
    """Tokens per frame after TiMo's stride-4 stem (7x7/2 conv with padding 3, then 2x2/2 conv)."""
    height, width = shape[-2:]
    return (((height + 1) // 2) // 2) * (((width + 1) // 2) // 2)


def attention_step(attention: str, implementation: str, frames: int, device: str):
    """Stage 1's attention as TiMo-Base runs it (`TiMoAttention.attend`): from the query and packed key/value
    projections (`[B, T*N, C]` and `[B, T*N, 2C]`) to the output projection's input (`[B, T*N, C]`)."""
    config = TiMoConfig.from_preset("base", stga_implementation=implementation)
    module = TiMoAttention(config, STAGE1_WIDTH, STAGE1_HEADS, attention).to(device)

    def step(query_projection, key_value_projection):
        return module.attend(query_projection, key_value_projection, frames)

    return step, module


def run_attention(spec: dict) -> dict:
    device = spec["device"]
    batch, frames = spec["shape"][:2]
    tokens = stage1_tokens(spec["shape"])
    torch.manual_seed(0)
    step, module = attention_step(spec["attention"], spec["implementation"], frames, device)
    if spec.get("compile"):
        step = torch.compile(step, fullgraph=True)
    query_projection = torch.randn(batch, frames * tokens, STAGE1_WIDTH, device=device)
    key_value_projection = torch.randn(batch, frames * tokens, 2 * STAGE1_WIDTH, device=device)
    grad = torch.randn(batch, frames * tokens, STAGE1_WIDTH, device=device)
    if spec["mode"] == "fwd":
        module.eval()

        def run():
            with torch.no_grad():
                step(query_projection, key_value_projection)

    else:
        query_projection.requires_grad_(True)
        key_value_projection.requires_grad_(True)

        def run():
            step(query_projection, key_value_projection).backward(grad)
            query_projection.grad = key_value_projection.grad = None

    warmup = 2 if spec.get("compile") else 1
    times = time_runs(run, device, spec["repeats"], warmup=warmup, min_seconds=3.0)
    if spec.get("compile"):  # compiled code allocates outside the dispatcher: only the resident set is measured
        with PeakMemory(device) as resident:
            run()
        memory = {"peak_bytes": resident.peak_bytes, "peak_resident_bytes": resident.peak_bytes}
    else:
        memory = measure_memory(run, device)
    return {"times_s": times, "time_s": statistics.median(times), "tokens": tokens, **memory}


def base_model(spec: dict, train: bool) -> TiMoModel:
    config = TiMoConfig.from_preset(
        "base",
        num_channels=spec["shape"][2],
        attention_types=list(spec["layout"]),
        stga_implementation=spec["implementation"],
    )
    model = TiMoModel(config).to(spec["device"])
    return model.train(train)


def run_backbone(spec: dict) -> dict:
    device = spec["device"]
    torch.manual_seed(0)
    model = base_model(spec, train=False)
    pixel_values = torch.randn(*spec["shape"], device=device)
    backward = spec["mode"] == "fwdbwd"
    flops = count_flops(model, pixel_values, backward=backward)
    if not backward:

        def run():
            with torch.no_grad():
                model(pixel_values)

    else:

        def run():
            model(pixel_values).last_hidden_state.sum().backward()
            model.zero_grad(set_to_none=True)

    times = time_runs(run, device, spec["repeats"], min_seconds=5.0)
    counted = flops["total"] if backward else flops["forward"]
    return {
        "times_s": times,
        "time_s": statistics.median(times),
        **measure_memory(run, device),
        "flops": counted,
        "flops_forward": flops["forward"],
    }


def run_layout_memory(spec: dict) -> dict:
    device = spec["device"]
    torch.manual_seed(0)
    model = base_model(spec, train=True)
    pixel_values = torch.randn(*spec["shape"], device=device)

    def run():
        model(pixel_values).last_hidden_state.sum().backward()
        model.zero_grad(set_to_none=True)

    with PeakMemory(device) as resident:
        times = time_runs(run, device, spec.get("repeats", 1), warmup=0)
    with TensorMemory() as tensors:
        run()
    return {
        "times_s": times,
        "time_s": statistics.median(times),
        "peak_bytes": tensors.peak_bytes,
        "peak_resident_bytes": resident.peak_bytes,
    }


def run_matmul_peak(spec: dict) -> dict:
    return {"matmul_peak": matmul_peak(spec["device"]), "machine": machine_info(spec["device"])}


RUNNERS = {
    "attention": run_attention,
    "backbone": run_backbone,
    "layout_memory": run_layout_memory,
    "matmul_peak": run_matmul_peak,
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    common.CLOCK = common.CLOCKS[spec.get("clock", "wall")]
    result = RUNNERS[spec["kind"]](spec)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
