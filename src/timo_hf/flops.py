"""FLOP counting for TiMo models (2 FLOPs per multiply-add, matrix products and convolutions only).

`torch.utils.flop_counter.FlopCounterMode` counts matrix products and convolutions, but it misses two kinds:
`scaled_dot_product_attention` on CPU (the kernel `_scaled_dot_product_flash_attention_for_cpu` has no registered
formula, so MHSA would count 0) and in-place products (`baddbmm_`, `addmm_`: the fast spatial backward accumulates
the queries' gradient over its blocks with them). `count_flops` registers formulas for those (`flop_formulas`), so
they are counted whatever the device. Softmax, GELU, normalisation, medians and element-wise ops are not counted
(as in the paper's and the official measurements); neither are the products over at most 4 frames that the fast
STGA kernels unroll into element-wise operations (a few percent of an STGA layer's count at most).
"""

import contextlib

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, bmm_flop, mm_flop, sdpa_backward_flop_count, sdpa_flop_count


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _in_place_bmm_flops(self_shape, left_shape, right_shape, *args, **kwargs) -> int:
    return bmm_flop(left_shape, right_shape)


def _in_place_mm_flops(self_shape, left_shape, right_shape, *args, **kwargs) -> int:
    return mm_flop(left_shape, right_shape)


# FLOPs of the in-place products from their operands' shapes `(self, left, right)`, by aten name: they cost what their
# out-of-place forms do, which FlopCounterMode and the profiler count, and these they do not.
IN_PLACE_PRODUCT_FLOPS = {"baddbmm_": _in_place_bmm_flops, "addmm_": _in_place_mm_flops}


def flop_formulas() -> dict:
    """`custom_mapping` for `FlopCounterMode` covering the products it does not know: CPU SDPA and the in-place
    products."""
    aten = torch.ops.aten
    mapping = {getattr(aten, name): formula for name, formula in IN_PLACE_PRODUCT_FLOPS.items()}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_attention_backward_flops
    return mapping


def _module_flops(counts: dict, root_name: str, module_name: str) -> int:
    key = f"{root_name}.{module_name}" if module_name else root_name
    return sum(counts.get(key, {}).values())


def count_flops(
    model: nn.Module, pixel_values: torch.Tensor, backward: bool = False, on_meta: bool = False, **inputs
) -> dict:
    """FLOPs of one forward (and optionally backward) pass of `model` on `pixel_values`.

    Args:
        model: a TiMo model (`TiMoModel`, `TiMoBackbone`, a task model) or any module called as
            `model(pixel_values, **inputs)`. It runs in eval mode (restored afterwards); the count covers whatever
            the model computes (for `TiMoModel`, the backbone only).
        pixel_values: the input `[B, T, C, H, W]`.
        backward: also count the backward pass of the sum of the first output.
        on_meta: count on a copy of the model built on the `meta` device (no weights, no memory, no compute; the
            count is the same because FLOPs depend on shapes only). The model class must be constructible from its
            `config`.
        **inputs: further keyword arguments of the model call.

    Returns:
        A dict with `total`, `forward` and `backward` (FLOPs, 2 per multiply-add), `attention` (FLOPs of the
        attention cores, i.e. the logits and the weighted sums of every attention module, without its linear
        projections), `by_operator` (`{aten op name: FLOPs}`) and `by_stage` (`{"embeddings": ..., "stage1": ...}`
        for TiMo backbones).
    """
    if on_meta:
        with torch.device("meta"):
            model = type(model)(model.config)
        pixel_values = pixel_values.to("meta")
        inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=flop_formulas())
    forward_total = 0
    try:
        grad_context = contextlib.nullcontext() if backward else torch.no_grad()
        with grad_context, counter:
            outputs = model(pixel_values, **inputs)
            forward_total = counter.get_total_flops()
            if backward:
                first = outputs[0] if isinstance(outputs, (tuple, list)) else next(iter(outputs.values()))
                if isinstance(first, (tuple, list)):
                    first = first[0]
                first.float().sum().backward()
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    total = counter.get_total_flops()
    root = type(model).__name__

    attention = 0
    stages = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "TiMoAttention":
            linears = sum(
                _module_flops(counts, root, f"{name}.{child}")
                for child, sub in module.named_children()
                if isinstance(sub, nn.Linear)
            )
            attention += _module_flops(counts, root, name) - linears
        if name.endswith("embeddings") and name.count(".") <= 1:
            stages["embeddings"] = _module_flops(counts, root, name)
        parts = name.split(".")
        if len(parts) >= 3 and parts[-2] == "stages" and parts[-3] == "encoder" and parts[-1].isdigit():
            stages[f"stage{int(parts[-1]) + 1}"] = _module_flops(counts, root, name)
    by_operator = {}
    for op, flops in counts.get("Global", {}).items():
        name = str(op).removeprefix("aten.")
        by_operator[name] = by_operator.get(name, 0) + int(flops)
    return {
        "total": int(total),
        "forward": int(forward_total),
        "backward": int(total - forward_total),
        "attention": int(attention),
        "by_operator": by_operator,
        "by_stage": stages,
    }


# Paper Table 7 (TiMo-Base, [1, 3, 3, 256, 256]): per attention layout, the official code's forward FLOPs of the
# backbone (FlopCounterMode, 2 per multiply-add; ../shared/spec/official-timo.md 5.2) and the paper's number, which
# is twice that (it matches batch 2).
TABLE7_GFLOPS = {
    ("mhsa", "mhsa", "mhsa", "mhsa"): (320.85, 642.15),
    ("stga", "mhsa", "mhsa", "mhsa"): (217.81, 436.87),
    ("dstga", "mhsa", "mhsa", "mhsa"): (200.64, 402.52),
    ("dstga", "dstga", "mhsa", "mhsa"): (185.63, 372.60),
    ("dstga", "dstga", "dstga", "mhsa"): (168.81, 339.10),
    ("dstga", "dstga", "dstga", "dstga"): (168.58, 333.64),
}
TABLE7_INPUT_SHAPE = (1, 3, 3, 256, 256)


def layout_name(attention_types) -> str:
    """`("dstga", "dstga", "mhsa", "mhsa")` -> `"D-D-M-M"`."""
    return "-".join({"dstga": "D", "stga": "S", "mhsa": "M"}[kind] for kind in attention_types)


def table7(
    preset: str = "base",
    input_shape=TABLE7_INPUT_SHAPE,
    stga_implementation: str = "reference",
    layouts=tuple(TABLE7_GFLOPS),
) -> list[dict]:
    """Forward FLOPs of the backbone for each attention layout of paper Table 7, counted on the meta device.

    Returns one dict per layout: `layout` (e.g. `"D-D-M-M"`), `gflops` (counted), `attention_gflops`,
    `official_gflops` and `paper_gflops` (`None` outside the paper's setting: TiMo-Base at [1, 3, 3, 256, 256]).
    """
    from .configuration_timo import TiMoConfig
    from .modeling_timo import TiMoModel

    rows = []
    for attention_types in layouts:
        config = TiMoConfig.from_preset(
            preset, attention_types=list(attention_types), stga_implementation=stga_implementation
        )
        with torch.device("meta"):
            model = TiMoModel(config)
        counted = count_flops(model, torch.empty(input_shape, device="meta"))
        reference = TABLE7_GFLOPS.get(tuple(attention_types))
        in_paper_setting = preset.lower() == "base" and tuple(input_shape) == TABLE7_INPUT_SHAPE and reference
        rows.append(
            {
                "layout": layout_name(attention_types),
                "gflops": counted["total"] / 1e9,
                "attention_gflops": counted["attention"] / 1e9,
                "official_gflops": reference[0] if in_paper_setting else None,
                "paper_gflops": reference[1] if in_paper_setting else None,
            }
        )
    return rows


__all__ = ["count_flops", "flop_formulas", "table7", "TABLE7_GFLOPS", "layout_name"]
