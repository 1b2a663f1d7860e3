"""Training-at-scale tables of the README: memory per distributed variant and pre-training time from FLOPs.

    python -m benchmarks.scale_table [--gpus 8] [--batch 64] [--gpu H100-SXM 989 --gpu A100 312] [--mfu 0.35]

Parameters are counted on the `meta` device; FLOPs and activations come from one real CPU forward/backward of
batch 1 (and a forward of batch 2) with zero-filled weights (the MIM masking is data dependent, so the MIM forward
cannot run on `meta`; Huge needs ~10 GB of RAM and a few minutes on a laptop). All of it for the masked-image-modelling
model `TiMoForMaskedImageModeling` of each preset at the official pre-training input (3 frames x 3 bands x 224 x 224,
mask ratio 0.75, MHSA encoder on the visible units, decoder width 512 / depth 8):

* parameters: `numel` of every parameter;
* model state per GPU for each `training/accelerate/` variant, from the standard byte counts (Rajbhandari et al.,
  ZeRO, 2020) with mixed precision bf16: fp32 weights (4 B), fp32 gradients (4 B), AdamW `exp_avg` + `exp_avg_sq`
  (8 B); DeepSpeed bf16 keeps bf16 weights (2 B) and bf16 gradients (2 B) plus fp32 master weights (4 B);
  FSDP/ZeRO-3 additionally gather one wrapped unit (the largest TiMoLayer, in bf16) at a time (x2 with prefetch);
* activations: bytes of every tensor autograd saves for backward (`saved_tensors_hooks`), per sample (difference
  of batch 2 and batch 1, so weights saved by the matmuls cancel out), in fp32 (under bf16 autocast the matmul
  inputs are saved in bf16, so expect less); an upper bound (a tensor saved by two operations is counted twice),
  without activation checkpointing;
* FLOPs per sample: `timo_hf.flops.count_flops` of forward + backward (2 FLOPs per multiply-add, matmuls,
  convolutions and attention; element-wise work not counted), so time = FLOPs x samples / (GPUs x peak x MFU).

DDP bucket copies, the CUDA context, allocator fragmentation and communication buffers are not included.
"""

import argparse

import torch

from timo_hf import TiMoConfig, TiMoForMaskedImageModeling
from timo_hf.flops import count_flops
from timo_hf.modeling_timo import TiMoLayer

PRESETS = ("base", "large", "huge")
INPUT = (3, 3, 224, 224)  # frames, bands, height, width of the official pre-training
MILLIONST_SERIES = 100_000  # one pre-training sample per location per epoch (10 dates each, 1M images)
EPOCHS = 100
GIB = 1024**3


def mim_model(preset: str) -> TiMoForMaskedImageModeling:
    """The MIM model of a preset on CPU with zero-filled (not initialised) weights: the masking of the MIM forward
    is data dependent (`bool_masked_pos.sum()`), so it cannot run on the meta device; values do not matter here."""
    config = TiMoConfig.from_preset(preset, num_channels=INPUT[1], mask_unit_size=32, mask_ratio=0.75)
    with torch.device("meta"):
        model = TiMoForMaskedImageModeling(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.zero_()
    return model


def noise_for(model: TiMoForMaskedImageModeling, batch: int) -> torch.Tensor:
    frames, _, height, width = INPUT
    unit = model.config.mask_unit_size
    return torch.rand(batch, frames * (height // unit) * (width // unit), generator=torch.Generator().manual_seed(0))


class SavedBytes:
    """Context manager summing the bytes of every tensor autograd saves for backward while it is active."""

    def __init__(self):
        self.total = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor):
        self.total += tensor.numel() * tensor.element_size()
        return tensor

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def model_facts(preset: str) -> dict:
    model = mim_model(preset)
    parameters = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for p in model.timo.parameters())
    largest_unit = max(sum(p.numel() for p in m.parameters()) for m in model.modules() if isinstance(m, TiMoLayer))
    with SavedBytes() as one:
        flops = count_flops(model, torch.randn(1, *INPUT), backward=True, noise=noise_for(model, 1))
    model.zero_grad(set_to_none=True)
    with SavedBytes() as two:
        model(pixel_values=torch.randn(2, *INPUT), noise=noise_for(model, 2))
    return {
        "preset": preset,
        "parameters": parameters,
        "encoder_parameters": encoder,
        "largest_unit": largest_unit,
        "flops_forward": flops["forward"],
        "flops_total": flops["total"],
        "activation_bytes_per_sample": two.total - one.total,
    }


def state_bytes(variant: str, params: int, gpus: int, largest_unit: int) -> dict:
    """Bytes per GPU of weights / gradients / AdamW state (+ gathered unit) for one variant (see module doc)."""
    n = gpus
    if variant == "DDP (ddp_*.yaml)":
        return {"weights": 4 * params, "gradients": 4 * params, "adamw": 8 * params, "gathered": 0}
    if variant == "FSDP full shard (fsdp.yaml)":
        return {"weights": 4 * params / n, "gradients": 4 * params / n, "adamw": 8 * params / n,
                "gathered": 2 * 2 * largest_unit}
    if variant == "ZeRO-2 (deepspeed_zero2.yaml)":
        return {"weights": 2 * params + 4 * params / n, "gradients": 2 * params / n, "adamw": 8 * params / n,
                "gathered": 0}
    if variant == "ZeRO-3 (deepspeed_zero3.yaml)":
        return {"weights": (2 + 4) * params / n, "gradients": 2 * params / n, "adamw": 8 * params / n,
                "gathered": 2 * 2 * largest_unit}
    raise ValueError(variant)


VARIANTS = ("DDP (ddp_*.yaml)", "FSDP full shard (fsdp.yaml)", "ZeRO-2 (deepspeed_zero2.yaml)",
            "ZeRO-3 (deepspeed_zero3.yaml)")


def format_tables(facts: list[dict], gpus: int, batch: int, peaks: list[tuple[str, float]], mfu: float) -> str:
    out = [
        f"Model (TiMoForMaskedImageModeling, input {list(INPUT)} per sample, mask ratio 0.75):",
        "",
        ("| preset | parameters (encoder + MIM decoder) | encoder | largest TiMoLayer | fwd GFLOPs/sample | "
        "fwd+bwd GFLOPs/sample | activations/sample (fp32, saved for bwd, upper bound) |"),
        "|---|---|---|---|---|---|---|",
    ]
    for f in facts:
        out.append(
            f"| {f['preset']} | {f['parameters'] / 1e6:.2f} M | {f['encoder_parameters'] / 1e6:.2f} M | "
            f"{f['largest_unit'] / 1e6:.2f} M | {f['flops_forward'] / 1e9:.2f} | {f['flops_total'] / 1e9:.2f} | "
            f"{f['activation_bytes_per_sample'] / GIB:.3f} GiB |"
        )
    out += [
        "",
        (f"Memory per GPU in GiB on {gpus} GPUs, bf16 mixed precision, AdamW, batch {batch} per GPU "
        "(weights / gradients / AdamW state / gathered bf16 units -> model state; + activations at the batch):"),
        "",
        "| variant | " + " | ".join(f["preset"] for f in facts) + " |",
        "|---|" + "---|" * len(facts),
    ]
    for variant in VARIANTS:
        cells = []
        for f in facts:
            s = state_bytes(variant, f["parameters"], gpus, f["largest_unit"])
            state = sum(s.values())
            acts = batch * f["activation_bytes_per_sample"]
            cells.append(
                f"{s['weights'] / GIB:.2f} / {s['gradients'] / GIB:.2f} / {s['adamw'] / GIB:.2f} / "
                f"{s['gathered'] / GIB:.2f} -> **{state / GIB:.2f}**; +{acts / GIB:.1f}"
            )
        out.append(f"| {variant} | " + " | ".join(cells) + " |")
    samples = MILLIONST_SERIES * EPOCHS
    out += [
        "",
        (f"Pre-training time on MillionST ({MILLIONST_SERIES:,} series per epoch x {EPOCHS} epochs = {samples:,} "
        f"samples, batch {batch} x {gpus} GPUs = {batch * gpus} per step, {-(-samples // (batch * gpus)):,} steps); "
        f"time = fwd+bwd FLOPs/sample x samples / ({gpus} x peak x MFU), assumed MFU {mfu:.0%}:"),
        "",
        "| preset | total PFLOPs | " + " | ".join(
            f"{name} ({peak:g} TFLOP/s bf16 dense): hours at 100% / at MFU, samples/s" for name, peak in peaks
        ) + " |",
        "|---|---|" + "---|" * len(peaks),
    ]
    for f in facts:
        total = f["flops_total"] * samples
        cells = []
        for _, peak in peaks:
            ideal = total / (gpus * peak * 1e12)
            expected = ideal / mfu
            cells.append(f"{ideal / 3600:.2f} / {expected / 3600:.2f} h, {samples / expected:,.0f}/s")
        out.append(f"| {f['preset']} | {total / 1e15:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="per GPU (official pre-training: 64)")
    parser.add_argument(
        "--gpu", nargs=2, action="append", metavar=("NAME", "PEAK_TFLOPS"),
        help="a GPU and its dense bf16 peak (repeatable); default: H100-SXM 989 and A100 312 (vendor datasheets)",
    )
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOP utilisation")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    args = parser.parse_args(argv)
    facts = [model_facts(preset) for preset in args.presets]
    peaks = [(name, float(peak)) for name, peak in args.gpu] if args.gpu else [("H100-SXM", 989.0), ("A100", 312.0)]
    text = format_tables(facts, args.gpus, args.batch, peaks, args.mfu)
    print(text)
    return text


if __name__ == "__main__":
    main()
