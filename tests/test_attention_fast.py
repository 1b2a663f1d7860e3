"""The fast STGA / D-STGA kernels (`stga_implementation="fast"`) against the reference kernels and the official
golden outputs, plus the conditions they must work under: autocast, activation checkpointing, torch.compile.

The kernels are tested on `TIMO_TEST_DEVICE` (default `cpu`):
`TIMO_TEST_DEVICE=cuda pytest tests/test_attention_fast.py` checks them on a GPU, in true float32 (TF32 off), which CI
cannot (it has none)."""

import os

import pytest
import torch

import timo_hf.attention_fast as attention_fast
from timo_hf import TiMoConfig, TiMoModel, buffer_pool
from timo_hf.attention_fast import STGA_IMPLEMENTATIONS, dstga_fast, median_values, stga_fast, temporal_median_fast
from timo_hf.attention_timo import TiMoQueryOffset, pack_like, temporal_median, unpack
from timo_hf.convert_original import convert_original_checkpoint
from timo_hf.modeling_timo import TiMoAttention, TiMoLayer

from .conftest import config_from_official, load_golden


FRAME_COUNTS = (1, 2, 3, 4, 7, 12, 30)  # 7 and 30: keys and values padded on CPU (`key_frames`)
DEVICE = torch.device(os.environ.get("TIMO_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":  # the tolerances below are float32's: no TF32 in convolutions or matrix products
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(params=["heap", "pool"])
def memory(request, monkeypatch):
    """Where the eager CPU kernels' tensors come from: `pool`, every tensor they may pool from the buffer pool (no
    size threshold; these tensors are small), `heap`, fresh ones (tensors below the pool's threshold)."""
    if request.param == "pool":
        monkeypatch.setattr(buffer_pool, "MIN_POOLED_BYTES", 0)
    yield request.param
    buffer_pool.release_buffers()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def within_float64_rounding(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to float64 rounding: relative to the largest value, with an absolute floor for exact zeros."""
    return (actual - expected).abs().max() <= 1e-10 * expected.abs().max() + 1e-14


def module_layout_inputs(batch, heads, frames, tokens, head_dim, dtype=torch.float32, seed=0):
    """Queries, keys and values as TiMoAttention hands them to the kernels: strided views of `[B, T*N, h, d]`, on
    `DEVICE`."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, frames, tokens, head_dim)
    tensors = []
    for _ in range(3):
        packed = torch.randn(batch, frames * tokens, heads, head_dim, generator=generator, dtype=dtype).to(DEVICE)
        tensors.append(packed.transpose(1, 2).reshape(shape).requires_grad_())
    offset = torch.rand(batch, heads, frames, tokens, generator=generator, dtype=dtype).to(DEVICE).requires_grad_()
    grad = torch.randn(shape, generator=generator, dtype=dtype).to(DEVICE)
    return tensors, offset, grad


def run_kernels(implementation, attention, query, key, value, offset, grad):
    kernels = STGA_IMPLEMENTATIONS[implementation]
    if attention == "stga":
        output = kernels.stga(query, key, value)
        inputs = (query, key, value)
    else:
        output = kernels.dstga(query, key, value, offset, kernels.median(query))
        inputs = (query, key, value, offset)
    return output, torch.autograd.grad(output, inputs, grad)


# ---------------------------------------------------------------------------------------------------------------
# Temporal median


@pytest.mark.parametrize("frames", list(range(1, 34)))
def test_median_network_values_are_torch_median(frames, memory):
    """As a chain of fresh tensors, and (`pool`) written in a pooled workspace of wires, from which only a copy of
    the median leaves."""
    tensor = torch.randn(3, frames, 5, generator=torch.Generator().manual_seed(frames)).to(DEVICE)
    with torch.no_grad(), buffer_pool.pooling(memory == "pool"):
        median = median_values(tensor, 1)
    assert torch.equal(median, tensor.median(1).values)
    if memory == "pool" and 1 < frames <= attention_fast.MAX_NETWORK_FRAMES and DEVICE.type == "cpu":
        assert median.untyped_storage().nbytes() == median.nbytes and buffer_pool.pooled_bytes() > median.nbytes


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 7, 12, 30])
def test_median_gradient_is_torch_median_gradient(frames):
    tensor = torch.randn(2, 3, frames, 6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(DEVICE)
    grad = torch.randn(2, 3, 6, 4, dtype=torch.float64).to(DEVICE)
    expected = torch.autograd.grad(temporal_median(tensor.requires_grad_()), tensor, grad)[0]
    actual = torch.autograd.grad(temporal_median_fast(tensor), tensor, grad)[0]
    assert torch.equal(actual, expected)


def test_median_gradient_with_ties_goes_to_the_first_tied_frame():
    tensor = torch.tensor([[1.0, 2.0, 2.0, 3.0, 2.0]]).requires_grad_()
    assert temporal_median_fast(tensor, 1).item() == 2.0
    (grad,) = torch.autograd.grad(temporal_median_fast(tensor, 1).sum(), tensor)
    assert torch.equal(grad, torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_nan_median_takes_its_gradient_at_the_first_nan_frame_as_torch_median(compiled):
    """A NaN among the frames makes the median NaN; its gradient goes where torch.median's index points (the first
    NaN frame), instead of past the last frame (an index error in eager code, a lost gradient in compiled code)."""
    tensor = torch.randn(2, 3, 7, 6, 4, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    tensor[0, 1, 4, 2, 3] = tensor[0, 1, 2, 2, 3] = tensor[1, 0, 6, 5, 0] = float("nan")
    grad = torch.randn(2, 3, 6, 4).to(DEVICE)
    median = torch.compile(temporal_median_fast, fullgraph=True) if compiled else temporal_median_fast
    leaf = tensor.clone().requires_grad_()
    values = median(leaf)
    expected = torch.autograd.grad(temporal_median(leaf), leaf, grad)[0]
    assert torch.equal(values.isnan(), temporal_median(tensor).isnan()) and values.isnan().sum() == 2
    assert torch.equal(torch.autograd.grad(values, leaf, grad)[0], expected)


def test_a_nan_in_the_projections_reaches_outputs_and_gradients_as_in_the_reference():
    """Eager D-STGA (medians of the module's projections, `_EagerInputs`) with a NaN query: what the reference gives
    (NaN everywhere the offset's batch norm spreads it), not an index error in backward."""
    frames, tokens, width = 5, 16, 32
    results = {}
    for implementation in ("reference", "fast"):
        torch.manual_seed(0)
        config = TiMoConfig.from_preset("base", stga_implementation=implementation)
        module = TiMoAttention(config, width, 2, "dstga").to(DEVICE)
        generator = torch.Generator().manual_seed(1)
        query = torch.randn(1, frames * tokens, width, generator=generator).to(DEVICE)
        query[0, 3 * tokens + 2, 5] = float("nan")
        key_value = torch.randn(1, frames * tokens, 2 * width, generator=generator).to(DEVICE)
        inputs = (query.requires_grad_(), key_value.requires_grad_())
        output = module.attend(*inputs, frames)
        results[implementation] = (output, *torch.autograd.grad(output, inputs, torch.ones_like(output)))
    for expected, actual in zip(results["reference"], results["fast"]):
        assert torch.equal(actual.isnan(), expected.isnan()) and expected.isnan().any()


@pytest.mark.parametrize("frames", [1, 3, 30])
def test_median_gradient_compiled_is_eager(frames):
    """Under torch.compile the gradient is routed by a fused comparison instead of a scatter: same result."""
    tensor = torch.randn(2, 3, frames, 6, 4, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    tensor[:, :, -1] = tensor[:, :, 0]  # ties
    grad = torch.randn(2, 3, 6, 4).to(DEVICE)

    def median_gradient(median):
        leaf = tensor.clone().requires_grad_()
        return torch.autograd.grad(median(leaf), leaf, grad)[0]

    expected = median_gradient(temporal_median_fast)
    assert torch.equal(median_gradient(torch.compile(temporal_median_fast, fullgraph=True)), expected)
    # Each median's gradient reaches one frame, the first of the tied ones.
    frames_reached = (expected != 0).sum(dim=2)
    assert torch.equal(frames_reached, torch.ones_like(frames_reached))
    if frames > 1:
        tied_at_first = tensor[:, :, 0] == tensor.median(dim=2).values
        assert torch.equal(expected[:, :, 0][tied_at_first], grad[tied_at_first])


@pytest.mark.parametrize("layout", ["projection", "token copy"])
@pytest.mark.parametrize("mode", ["float32", "bfloat16 autocast", "compiled"])
def test_query_offset_is_relu_batchnorm_of_projected_deviation(mode, layout):
    """`ReLU(BatchNorm1d(w . (q - q_med)))` over all queries as one channel, whichever order the module computes in
    (float32: two products; low precision: the difference first; compiled code: one fused pass) and whichever
    order the queries are stored in (TiMoAttention's projection, the fast D-STGA's token copy)."""
    torch.manual_seed(0)
    offset = TiMoQueryOffset(8).to(DEVICE).train()
    (query, _, _), _, _ = module_layout_inputs(2, 3, 5, 7, 8, dtype=torch.float64)
    query = query.detach().float()
    if layout == "token copy":
        query = query.transpose(2, 3).contiguous().transpose(2, 3)
    median = temporal_median(query)
    deviation = (query - median.unsqueeze(2)).double() @ offset.projection.weight.double().squeeze(0)
    expected = torch.relu((deviation - deviation.mean()) / (deviation.var(unbiased=False) + offset.norm.eps).sqrt())
    module = torch.compile(offset, fullgraph=True, backend="aot_eager") if mode == "compiled" else offset
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=mode == "bfloat16 autocast"):
        actual = module(query, median)
    assert actual.shape == expected.shape
    tolerance = 0.02 if mode == "bfloat16 autocast" else 1e-5
    torch.testing.assert_close(actual.double(), expected, rtol=tolerance, atol=tolerance)


# ---------------------------------------------------------------------------------------------------------------
# Kernels against the reference


@pytest.mark.parametrize("attention", ["stga", "dstga"])
@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_fast_kernels_match_reference_fp32(attention, frames, memory):
    (query, key, value), offset, grad = module_layout_inputs(2, 2, frames, 12, 8)
    expected, expected_grads = run_kernels("reference", attention, query, key, value, offset, grad)
    actual, actual_grads = run_kernels("fast", attention, query, key, value, offset, grad)
    assert relative_error(actual, expected) <= 1e-5
    for name, got, want in zip("qkv", actual_grads[:3], expected_grads[:3]):
        assert relative_error(got, want) <= 1e-5, name
    if attention == "dstga":  # with T = 1 the offset has no effect, its gradient is 0 up to rounding
        scale = max(expected_grads[3].abs().max().item(), 1.0)
        assert (actual_grads[3] - expected_grads[3]).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_dstga_offset_branch_gradients_fp64(frames, memory):
    """All weight gradients of a D-STGA attention module (offset branch included) agree in float64."""
    config = TiMoConfig(
        hidden_sizes=[16, 32, 48, 64], num_heads=[2, 2, 4, 4], depths=[1, 1, 1, 1], stga_implementation="reference"
    )
    torch.manual_seed(0)
    module = TiMoAttention(config, 16, 2, "dstga").to(DEVICE).double().train()
    hidden = torch.randn(2, frames * 9, 16, dtype=torch.float64).to(DEVICE)
    grads = {}
    for implementation in ("reference", "fast"):
        config.stga_implementation = implementation
        module.zero_grad()
        module(hidden, frames).pow(2).sum().backward()
        grads[implementation] = {name: p.grad.clone() for name, p in module.named_parameters()}
    for name, expected in grads["reference"].items():
        assert within_float64_rounding(grads["fast"][name], expected), name


BACKBONE_SETTINGS = {
    # attention types, frames, batch, height, width, training mode, parameters that train (None: all)
    "mixed, T=7": (("dstga", "stga", "mhsa", "mhsa"), 7, 2, 64, 32, True, None),
    "one frame, 1 x 3 tokens a frame in stage 4": (("stga", "dstga", "mhsa", "dstga"), 1, 2, 32, 96, True, None),
    "eval mode, only the offset branches train": (
        ("dstga", "dstga", "mhsa", "mhsa"), 12, 1, 64, 64, False, "query_offset"
    ),
    "T=31, only the layer norms train": (("dstga", "mhsa", "mhsa", "stga"), 31, 1, 32, 64, True, "layernorm"),
}


@pytest.mark.parametrize("setting", BACKBONE_SETTINGS.values(), ids=BACKBONE_SETTINGS.keys())
def test_fast_backbone_matches_reference_fp64(setting, memory):
    """Whole backbones in float64, fast against reference kernels: every stage map, every gradient (only of the
    parameters that train) and the offset branches' BatchNorm statistics, over mixed layouts, frame counts, image
    shapes, training and eval mode and frozen parameters."""
    attention_types, frames, batch, height, width, training, trained = setting
    config = TiMoConfig(hidden_sizes=[16, 32, 32, 32], num_heads=[2, 2, 2, 2], depths=[2, 1, 1, 1],
                        attention_types=list(attention_types), num_channels=4)
    torch.manual_seed(0)
    pixel_values = torch.randn(batch, frames, 4, height, width, dtype=torch.float64).to(DEVICE)
    initial = TiMoModel(config).double().state_dict()
    results = {}
    for implementation in ("reference", "fast"):
        config.stga_implementation = implementation
        model = TiMoModel(config).to(DEVICE).double().train(training)
        model.load_state_dict(initial)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trained is None or trained in name)
        maps = model(pixel_values, output_hidden_states=True).hidden_states
        weights = torch.Generator().manual_seed(1)
        sum((stage * torch.randn(stage.shape, generator=weights, dtype=stage.dtype).to(DEVICE)).sum()
            for stage in maps).backward()
        results[implementation] = {
            **{f"stage map {index}": stage for index, stage in enumerate(maps)},
            **{f"{name} gradient": p.grad for name, p in model.named_parameters() if p.grad is not None},
            **{name: b.double() for name, b in model.named_buffers() if "query_offset" in name},
        }
    assert results["fast"].keys() == results["reference"].keys()
    for name, expected in results["reference"].items():
        assert within_float64_rounding(results["fast"][name], expected), name


def projection_layout_inputs(frames, ties, batch=2, heads=2, tokens=9, head_dim=4):
    """float64 projections `[B, T*N, C]` and `[B, T*N, 2C]` (leaves) and the views TiMoAttention hands the D-STGA
    kernels: queries `[B, h, T, N, d]` and keys and values packed as `[2, B, h, T, N, d]`. With `ties`, the last
    frame repeats the first one, so that medians are tied between frames."""
    generator = torch.Generator().manual_seed(frames)
    length, dim = frames * tokens, heads * head_dim
    query_projection = torch.randn(batch, frames, tokens, dim, generator=generator, dtype=torch.float64)
    key_value_projection = torch.randn(batch, frames, tokens, 2 * dim, generator=generator, dtype=torch.float64)
    if ties:
        query_projection[:, -1], key_value_projection[:, -1] = query_projection[:, 0], key_value_projection[:, 0]
    query_projection = query_projection.view(batch, length, dim).to(DEVICE).requires_grad_()
    key_value_projection = key_value_projection.view(batch, length, 2 * dim).to(DEVICE).requires_grad_()
    shape = (batch, heads, frames, tokens, head_dim)
    query = query_projection.view(batch, length, heads, head_dim).transpose(1, 2).reshape(shape)
    key_value = key_value_projection.view(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    return (query_projection, key_value_projection), query, key_value.reshape(2, *shape)


@pytest.mark.parametrize("frames", FRAME_COUNTS)
@pytest.mark.parametrize("ties", [False, True])
def test_dstga_from_the_projections_matches(frames, ties, memory):
    """TiMoAttention's D-STGA call (`dstga_with_offset`, whose fast form writes the projections' gradients itself,
    the medians' shares included) gives the reference's output and projection gradients; with tied medians, where
    `torch.median` may route a gradient to any of the tied frames, the fast kernels composed from their parts (whose
    median sends it to the first, see the tests above)."""
    torch.manual_seed(0)
    query_offset = TiMoQueryOffset(4).to(DEVICE).double()
    projections, query, key_value = projection_layout_inputs(frames, ties)
    grad = torch.randn(query.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)

    def composed(query, key_value, query_offset):
        median = temporal_median_fast(query)
        return dstga_fast(query, *key_value.unbind(0), query_offset(query, median), median)

    expected_kernel = composed if ties else STGA_IMPLEMENTATIONS["reference"].dstga_with_offset
    results = []
    for kernel in (expected_kernel, STGA_IMPLEMENTATIONS["fast"].dstga_with_offset):
        output = kernel(query, key_value, query_offset)
        results.append((output, *torch.autograd.grad(output, projections, grad)))
    for name, actual, expected in zip(("output", "query grad", "key/value grad"), results[1], results[0]):
        assert relative_error(actual, expected) <= 1e-12, name


@pytest.mark.parametrize("frames", [3, 12])
def test_dstga_offset_weight_gradient_with_frozen_projections(frames, memory):
    """Where only the offset branch trains (queries, keys and values need no gradient), the fast D-STGA gives the
    reference's offset projection gradient."""
    query_offset = TiMoQueryOffset(4).to(DEVICE).double()
    _, query, key_value = projection_layout_inputs(frames, ties=False)
    query, key_value = query.detach(), key_value.detach()
    grad = torch.randn(query.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    weight = query_offset.projection.weight
    expected, actual = (
        torch.autograd.grad(STGA_IMPLEMENTATIONS[name].dstga_with_offset(query, key_value, query_offset), weight, grad)
        for name in ("reference", "fast")
    )
    assert relative_error(actual[0], expected[0]) <= 1e-12


@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_stga_from_the_projections_matches(frames, memory):
    """TiMoAttention's STGA call (`stga_packed`, whose fast form writes the gradients of the queries and of the packed
    keys and values in the projections' layout itself) gives the reference's output and projection gradients, and
    the gradient views it hands autograd are laid out as the projections are (nothing left to re-lay out)."""
    projections, query, key_value = projection_layout_inputs(frames, ties=False)
    grad = torch.randn(query.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    results = []
    for kernels in (STGA_IMPLEMENTATIONS["reference"], STGA_IMPLEMENTATIONS["fast"]):
        output = kernels.stga_packed(query, key_value)
        results.append((output, *torch.autograd.grad(output, projections, grad)))
    for name, actual, expected in zip(("output", "query grad", "key/value grad"), results[1], results[0]):
        assert relative_error(actual, expected) <= 1e-12, name
    output = STGA_IMPLEMENTATIONS["fast"].stga_packed(query, key_value)
    with torch.no_grad():  # as autograd runs it
        grad_query, grad_key_value = output.grad_fn.apply(grad)
    assert grad_query.stride() == query.stride() and grad_key_value.stride() == key_value.stride()


def packed_projection_view(batch=2, length=12, heads=3, head_dim=4):
    """A `[B, T*N, 2C]` key/value projection and its `[2, B, heads, T*N, head_dim]` view, as in TiMoAttention."""
    projection = torch.randn(batch, length, 2 * heads * head_dim, device=DEVICE, requires_grad=True)
    return projection, projection.view(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4)


def test_unpack_and_pack_like_keep_the_packed_layout():
    """`unpack` is `unbind(0)` and `pack_like` is `torch.stack`, the latter laid out as the packed tensor (for the
    projection's view and for a contiguous tensor)."""
    _, projection_view = packed_projection_view()
    for packed in (projection_view.detach(), projection_view.detach().contiguous()):
        parts = unpack(packed)
        for part, expected in zip(parts, packed.unbind(0)):
            assert torch.equal(part, expected) and part.stride() == expected.stride()
        stacked = pack_like([part.clone() for part in parts], packed)
        assert torch.equal(stacked, packed) and stacked.stride() == packed.stride()


def test_unpacked_projection_gradient_is_one_stack_without_a_copy():
    """Autograd stacks the unpacked keys' and values' gradients straight in the projection's layout: no copy
    after the stack (with `unbind(0)` there is one, into the projection's layout)."""

    def backward_ops(split):
        projection, packed = packed_projection_view()
        key, value = split(packed)
        loss = (key * torch.randn_like(key)).sum() + (value * torch.randn_like(value)).sum()
        with torch.profiler.profile() as profiler:
            loss.backward()
        return [event.name for event in profiler.events() if event.name in ("aten::stack", "aten::copy_")]

    assert backward_ops(unpack) == ["aten::stack"]
    assert backward_ops(lambda packed: packed.unbind(0)) == ["aten::stack", "aten::copy_"]


@pytest.mark.parametrize("attention", ["stga", "dstga"])
@pytest.mark.parametrize("frames", [3, 6])
def test_fast_kernels_gradcheck(attention, frames):
    """Finite differences: guards against a dropped gradient term (e.g. through a kernel's log-sum-exp); with 6
    frames the keys and values are padded on CPU."""
    (query, key, value), offset, _ = module_layout_inputs(1, 1, frames, 4, 3, dtype=torch.float64)
    if attention == "stga":
        assert torch.autograd.gradcheck(stga_fast, (query, key, value), fast_mode=True)
    else:
        median = temporal_median(query.detach())

        def function(query, key, value, offset):
            return dstga_fast(query, key, value, offset, median)

        assert torch.autograd.gradcheck(function, (query, key, value, offset), fast_mode=True)


@pytest.mark.parametrize("attention", ["stga", "dstga"])
@pytest.mark.parametrize("frames", [1, 3, 7])
def test_portable_blocked_kernel_matches_reference(attention, frames, monkeypatch):
    """The device-independent kernel (used off CPU), with blocks smaller than a frame."""
    monkeypatch.setattr(attention_fast, "_CPU_FLASH", None)
    monkeypatch.setattr(attention_fast, "BLOCK_ELEMENTS", 40)
    monkeypatch.setattr(attention_fast, "KEEP_COPIES_ELEMENTS", 0)  # STGA's backward makes its token copies again
    (query, key, value), offset, grad = module_layout_inputs(2, 2, frames, 12, 8)
    expected, expected_grads = run_kernels("reference", attention, query, key, value, offset, grad)
    actual, actual_grads = run_kernels("fast", attention, query, key, value, offset, grad)
    assert relative_error(actual, expected) <= 1e-5
    for got, want in zip(actual_grads[:3], expected_grads[:3]):
        assert relative_error(got, want) <= 1e-5


def test_keys_are_padded_to_whole_vectors_of_frames_on_cpu_only():
    """Up to two zero frames, where they make the frame count a multiple of 8; never for a few frames (unrolled
    products) nor off CPU."""
    cpu = torch.device("cpu")
    assert [attention_fast.key_frames(frames, cpu) for frames in (3, 6, 7, 8, 12, 14, 29, 30, 31)] == [
        3, 8, 8, 8, 12, 16, 29, 32, 32
    ]
    assert attention_fast.key_frames(30, torch.device("meta")) == 30


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any operator returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("attention", ["stga", "dstga"])
def test_fast_kernels_never_hold_frames_times_tokens_squared(attention):
    batch, heads, frames, tokens, head_dim = 1, 2, 8, 256, 4  # N^2 above SMALL_BLOCK_ELEMENTS: blocked
    (query, key, value), offset, grad = module_layout_inputs(batch, heads, frames, tokens, head_dim)
    largest = {}
    for implementation in ("reference", "fast"):
        with LargestTensor() as tracker:
            run_kernels(implementation, attention, query, key, value, offset, grad)
        largest[implementation] = tracker.largest
    assert largest["reference"] >= batch * heads * frames * tokens * (frames + tokens)
    bound = batch * heads * max(tokens * tokens, frames * tokens * (frames + head_dim))
    if DEVICE.type != "cpu":  # the portable kernel's blocks: a fixed budget of logits per slice, whatever T
        bound = max(bound, batch * heads * attention_fast.BLOCK_ELEMENTS)
    assert largest["fast"] <= bound


def test_spatial_backward_in_uneven_key_blocks_equals_one_block(monkeypatch):
    """The portable spatial backward works through blocks of key columns (the last one shorter here: 24, 24, 16 of
    64 keys): the same gradients as in one block, with the keys' and values' gradients assembled block by block
    and the queries' accumulated, and no block of logits above its budget."""
    query, key = torch.randn(2, 3, 64, 8, device=DEVICE), torch.randn(2, 3, 64, 8, device=DEVICE)
    value = torch.randn(2, 3, 64, 24, device=DEVICE)  # wider values than queries: the portable kernel on CPU too
    output, lse = attention_fast.spatial_attention_forward(query, key, value)
    grad = torch.randn_like(output)
    one_block = attention_fast.spatial_attention_backward(grad, query, key, value, output, lse)
    # Backward holds two blocks in half of the forward's: [64 rows, 24 keys] each.
    monkeypatch.setattr(attention_fast, "BLOCK_ELEMENTS", 2 * 2 * 64 * 24)
    with LargestTensor() as tracker:
        blocked = attention_fast.spatial_attention_backward(grad, query, key, value, output, lse)
    for got, want in zip(blocked, one_block):
        assert relative_error(got, want) <= 1e-6
    assert tracker.largest < 2 * 3 * 64 * 64  # no whole [N, N] block of logits


# ---------------------------------------------------------------------------------------------------------------
# Whole model: official golden outputs with both implementations, autocast, checkpointing, compile


def golden_model(golden: dict, implementation: str) -> TiMoModel:
    official = golden["config"]
    config = config_from_official(official, num_channels=official["in_chans"], stga_implementation=implementation)
    return convert_original_checkpoint(golden["state_dict"], config)


@pytest.mark.parametrize("implementation", ["reference", "fast"])
def test_official_golden_parity(implementation):
    golden = {key: value.to(DEVICE) if torch.is_tensor(value) else value
              for key, value in load_golden("timo_official_small.pt").items()}
    model = golden_model(golden, implementation).to(DEVICE)

    def assert_maps(inputs, outputs, tolerance):
        for actual, expected in zip(model.compute_feature_maps(inputs)[1:], outputs):
            assert (actual - expected.to(DEVICE)).abs().max() <= tolerance

    with torch.no_grad():
        for inputs, outputs in (("input", "outputs"), ("input_T4", "outputs_T4")):
            assert_maps(golden[inputs], golden[outputs], 1e-5)
        model.double()
        # The temporal encoding carries float32 precision (as official), and CUDA's float32 sin/cos differ from the
        # CPU's in the last bit: one ulp there moves these float64 outputs by ~1.6e-7.
        assert_maps(golden["input"].double(), golden["outputs_fp64"], 1e-10 if DEVICE.type == "cpu" else 1e-6)
        model.float().train()
        assert_maps(golden["input"], golden["outputs_train_mode"], 1e-5)


def test_stga_implementation_config():
    assert TiMoConfig().stga_implementation == "fast"
    with pytest.raises(ValueError, match="stga_implementation"):
        TiMoConfig(stga_implementation="flash")


def tiny_model(tiny_config_kwargs, **overrides) -> TiMoModel:
    torch.manual_seed(0)
    return TiMoModel(TiMoConfig(**{**tiny_config_kwargs, **overrides}))


def test_autocast_bfloat16(tiny_config_kwargs):
    model = tiny_model(tiny_config_kwargs).to(DEVICE).train()
    pixel_values = torch.randn(2, 3, 3, 32, 32).to(DEVICE)
    expected = model(pixel_values).last_hidden_state
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        output = model(pixel_values).last_hidden_state
    output.float().pow(2).sum().backward()
    # CUDA's autocast runs the final layer norm in float32, the CPU's in bfloat16.
    assert output.dtype == (torch.bfloat16 if DEVICE.type == "cpu" else torch.float32)
    assert relative_error(output.float(), expected) < 0.1
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    # The kernels themselves under autocast: same result as the reference kernels under autocast.
    (query, key, value), offset, grad = module_layout_inputs(1, 2, 3, 16, 8)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        for attention in ("stga", "dstga"):
            fast, _ = run_kernels("fast", attention, query, key, value, offset, grad)
            reference, _ = run_kernels("reference", attention, query, key, value, offset, grad)
            assert relative_error(fast.float(), reference.float()) < 0.05


@pytest.mark.parametrize("attention", ["stga", "dstga"])
@pytest.mark.parametrize("frames", [3, 30])
def test_bfloat16_autocast_is_at_least_as_accurate_as_the_reference(attention, frames):
    """Under bfloat16 autocast, the fast kernels' output and gradients are no further from their float64 result
    than the reference kernels' are from theirs. The inputs hold bfloat16 values, so that both precisions see the
    same numbers; each implementation is compared with itself because tied medians (frequent among bfloat16
    values) send their gradient to another tied frame in each."""
    tensors, offset, grad = module_layout_inputs(1, 4, frames, 64, 32, seed=frames)
    inputs = [tensor.detach().bfloat16() for tensor in (*tensors, offset)]
    errors = {}
    for implementation in ("reference", "fast"):
        results = {}
        for dtype in (torch.float64, torch.bfloat16):
            leaves = [tensor.to(dtype).requires_grad_() for tensor in inputs]
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                output, grads = run_kernels(implementation, attention, *leaves, grad.to(dtype))
            results[dtype] = (output, *grads)
        errors[implementation] = [
            relative_error(low.double(), full) for low, full in zip(results[torch.bfloat16], results[torch.float64])
        ]
    names = ["output", "query grad", "key grad", "value grad", "offset grad"]
    for name, fast, reference in zip(names, errors["fast"], errors["reference"]):
        assert fast <= 1.5 * reference, f"{name}: {fast:.2e} from float64, the reference {reference:.2e}"


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config_kwargs):
    pixel_values = torch.randn(2, 3, 3, 32, 32).to(DEVICE)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(tiny_config_kwargs).to(DEVICE).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(pixel_values).last_hidden_state.pow(2).sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-5, atol=1e-6, msg=name)


def compiled_block_matches_eager(layer, compiled, batch, frames):
    """The compiled block's output and gradients (input and every parameter) equal the eager block's."""
    hidden = torch.randn(batch, frames * 16, 16).to(DEVICE).requires_grad_()
    results = []
    for block in (layer, compiled):
        output = block(hidden, frames)
        results.append((output, *torch.autograd.grad(output.pow(2).sum(), (hidden, *layer.parameters()))))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("attention", ["stga", "dstga"])
def test_torch_compile_block_without_graph_breaks(attention, tiny_config_kwargs):
    """A whole block compiles as one graph (fullgraph=True), forward and backward, with the eager block's output
    and gradients (those of the D-STGA offset branch included, which compiled code takes from the token copy of the
    queries).

    The `aot_eager` backend traces exactly what inductor would receive (graph capture and the autograd.Function
    backward) without spending a minute on code generation; the benchmark suite runs the inductor backend.
    """
    torch.manual_seed(0)
    layer = TiMoLayer(TiMoConfig(**tiny_config_kwargs), 16, 2, attention, 0.0).to(DEVICE).train()
    compiled_block_matches_eager(layer, torch.compile(layer, fullgraph=True, backend="aot_eager"), 2, 3)


@pytest.mark.parametrize(
    "attention, shapes",
    [
        # STGA's and MHSA's frame count stays symbolic (6 and 7 frames are both padded to 8 on CPU for STGA); D-STGA's
        # median network is built for one frame count, so there only the batch size varies.
        ("stga", [(2, 6), (3, 7)]),
        ("dstga", [(2, 6), (3, 6)]),
        ("mhsa", [(2, 6), (3, 7)]),
    ],
)
def test_dynamic_compile_keeps_sizes_symbolic(attention, shapes, tiny_config_kwargs, monkeypatch):
    """A block compiled with dynamic shapes (as torch.compile does by itself once a size changes, e.g. at an
    epoch's last, smaller batch) serves other batch sizes and, for STGA and MHSA, frame counts without recompiling,
    with the eager block's output and gradients: nothing in the kernels (nor in the keys' and values' unpacking,
    which orders the projection's strides) pins a size to its traced value (torch 2.11 fails outright on such a pin
    inside an autograd function). STGA runs the portable spatial kernel here, as on GPUs (the CPU flash kernel is
    the other path); MHSA runs SDPA, as a TiMoModel would."""
    monkeypatch.setattr(attention_fast, "_CPU_FLASH", None)
    torch.manual_seed(0)
    config = TiMoConfig(**tiny_config_kwargs, attn_implementation="sdpa")
    layer = TiMoLayer(config, 16, 2, attention, 0.0).to(DEVICE).train()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch, frames in shapes:
            compiled_block_matches_eager(layer, compiled, batch, frames)


