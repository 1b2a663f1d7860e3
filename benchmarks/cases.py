"""One benchmark case per process: `python -m benchmarks.cases '<json spec>'` prints `RESULT <json>` last.

Kinds of case (the spec's `kind`):

- `attention`: the stage-1 STGA or D-STGA attention of TiMo-Base (4 heads of 32 channels, `N = H/4 * W/4` tokens
  per frame), `TiMoAttention.attend`: from the query and key/value projections to the output projection's input,
  D-STGA's medians and offset branch included; `mode` `fwd` (no grad) or `fwdbwd` (forward and backward of a fixed
  random output gradient); optionally under `torch.compile`. Its FLOPs are the matrix products the step runs,
  counted by FlopCounterMode (with `timo_hf.flops.flop_formulas`) on one more eager step.
- `backbone`: the whole TiMo-Base `TiMoModel` (eval mode) on `pixel_values` of `shape`, `fwd` or `fwdbwd`, with
  its FLOPs counted by `timo_hf.flops.count_flops` on the same device for the same pass.
- `layout_memory`: one training step's forward and backward (train mode) of TiMo-Base with an attention layout.
- `finetune_step`: one fine-tuning step of `TiMoForSemanticSegmentation` (TiMo-Base + UperNet, per-frame output,
  AdamW) at the paper's MultiEarth setting; its peak memory counts the weights, gradients and optimizer state too.
- `matmul_peak`: the device's measured matmul throughput in the case's dtype.

Every case takes `dtype` (`float32`, or `bfloat16`: the model code runs under autocast, the attention cases get
bfloat16 projections as autocast's linear layers hand them over; on CUDA MHSA is then held to SDPA's flash kernel)
and `compile` (attention cases: the step compiled, fullgraph; backbone and fine-tuning cases: every TiMo block
compiled, fullgraph).
"""

import contextlib
import json
import statistics
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from timo_hf import TiMoConfig, TiMoForSemanticSegmentation, TiMoModel
from timo_hf.flops import count_flops, flop_formulas
from timo_hf.modeling_timo import TiMoAttention, TiMoLayer

from . import common
from .common import (
    PeakMemory,
    TensorMemory,
    machine_info,
    matmul_peak,
    measure_memory,
    time_and_count_runs,
    time_runs,
)


STAGE1_WIDTH, STAGE1_HEADS = 128, 4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_of(spec: dict) -> torch.dtype:
    return DTYPES[spec.get("dtype", "float32")]


def precision(spec: dict):
    """Autocast to the case's dtype around the forward pass (a no-op for float32)."""
    dtype = dtype_of(spec)
    return torch.autocast(torch.device(spec["device"]).type, dtype=dtype, enabled=dtype != torch.float32)


def attention_kernels(spec: dict):
    """On CUDA in bfloat16, SDPA limited to the flash kernel, so that a silent fallback to another kernel fails the
    case instead. Held for the whole case: activation checkpointing recomputes the forward during backward, and a
    recomputation that picked another SDPA kernel would save tensors of other shapes."""
    if torch.device(spec["device"]).type == "cuda" and dtype_of(spec) != torch.float32:
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return contextlib.nullcontext()


def min_seconds(spec: dict, on_cpu: float) -> float:
    """Least total time of the timed runs: CPU timings need seconds to settle, synchronised GPU timings do not."""
    return on_cpu if torch.device(spec["device"]).type == "cpu" else 0.5


def compile_blocks(model: torch.nn.Module) -> None:
    """Compile every TiMo block in place (one graph each; blocks of the same shape share the compiled code)."""
    for module in model.modules():
        if isinstance(module, TiMoLayer):
            # Static shapes: each stage's blocks get their own graph (a dynamic-shape graph for all stages hits an
            # inductor assertion on CUDA in torch 2.11).
            module.compile(fullgraph=True, dynamic=False)


def case_memory(run, spec: dict) -> dict:
    """`measure_memory`, except for compiled code, which allocates outside the dispatcher (and is not traced under
    a dispatch mode): there only the resident set / CUDA allocator peak is measured."""
    if not spec.get("compile"):
        return measure_memory(run, spec["device"])
    with PeakMemory(spec["device"]) as resident:
        run()
    memory = {"peak_resident_bytes": resident.peak_bytes}
    # On CUDA that is the allocator's peak during the step; on CPU it is how much the resident set grew, which
    # depends on what the heap kept from earlier runs more than on the step: not a peak.
    if torch.device(spec["device"]).type != "cpu":
        memory["peak_bytes"] = resident.peak_bytes
    return memory


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


def warmup_runs(spec: dict) -> int:
    """Untimed runs before the timed ones: two under torch.compile (the first one compiles), else one."""
    return 2 if spec.get("compile") else 1


def prepare_attention(spec: dict):
    """The callable that runs one step of an attention case (not yet run)."""
    device = spec["device"]
    batch, frames = spec["shape"][:2]
    tokens = stage1_tokens(spec["shape"])
    torch.manual_seed(0)
    step, module = attention_step(spec["attention"], spec["implementation"], frames, device)
    if spec.get("compile"):
        step = torch.compile(step, fullgraph=True)
    dtype = dtype_of(spec)
    query_projection = torch.randn(batch, frames * tokens, STAGE1_WIDTH, device=device, dtype=dtype)
    key_value_projection = torch.randn(batch, frames * tokens, 2 * STAGE1_WIDTH, device=device, dtype=dtype)
    grad = torch.randn(batch, frames * tokens, STAGE1_WIDTH, device=device, dtype=dtype)
    if spec["mode"] == "fwd":
        module.eval()

        def run():
            with torch.no_grad(), precision(spec):
                step(query_projection, key_value_projection)

    else:
        query_projection.requires_grad_(True)
        key_value_projection.requires_grad_(True)

        def run():
            with precision(spec):
                output = step(query_projection, key_value_projection)
            output.backward(grad)
            query_projection.grad = key_value_projection.grad = None

    return run


def run_attention(spec: dict) -> dict:
    run = prepare_attention(spec)
    times, faults = time_and_count_runs(run, spec["device"], spec["repeats"], warmup_runs(spec), min_seconds(spec, 3.0))
    tokens = stage1_tokens(spec["shape"])
    result = {"times_s": times, "time_s": statistics.median(times), "tokens": tokens}
    if spec["device"] == "cpu":
        result["minor_faults"] = faults
        result["minor_faults_per_run"] = statistics.mean(faults)
    # Compiled code does not run under a dispatch mode: counted on the eager step, which runs the same large products.
    eager_run = prepare_attention({**spec, "compile": False}) if spec.get("compile") else run
    return {**result, **case_memory(run, spec), "flops": counted_flops(eager_run)}


def counted_flops(run) -> int:
    """FLOPs of the matrix products of one call of `run` (an eager step)."""
    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        run()
    return counter.get_total_flops()


def base_model(spec: dict, train: bool) -> TiMoModel:
    config = TiMoConfig.from_preset(
        "base",
        num_channels=spec["shape"][2],
        attention_types=list(spec["layout"]),
        stga_implementation=spec["implementation"],
    )
    return TiMoModel(config).to(spec["device"]).train(train)


def backbone_inputs(spec: dict) -> tuple[TiMoModel, torch.Tensor]:
    torch.manual_seed(0)
    return base_model(spec, train=False), torch.randn(*spec["shape"], device=spec["device"])


def backbone_run(spec: dict, model: TiMoModel, pixel_values: torch.Tensor):
    """The callable that runs one step of a backbone case (compiling the blocks first where the case says so)."""
    if spec.get("compile"):
        compile_blocks(model)
    if spec["mode"] == "fwd":

        def run():
            with torch.no_grad(), precision(spec):
                model(pixel_values)

    else:

        def run():
            with precision(spec):
                output = model(pixel_values).last_hidden_state
            output.float().sum().backward()
            model.zero_grad(set_to_none=True)

    return run


def prepare_backbone(spec: dict):
    return backbone_run(spec, *backbone_inputs(spec))


def run_backbone(spec: dict) -> dict:
    model, pixel_values = backbone_inputs(spec)
    backward = spec["mode"] == "fwdbwd"
    with precision(spec):
        flops = count_flops(model, pixel_values, backward=backward)
    # Compiled after counting: compiled blocks do not run under the counter's dispatch mode.
    run = backbone_run(spec, model, pixel_values)
    times = time_runs(run, spec["device"], spec["repeats"], warmup_runs(spec), min_seconds(spec, 5.0))
    counted = flops["total"] if backward else flops["forward"]
    return {
        "times_s": times,
        "time_s": statistics.median(times),
        **case_memory(run, spec),
        "flops": counted,
        "flops_forward": flops["forward"],
    }


def run_layout_memory(spec: dict) -> dict:
    device = spec["device"]
    torch.manual_seed(0)
    model = base_model(spec, train=True)
    pixel_values = torch.randn(*spec["shape"], device=device)
    run = backbone_run({**spec, "mode": "fwdbwd"}, model, pixel_values)
    with PeakMemory(device) as resident:
        times = time_runs(run, device, spec.get("repeats", 1), warmup=0)
    with TensorMemory() as tensors:
        run()
    # The weights and buffers count too: a training step holds them beside what it creates (their gradients).
    state_bytes = sum(tensor.nbytes for tensor in (*model.parameters(), *model.buffers()))
    return {
        "times_s": times,
        "time_s": statistics.median(times),
        "peak_bytes": tensors.peak_bytes + state_bytes,
        "peak_resident_bytes": resident.peak_bytes,
    }


def state_bytes(*tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def run_finetune_step(spec: dict) -> dict:
    """Forward with labels, backward, AdamW step (lr and weight decay of the official fine-tuning script) of
    TiMo-Base + UperNet with per-frame output, optionally with activation checkpointing of the blocks. Peaks are of
    a steady-state step (after one warm-up step created the optimizer state): `peak_total_bytes` is everything alive
    at the step's peak (weights, gradients, AdamW state, activations); on CUDA it is the caching allocator's peak of
    allocated memory (`peak_reserved_bytes`: what the allocator held from the driver), elsewhere the state plus the
    peak of the tensors the step created."""
    device = spec["device"]
    torch.manual_seed(0)
    batch, frames, channels, height, width = spec["shape"]
    config = TiMoConfig.from_preset(
        "base",
        num_channels=channels,
        attention_types=list(spec["layout"]),
        stga_implementation=spec["implementation"],
        num_labels=spec["num_labels"],
        temporal_fusion="none",
    )
    model = TiMoForSemanticSegmentation(config).to(device).train()
    if spec.get("checkpointing"):
        model.activation_checkpointing_enable()
    if spec.get("compile"):
        compile_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    pixel_values = torch.randn(*spec["shape"], device=device)
    labels = torch.randint(0, spec["num_labels"], (batch, frames, height, width), device=device)

    def run():
        with precision(spec):
            loss = model(pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = time_runs(run, device, spec["repeats"], warmup_runs(spec), min_seconds(spec, 0.0))
    state = state_bytes(*model.parameters(), *(t for s in optimizer.state.values() for t in s.values()))
    memory = {"state_bytes": state, "parameters": sum(p.numel() for p in model.parameters())}
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        memory.update(
            peak_total_bytes=torch.cuda.max_memory_allocated(),
            peak_reserved_bytes=torch.cuda.max_memory_reserved(),
            peak_bytes=torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated(),
        )
    else:
        step_peak = case_memory(run, spec)["peak_bytes"]
        memory.update(peak_total_bytes=state + step_peak, peak_bytes=step_peak)
    return {"times_s": times, "time_s": statistics.median(times), **memory}


def run_matmul_peak(spec: dict) -> dict:
    sizes = (2048, 4096) if torch.device(spec["device"]).type == "cpu" else (4096, 8192)
    return {
        "matmul_peak": matmul_peak(spec["device"], dtype_of(spec), sizes),
        "machine": machine_info(spec["device"]),
    }


# The cases that `python -m benchmarks.profile` can profile: kind -> callable that builds one step of the case.
PREPARERS = {
    "attention": prepare_attention,
    "backbone": prepare_backbone,
}

RUNNERS = {
    "attention": run_attention,
    "backbone": run_backbone,
    "layout_memory": run_layout_memory,
    "finetune_step": run_finetune_step,
    "matmul_peak": run_matmul_peak,
}


def run_spec(spec: dict) -> dict:
    """Run one case in this process."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    common.CLOCK = common.CLOCKS[spec.get("clock", "wall")]
    with attention_kernels(spec):
        return RUNNERS[spec["kind"]](spec)


def main() -> None:
    result = run_spec(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
