"""TiMoModel / TiMoBackbone behaviour: shapes, inputs, attention semantics, save/load and Auto classes."""

import pytest
import torch
from transformers import AutoBackbone, AutoConfig, AutoModel

from timo_hf import (
    TiMoBackbone,
    TiMoConfig,
    TiMoForImageClassification,
    TiMoForMaskedImageModeling,
    TiMoForSemanticSegmentation,
    TiMoModel,
)
from timo_hf.modeling_timo import TiMoAttention


@pytest.fixture
def config(tiny_config_kwargs):
    return TiMoConfig(**tiny_config_kwargs)


@pytest.fixture
def model(config):
    torch.manual_seed(0)
    return TiMoModel(config).eval()


def stage_sizes(size: int) -> list[int]:
    """Grid sizes after the stem (7x7/2 p3 then 2x2/2) and each 3x3/2 p1 conv."""
    size = (size + 1) // 2 // 2
    sizes = [size]
    for _ in range(3):
        size = (size + 1) // 2
        sizes.append(size)
    return sizes


@pytest.mark.parametrize("num_frames, height, width", [(1, 32, 32), (2, 48, 80), (5, 37, 53), (3, 64, 64)])
def test_output_shapes_for_any_time_and_frame_size(model, config, num_frames, height, width):
    with torch.no_grad():
        outputs = model(torch.randn(2, num_frames, 3, height, width), output_hidden_states=True)
    heights, widths = stage_sizes(height), stage_sizes(width)
    assert outputs.last_hidden_state.shape == (2, num_frames, 64, heights[-1], widths[-1])
    assert outputs.pooler_output.shape == (2, 64)
    assert torch.allclose(outputs.pooler_output, outputs.last_hidden_state.mean(dim=(1, 3, 4)))
    expected = [(2, num_frames, 16, heights[0], widths[0])] + [
        (2, num_frames, c, h, w) for c, h, w in zip(config.hidden_sizes, heights, widths)
    ]
    assert [tuple(h.shape) for h in outputs.hidden_states] == expected
    assert torch.isfinite(outputs.last_hidden_state).all()


def test_hidden_states_only_on_request(model):
    with torch.no_grad():
        assert model(torch.randn(1, 2, 3, 32, 32)).hidden_states is None


def test_default_temporal_positions_are_frame_indices(model):
    pixel_values = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        default = model(pixel_values).last_hidden_state
        explicit = model(pixel_values, temporal_positions=torch.arange(3.0).expand(2, 3)).last_hidden_state
        in_days = model(pixel_values, temporal_positions=torch.tensor([[0.0, 30.0, 75.0]] * 2)).last_hidden_state
    assert torch.equal(default, explicit)
    assert not torch.allclose(default, in_days)


def test_flattened_time_channel_input_equals_five_dimensional(model):
    pixel_values = torch.randn(2, 3, 3, 32, 48)
    with torch.no_grad():
        five = model(pixel_values).last_hidden_state
        four = model(pixel_values.flatten(1, 2)).last_hidden_state
    assert torch.equal(five, four)


def test_samples_are_independent_in_eval(model):
    pixel_values = torch.randn(3, 2, 3, 32, 32)
    with torch.no_grad():
        batched = model(pixel_values).last_hidden_state
        single = model(pixel_values[1:2]).last_hidden_state
    assert torch.allclose(batched[1:2], single, atol=1e-5)


@pytest.mark.parametrize(
    "pixel_values, kwargs, message",
    [
        (torch.randn(3, 32, 32), {}, "pixel_values must be \\[batch, time, channels"),
        (torch.randn(1, 2, 3, 4, 32, 32), {}, "pixel_values must be \\[batch, time, channels"),
        (torch.randn(1, 2, 4, 32, 32), {}, "4 channels .* config.num_channels = 3"),
        (torch.randn(1, 2, 3, 16, 32), {}, "at least 32x32 pixels, got 16x32"),
        (torch.randint(0, 255, (1, 2, 3, 32, 32)), {}, "floating-point .* torch.int64"),
        (torch.randn(1, 2, 3, 32, 32), {"temporal_positions": torch.zeros(1, 3)}, "temporal_positions .* \\(1, 2\\)"),
    ],
    ids=["rank3", "rank6", "channels", "too-small", "integer-dtype", "time-mismatch"],
)
def test_bad_inputs_raise_value_errors_naming_the_problem(model, pixel_values, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(pixel_values, **kwargs)


@pytest.mark.parametrize(
    "model_class",
    [TiMoModel, TiMoBackbone, TiMoForImageClassification, TiMoForSemanticSegmentation, TiMoForMaskedImageModeling],
)
def test_forward_refuses_unknown_keywords_and_outputs_it_does_not_return(tiny_config_kwargs, model_class):
    torch.manual_seed(0)
    model = model_class(TiMoConfig(**tiny_config_kwargs, num_labels=3)).eval()
    pixel_values = torch.randn(1, 2, 3, 64, 64)
    with pytest.raises(TypeError, match=f"{model_class.__name__}.forward\\(\\) got unexpected keyword arguments: lables"):
        model(pixel_values, lables=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=f"{model_class.__name__} cannot return output_attentions"):
        model(pixel_values, output_attentions=True)
    # What transformers' generic code and `model(**processor_outputs)` pass along is accepted.
    with torch.no_grad():
        model(pixel_values, output_attentions=False, valid_mask=torch.ones(1, 2, 64, 64, dtype=torch.bool))


@pytest.mark.parametrize(
    "model_dtype, input_dtype",
    [(torch.bfloat16, torch.float32), (torch.float32, torch.float64), (torch.float64, torch.float32)],
    ids=["bf16-model-fp32-pixels", "fp32-model-fp64-pixels", "fp64-model-fp32-pixels"],
)
def test_floating_pixels_are_cast_to_the_model_dtype(model, model_dtype, input_dtype):
    """A processor's float32 pixels feed a model loaded in another dtype, as they would the same pixels cast first."""
    model = model.to(model_dtype)
    pixel_values = torch.randn(1, 2, 3, 32, 32, dtype=input_dtype)
    with torch.no_grad():
        given = model(pixel_values).last_hidden_state
        cast_first = model(pixel_values.to(model_dtype)).last_hidden_state
    assert given.dtype == model_dtype
    assert torch.equal(given, cast_first)


def test_non_finite_check_is_opt_in(tiny_config_kwargs):
    pixel_values = torch.randn(1, 2, 3, 32, 32)
    pixel_values[0, 1, 2, 5, 5] = float("nan")
    unchecked = TiMoModel(TiMoConfig(**tiny_config_kwargs)).eval()
    with torch.no_grad():
        unchecked(pixel_values)  # default: no extra reduction, NaN propagates
    checked = TiMoModel(TiMoConfig(check_finite_inputs=True, **tiny_config_kwargs)).eval()
    with pytest.raises(ValueError, match="NaN or inf"):
        checked(pixel_values)


def test_every_parameter_gets_a_gradient(tiny_config_kwargs):
    torch.manual_seed(0)
    model = TiMoModel(TiMoConfig(**tiny_config_kwargs)).train()
    model(torch.randn(2, 3, 3, 32, 32)).last_hidden_state.square().mean().backward()
    without = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without == []


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config_kwargs):
    torch.manual_seed(0)
    model = TiMoModel(TiMoConfig(**tiny_config_kwargs)).train()
    pixel_values = torch.randn(2, 3, 3, 32, 32)

    def grads():
        model.zero_grad()
        model(pixel_values).last_hidden_state.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.encoder.stages[0].layers)
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_batch_once_in_batchnorm(tiny_config_kwargs, reentrant):
    """The recomputation in backward normalises as the forward did but leaves BatchNorm's running statistics (the
    D-STGA offsets') as one step of training leaves them without checkpointing: counted once, momentum 0.1."""
    import copy

    torch.manual_seed(0)
    plain = TiMoModel(TiMoConfig(**tiny_config_kwargs)).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    pixel_values = torch.randn(2, 3, 3, 32, 32)
    for model in (plain, checkpointed):
        model(pixel_values).last_hidden_state.square().mean().backward()
    norm = checkpointed.encoder.stages[0].layers[0].attention.query_offset.norm
    assert int(norm.num_batches_tracked) == 1
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_drop_path_rates_increase_linearly(tiny_config_kwargs):
    model = TiMoModel(TiMoConfig(drop_path_rate=0.3, **tiny_config_kwargs))
    rates = [layer.drop_path.drop_prob for stage in model.encoder.stages for layer in stage.layers]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_mhsa_through_sdpa_equals_eager(tiny_config_kwargs):
    torch.manual_seed(0)
    config = TiMoConfig(**{**tiny_config_kwargs, "attention_types": ["mhsa"] * 4})
    model = TiMoModel(config).eval()
    pixel_values = torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        sdpa = model(pixel_values).last_hidden_state
        model.set_attn_implementation("eager")
        eager = model(pixel_values).last_hidden_state
    assert model.config._attn_implementation == "eager"
    assert torch.allclose(sdpa, eager, atol=1e-5)


# --- attention semantics against a literal, per-query transcription of the equations (official-timo.md 1.7-1.8)


def naive_spatiotemporal_attention(attention: TiMoAttention, hidden_states: torch.Tensor, num_frames: int):
    """Loop over every query: logits [T temporal (own frame excluded), N spatial], one softmax, no scaling."""
    batch_size, length, dim = hidden_states.shape
    heads, head_dim, tokens = attention.num_heads, attention.head_dim, length // num_frames
    q = attention.query(hidden_states).view(batch_size, num_frames, tokens, heads, head_dim)
    kv = attention.key_value(hidden_states).view(batch_size, num_frames, tokens, 2, heads, head_dim)
    k, v = kv[..., 0, :, :], kv[..., 1, :, :]
    if attention.attention_type == "dstga":
        q_sorted = q.sort(dim=1).values
        k_sorted = k.sort(dim=1).values
        lower_middle = (num_frames - 1) // 2
        q_med, k_med = q_sorted[:, lower_middle], k_sorted[:, lower_middle]
        offset_layer = attention.query_offset
        deviation = torch.einsum("btnhd,d->btnh", q - q_med[:, None], offset_layer.projection.weight[0])
        norm = offset_layer.norm
        offset = torch.relu((deviation - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias)
    out = torch.zeros(batch_size, num_frames, tokens, heads, head_dim, dtype=hidden_states.dtype)
    for b in range(batch_size):
        for h in range(heads):
            for t in range(num_frames):
                for n in range(tokens):
                    temporal = torch.stack(
                        [q[b, t, n, h] @ k[b, s, n, h] if s != t else torch.tensor(float("-inf"), dtype=q.dtype)
                         for s in range(num_frames)]
                    )
                    if attention.attention_type == "stga":
                        spatial = k[b, t, :, h] @ q[b, t, n, h]
                    else:
                        spatial = k_med[b, :, h] @ q_med[b, n, h] + offset[b, t, n, h]
                    weights = torch.cat([temporal, spatial]).softmax(0)
                    out[b, t, n, h] = weights[:num_frames] @ v[b, :, n, h] + weights[num_frames:] @ v[b, t, :, h]
    return attention.projection(out.reshape(batch_size, length, dim))


@pytest.mark.parametrize("attention_type", ["stga", "dstga"])
@pytest.mark.parametrize("num_frames", [1, 2, 3, 4])
def test_spatiotemporal_attention_matches_the_equations(attention_type, num_frames):
    torch.manual_seed(num_frames)
    config = TiMoConfig(hidden_sizes=[8, 16, 24, 32], num_heads=[2, 2, 2, 2], depths=[1, 1, 1, 1])
    attention = TiMoAttention(config, dim=8, num_heads=2, attention_type=attention_type).double().eval()
    if attention.query_offset is not None:
        # Non-trivial offset branch: random projection, shifted BN statistics, so the ReLU is active for some queries.
        torch.nn.init.normal_(attention.query_offset.projection.weight, std=2.0)
        attention.query_offset.norm.running_mean.fill_(0.3)
        attention.query_offset.norm.running_var.fill_(0.5)
        attention.query_offset.norm.weight.data.fill_(1.5)
        attention.query_offset.norm.bias.data.fill_(0.2)
    hidden_states = torch.randn(2, num_frames * 6, 8, dtype=torch.float64) * 2
    with torch.no_grad():
        expected = naive_spatiotemporal_attention(attention, hidden_states, num_frames)
        actual = attention(hidden_states, num_frames)
    assert torch.allclose(actual, expected, atol=1e-10, rtol=0)


def test_dstga_offset_changes_the_output():
    torch.manual_seed(0)
    config = TiMoConfig(hidden_sizes=[8, 16, 24, 32], num_heads=[2, 2, 2, 2], depths=[1, 1, 1, 1])
    attention = TiMoAttention(config, dim=8, num_heads=2, attention_type="dstga").eval()
    hidden_states = torch.randn(1, 3 * 6, 8)
    attention.query_offset.norm.bias.data.fill_(3.0)  # ReLU(... + 3) > 0: the offset is active
    with torch.no_grad():
        with_offset = attention(hidden_states, 3)
        attention.query_offset.norm.bias.data.fill_(-100.0)  # ReLU clamps every offset to 0
        without_offset = attention(hidden_states, 3)
    assert (with_offset - without_offset).abs().max() > 1e-3


# --- save / load and Auto classes


def assert_same_state(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.mark.parametrize("model_class", [TiMoModel, TiMoBackbone])
def test_save_and_load_round_trip_is_bit_exact(tmp_path, tiny_config_kwargs, model_class):
    torch.manual_seed(0)
    model = model_class(TiMoConfig(out_features=["stage2", "stage4"], **tiny_config_kwargs)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    reloaded = model_class.from_pretrained(tmp_path).eval()
    assert_same_state(model, reloaded)
    pixel_values = torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        before, after = model(pixel_values), reloaded(pixel_values)
    first = before[0][0] if model_class is TiMoBackbone else before[0]
    second = after[0][0] if model_class is TiMoBackbone else after[0]
    assert torch.equal(first, second)


def test_auto_classes_after_import(tmp_path, tiny_config_kwargs):
    config = TiMoConfig(out_features=["stem", "stage1", "stage4"], **tiny_config_kwargs)
    config.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), TiMoConfig)
    assert isinstance(AutoModel.from_config(config), TiMoModel)
    backbone = AutoBackbone.from_config(config).eval()
    assert isinstance(backbone, TiMoBackbone)
    assert backbone.channels == [16, 16, 64]
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, 3, 64, 64)).feature_maps
    assert [tuple(m.shape) for m in maps] == [(6, 16, 16, 16), (6, 16, 16, 16), (6, 64, 2, 2)]


def test_backbone_matches_the_model(tiny_config_kwargs):
    torch.manual_seed(0)
    config = TiMoConfig(out_features=["stage4"], **tiny_config_kwargs)
    backbone = TiMoBackbone(config).eval()
    model = TiMoModel(config).eval()
    model.load_state_dict({k.removeprefix("timo."): v for k, v in backbone.state_dict().items()})
    pixel_values = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        (stage4,) = backbone(pixel_values).feature_maps
        last = model(pixel_values).last_hidden_state
    assert torch.equal(stage4, last.flatten(0, 1))
