"""FLOP counting (`timo_hf.flops`): closed-form attention counts, CPU SDPA counted, paper Table 7 reproduced."""

import sys
from pathlib import Path

import pytest
import torch

from timo_hf import TiMoConfig, TiMoModel
from timo_hf.flops import TABLE7_GFLOPS, count_flops, table7


ROOT = Path(__file__).resolve().parents[1]


def closed_form_attention_flops(config: TiMoConfig, batch: int, frames: int, height: int, width: int) -> int:
    """Attention-core FLOPs (logits and weighted sums, 2 per multiply-add) of one forward pass, per the equations."""
    grid_h, grid_w = (height + 3) // 4, (width + 3) // 4
    total = 0
    for stage, (width_c, attention, depth) in enumerate(zip(config.hidden_sizes, config.attention_types, config.depths)):
        if stage > 0:
            grid_h, grid_w = (grid_h + 1) // 2, (grid_w + 1) // 2
        tokens, heads = grid_h * grid_w, config.num_heads[stage]
        head_dim = width_c // heads
        if attention == "mhsa":
            length = frames * tokens
            per_block = 4 * batch * width_c * length * length
        elif attention == "stga":
            per_block = 4 * batch * width_c * frames * tokens * (tokens + frames)
        else:  # shared logits, per-frame spatial sums, temporal logits and sums, offset projection (d -> 1) of
            # the queries and of their medians (in float32 the module projects both, then subtracts)
            per_block = (
                2 * batch * width_c * tokens * tokens
                + 2 * batch * width_c * frames * tokens * tokens
                + 4 * batch * width_c * frames * frames * tokens
                + 2 * batch * heads * (frames + 1) * tokens * head_dim
            )
        total += depth * per_block
    return total


@pytest.mark.parametrize("implementation", ["reference", "fast"])
def test_counted_attention_flops_match_closed_form(tiny_config_kwargs, implementation):
    config = TiMoConfig(**tiny_config_kwargs, stga_implementation=implementation)
    model = TiMoModel(config)
    # Real CPU tensors: MHSA runs the CPU SDPA kernel. 5 frames: the fast kernels unroll the temporal products of up
    # to 4 frames into element-wise operations, which (like softmax) are not counted.
    counted = count_flops(model, torch.randn(2, 5, 3, 64, 48))
    assert counted["attention"] == closed_form_attention_flops(config, 2, 5, 64, 48)
    assert counted["total"] == counted["forward"] and counted["backward"] == 0
    assert set(counted["by_stage"]) == {"embeddings", "stage1", "stage2", "stage3", "stage4"}


def test_cpu_sdpa_is_counted():
    """FlopCounterMode alone counts 0 for scaled_dot_product_attention on CPU; count_flops must not."""
    config = TiMoConfig(hidden_sizes=[16, 32], num_heads=[2, 2], depths=[1, 1], attention_types=["mhsa", "mhsa"])
    counted = count_flops(TiMoModel(config), torch.randn(1, 2, 3, 32, 32))
    assert counted["attention"] == closed_form_attention_flops(config, 1, 2, 32, 32) > 0


def test_meta_device_count_equals_cpu_count(tiny_config_kwargs):
    model = TiMoModel(TiMoConfig(**tiny_config_kwargs))
    pixel_values = torch.randn(1, 2, 3, 64, 64)
    on_cpu, on_meta = count_flops(model, pixel_values), count_flops(model, pixel_values, on_meta=True)
    for key in ("total", "attention", "by_stage"):  # by_operator differs: meta runs SDPA as plain matmuls
        assert on_cpu[key] == on_meta[key], key


def test_backward_is_counted_and_training_mode_restored(tiny_config_kwargs):
    model = TiMoModel(TiMoConfig(**tiny_config_kwargs)).train()
    counted = count_flops(model, torch.randn(1, 2, 3, 32, 32), backward=True)
    assert counted["backward"] > counted["forward"] > 0
    assert counted["total"] == counted["forward"] + counted["backward"]
    assert model.training


@pytest.mark.slow
def test_table7_reference_within_one_percent_of_official():
    sys.path.insert(0, str(ROOT))
    from benchmarks.flops_table7 import format_table7

    rows = table7()
    assert [row["layout"] for row in rows] == ["M-M-M-M", "S-M-M-M", "D-M-M-M", "D-D-M-M", "D-D-D-M", "D-D-D-D"]
    for row, (official, paper) in zip(rows, TABLE7_GFLOPS.values()):
        assert row["official_gflops"] == official and row["paper_gflops"] == paper
        assert abs(row["gflops"] / official - 1) <= 0.01, row
    table = format_table7(rows)
    assert "| D-D-M-M | 185.63 |" in table and "372.6" in table


def test_table7_script_outside_the_paper_setting(capsys):
    """The benchmark script's Table-7 path at test size: no official / paper column where the paper has none."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.flops_table7 import main

    rows = main(["--shape", "1", "2", "3", "32", "32"])
    assert len(rows) == 6 and all(row["official_gflops"] is None and row["paper_gflops"] is None for row in rows)
    by_layout = {row["layout"]: row["gflops"] for row in rows}
    assert by_layout["M-M-M-M"] > by_layout["S-M-M-M"] > by_layout["D-M-M-M"] > by_layout["D-D-M-M"]
    assert "| D-D-M-M |" in capsys.readouterr().out


def test_in_place_products_are_counted_so_block_size_does_not_change_the_count(monkeypatch):
    """The fast spatial backward accumulates over its blocks with `baddbmm_`, which FlopCounterMode alone counts as 0:
    counted with `flop_formulas`, the backward costs the same FLOPs in one block or in many."""
    from torch.utils.flop_counter import FlopCounterMode

    from timo_hf import attention_fast
    from timo_hf.flops import flop_formulas

    query, key = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    value = torch.randn(1, 2, 64, 24)  # wider values than queries: the portable kernel, not CPU flash
    output, lse = attention_fast.spatial_attention_forward(query, key, value)
    grad = torch.randn_like(output)

    def counted_backward_flops():
        with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
            attention_fast.spatial_attention_backward(grad, query, key, value, output, lse)
        return counter.get_total_flops()

    one_block = counted_backward_flops()
    monkeypatch.setattr(attention_fast, "BLOCK_ELEMENTS", 16 * 64)
    monkeypatch.setattr(attention_fast, "SMALL_BLOCK_ELEMENTS", 16 * 64)
    assert counted_backward_flops() == one_block > 0
