"""Portable TiMo graphs: ONNX (run by onnxruntime) and `torch.export` programs (`.pt2`), each checked against PyTorch.

The exported graph maps `pixel_values [B, T, C, H, W]` (normalised, as the image processor gives them) and
`temporal_positions [B, T]` to the model's main tensor: `logits` for the segmentation and classification heads,
`last_hidden_state` for the bare encoder. Frames, bands and the spatial size are fixed at export time (the tile size
of tiled inference); the batch dimension can be left dynamic.

ONNX specifics: the fast STGA / D-STGA kernels write into a preallocated token-major buffer (`out=`), which the ONNX
decomposition cannot express, so the ONNX graph is traced from the reference kernels (same maths, checked below);
`torch.median` over the frames (D-STGA) has no ONNX translation in torch's exporter and is lowered to `TopK` + `Gather`
(the lower median, as `torch.median`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn


FORMATS = ("onnx", "torch-export")


class ExportWrapper(nn.Module):
    """`(pixel_values, temporal_positions) -> tensor`: the model's logits (or encoder output) as a plain tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, temporal_positions: torch.Tensor) -> torch.Tensor:
        outputs = self.model(pixel_values=pixel_values, temporal_positions=temporal_positions)
        return outputs.logits if hasattr(outputs, "logits") else outputs.last_hidden_state


def output_name(model: nn.Module) -> str:
    return "last_hidden_state" if type(model).__name__ == "TiMoModel" else "logits"


def example_inputs(config, batch_size: int, num_frames: int, height: int, width: int, seed: int = 0):
    """Normal random `pixel_values` and frame-index `temporal_positions` (what the default image processor gives)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, num_frames, config.num_channels, height, width, generator=generator)
    temporal_positions = torch.arange(num_frames, dtype=torch.float32).expand(batch_size, num_frames).contiguous()
    return pixel_values, temporal_positions


def frozen_wrapper(model: nn.Module, stga_implementation: str | None = None) -> ExportWrapper:
    """An eval-mode, gradient-free copy of `model` (optionally with other STGA kernels) wrapped for export."""
    model = copy.deepcopy(model)
    if stga_implementation is not None:
        model.config.stga_implementation = stga_implementation  # shared by every attention module
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return ExportWrapper(model).eval()  # the wrapper too, not only the model: exporters read the top module's mode


def _onnx_median_dim(self, dim: int, keepdim: bool = False):
    """`aten.median.dim` in ONNX: the `(n - 1) // 2`-th smallest value along `dim`, and its index."""
    from onnxscript import opset18 as op

    one, two = op.Constant(value_ints=[1]), op.Constant(value_ints=[2])
    length = op.Gather(op.Shape(self), op.Constant(value_ints=[dim]), axis=0)
    count = op.Add(op.Div(op.Sub(length, one), two), one)
    values, indices = op.TopK(self, count, axis=dim, largest=0, sorted=1)
    last = op.Sub(count, one)
    values, indices = op.Gather(values, last, axis=dim), op.Gather(indices, last, axis=dim)
    if not keepdim:
        axes = op.Constant(value_ints=[dim])
        values, indices = op.Squeeze(values, axes), op.Squeeze(indices, axes)
    return values, indices


def export_onnx(model: nn.Module, path: str | Path, inputs, opset: int = 18, dynamic_batch: bool = False) -> Path:
    """Write `model` as ONNX (external-data free, one file) with inputs `pixel_values`, `temporal_positions`."""
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'timo-hf[export]'") from None
    path = Path(path)
    wrapper = frozen_wrapper(model, stga_implementation="reference")
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic_shapes = {"pixel_values": {0: batch}, "temporal_positions": {0: batch}}
    program = torch.onnx.export(
        wrapper, tuple(inputs), dynamo=True, opset_version=opset, input_names=["pixel_values", "temporal_positions"],
        output_names=[output_name(model)], dynamic_shapes=dynamic_shapes, verbose=False,
        custom_translation_table={torch.ops.aten.median.dim: _onnx_median_dim},
    )
    program.save(str(path))
    return path


def export_program(model: nn.Module, path: str | Path, inputs, dynamic_batch: bool = False) -> Path:
    """Write `model` as a `torch.export` program (`torch.export.load(path).module()` runs it)."""
    path = Path(path)
    wrapper = frozen_wrapper(model)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic_shapes = {"pixel_values": {0: batch}, "temporal_positions": {0: batch}}
    with torch.no_grad():
        program = torch.export.export(wrapper, tuple(inputs), dynamic_shapes=dynamic_shapes)
    torch.export.save(program, str(path))
    return path


def reference_output(model: nn.Module, inputs) -> np.ndarray:
    with torch.no_grad():
        return frozen_wrapper(model)(*inputs).numpy()


def run_onnx(path: str | Path, inputs) -> np.ndarray:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("the ONNX parity check needs onnxruntime: pip install 'timo-hf[export]'") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"pixel_values": inputs[0].numpy(), "temporal_positions": inputs[1].numpy()}
    return session.run(None, feeds)[0]


def run_program(path: str | Path, inputs) -> np.ndarray:
    with torch.no_grad():
        return torch.export.load(str(path)).module()(*inputs).numpy()


def parity(expected: np.ndarray, actual: np.ndarray, atol: float = 1e-4, rtol: float = 1e-4) -> dict:
    """Largest absolute difference, the tolerance `atol + rtol * max|expected|`, and whether it is met."""
    difference = float(np.abs(expected - actual).max()) if expected.shape == actual.shape else float("inf")
    tolerance = atol + rtol * float(np.abs(expected).max())
    return {"max_abs_diff": difference, "tolerance": tolerance, "ok": difference <= tolerance,
            "shape": list(actual.shape)}
