"""The Accelerate launch configurations of `training/accelerate/` (DDP, multi-node DDP, FSDP, DeepSpeed ZeRO-2/3).

Every YAML goes through what `accelerate launch --config_file <yaml>` does before it starts processes (config
parsing with unknown-key rejection, `_validate_launch_command`, the environment handed to the workers), and the FSDP
plugin the workers build from that environment resolves its auto-wrap class on a real TiMo model. The DeepSpeed
JSON files are checked structurally here and validated by DeepSpeed itself when `deepspeed` is installed.
"""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.deepspeed import HfDeepSpeedConfig
from accelerate.utils.launch import prepare_multi_gpu_env

from timo_hf import (
    TiMoConfig,
    TiMoForImageClassification,
    TiMoForMaskedImageModeling,
    modeling_timo,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "accelerate"
EXPECTED = {
    "ddp_single_node.yaml": DistributedType.MULTI_GPU,
    "ddp_multi_node.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
    "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
}


def validated_launch_args(name: str):
    """The arguments `accelerate launch --config_file <name> train.py` would run with (no process is started)."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
    return _validate_launch_command(args)


def test_every_variant_is_shipped_and_nothing_else():
    assert sorted(path.name for path in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_yaml_parses_as_accelerate_config(name):
    config = ClusterConfig.from_yaml_file(str(CONFIGS / name))  # raises on keys accelerate does not know
    assert config.distributed_type == EXPECTED[name]
    assert config.use_cpu is False
    assert config.num_processes >= 2
    args, _, mixed_precision_from_config = validated_launch_args(name)
    assert args.num_processes == config.num_processes
    if EXPECTED[name] == DistributedType.DEEPSPEED:
        # with a deepspeed_config_file, a mixed_precision in the YAML makes DeepSpeedPlugin raise in every worker
        assert config.mixed_precision is None and not mixed_precision_from_config
        assert args.use_deepspeed
    else:
        assert config.mixed_precision == "bf16"
        assert args.use_fsdp == (EXPECTED[name] == DistributedType.FSDP)
        assert args.multi_gpu == (EXPECTED[name] == DistributedType.MULTI_GPU)


def test_multi_node_ddp_names_a_rendezvous():
    config = ClusterConfig.from_yaml_file(str(CONFIGS / "ddp_multi_node.yaml"))
    single = ClusterConfig.from_yaml_file(str(CONFIGS / "ddp_single_node.yaml"))
    assert config.num_machines >= 2 and single.num_machines == 1
    assert config.num_processes % config.num_machines == 0  # total processes, evenly split over machines
    assert config.main_process_ip and config.main_process_port


def test_fsdp_environment_builds_a_full_shard_bf16_plugin_wrapping_timo_layers(monkeypatch):
    args, _, _ = validated_launch_args("fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"

    plugin = FullyShardedDataParallelPlugin()  # what each worker's Accelerator builds from that environment
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FULL_SHARD
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.transformer_cls_names_to_wrap == ["TiMoLayer"]
    assert isinstance(modeling_timo.TiMoLayer, type)

    tiny = TiMoConfig(hidden_sizes=[16, 32, 48, 64], num_heads=[2, 2, 4, 4], depths=[1, 1, 2, 1])
    for model_class in (TiMoForMaskedImageModeling, TiMoForImageClassification):
        with torch.device("meta"):
            model = model_class(tiny)
        plugin.set_auto_wrap_policy(model)  # raises if no module of the model has that class name
        wrapped = plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
        assert wrapped == {modeling_timo.TiMoLayer}
        blocks = [module for module in model.modules() if isinstance(module, modeling_timo.TiMoLayer)]
        decoder = tiny.mim_decoder_depth if model_class is TiMoForMaskedImageModeling else 0
        assert len(blocks) == sum(tiny.depths) + decoder  # every encoder block (and MIM decoder block) is a unit


def auto_bucket_sizes() -> dict:
    """The "auto" ZeRO bucket sizes as accelerate fills them from TiMo-Base's hidden size before DeepSpeed sees them."""
    hidden = max(TiMoConfig.from_preset("base").hidden_sizes)
    return {
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
    }


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_are_consistent(stage):
    config = ClusterConfig.from_yaml_file(str(CONFIGS / f"deepspeed_zero{stage}.yaml"))
    json_path = REPO / config.deepspeed_config["deepspeed_config_file"]  # relative to the repository root
    assert json_path == CONFIGS / f"deepspeed_zero{stage}.json" and json_path.is_file()
    assert config.deepspeed_config["zero3_init_flag"] is (stage == 3)
    raw = json.loads(json_path.read_text())
    assert raw["bf16"]["enabled"] is True and not raw.get("fp16", {}).get("enabled", False)
    # the training scripts prepare no DataLoader: "auto" cannot be resolved for the micro batch
    assert isinstance(raw["train_micro_batch_size_per_gpu"], int)
    assert raw["gradient_clipping"] == 0.0
    parsed = HfDeepSpeedConfig(str(json_path))  # accelerate's reader, as DeepSpeedPlugin uses it
    assert parsed.get_value("zero_optimization.stage") == stage
    # accumulation comes from the scripts' Accelerator(gradient_accumulation_steps=...), as accelerate fills it
    plugin = DeepSpeedPlugin(hf_ds_config=str(json_path))
    plugin.deepspeed_config_process(
        must_match=False, gradient_accumulation_steps=4, gradient_clipping=1.0, **auto_bucket_sizes()
    )
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 4
    assert plugin.deepspeed_config["gradient_clipping"] == 0.0  # explicit values are kept
    assert parsed.is_zero3() == (stage == 3)
    if stage == 3:
        assert raw["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_accepts_the_configs(stage):
    deepspeed = pytest.importorskip(
        "deepspeed", reason="deepspeed is not installed (optional: pip install deepspeed); its own validation skipped"
    )
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads((CONFIGS / f"deepspeed_zero{stage}.json").read_text())
    zero = raw["zero_optimization"]
    for key, value in auto_bucket_sizes().items():
        key = key.removeprefix("zero_optimization.")
        if zero.get(key) == "auto":
            zero[key] = value
    raw["gradient_accumulation_steps"] = 2  # filled by accelerate from training.gradient_accumulation_steps
    parsed = DeepSpeedConfig(raw)
    assert parsed.zero_optimization_stage == stage
    bf16 = getattr(parsed, "bfloat16_config", None)  # deepspeed >= 0.18; older: `bfloat16_enabled`
    assert bf16.enabled if bf16 is not None else parsed.bfloat16_enabled
    assert parsed.gradient_accumulation_steps == 2
    assert parsed.train_micro_batch_size_per_gpu == raw["train_micro_batch_size_per_gpu"]
    assert deepspeed.__version__


def test_memory_table_arithmetic():
    """`benchmarks.scale_table` (the README's memory and time tables): byte counts per variant and the time formula."""
    from benchmarks.scale_table import VARIANTS, format_tables, state_bytes

    params, gpus, unit = 1_000_000, 8, 10_000
    state = {variant: state_bytes(variant, params, gpus, unit) for variant in VARIANTS}
    ddp, fsdp, zero2, zero3 = (sum(state[v].values()) for v in VARIANTS)
    assert ddp == 16 * params  # fp32 weights + fp32 gradients + AdamW exp_avg and exp_avg_sq
    assert fsdp == 16 * params / gpus + 4 * unit  # all sharded, + two gathered bf16 units
    assert zero3 == 16 * params / gpus + 4 * unit
    assert zero2 == 2 * params + 14 * params / gpus  # bf16 weights replicated, the rest sharded
    assert fsdp < zero2 < ddp

    facts = [{"preset": "x", "parameters": params, "encoder_parameters": params, "largest_unit": unit,
              "flops_forward": 10**9, "flops_total": 3 * 10**9, "activation_bytes_per_sample": 2**20}]
    text = format_tables(facts, gpus=8, batch=64, peaks=[("G", 100.0)], mfu=0.5)
    # 3 GFLOPs x 10M samples = 30 PFLOPs; / (8 x 100 TFLOP/s) = 37.5 s ideal, 75 s at MFU 0.5 -> 133,333 samples/s
    assert "| x | 30 | 0.01 / 0.02 h, 133,333/s |" in text


def fsdp_tiny_config() -> TiMoConfig:
    return TiMoConfig(hidden_sizes=[16, 32, 48, 64], num_heads=[2, 2, 4, 4], depths=[1, 1, 1, 1], num_channels=2,
                      mask_unit_size=16, mim_decoder_hidden_size=32, mim_decoder_depth=1, mim_decoder_num_heads=2)


def fsdp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(4, 2, 2, 32, 32, generator=generator)
    noise = torch.rand(4, 2 * 2 * 2, generator=generator)  # T x (H / 16) x (W / 16) mask units
    return pixel_values, noise


def fsdp_worker(rank: int, world_size: int, port: int, wrap_class_name: str, output: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = TiMoForMaskedImageModeling(fsdp_tiny_config())
        wrap_class = getattr(modeling_timo, wrap_class_name)
        units = [module for module in model.modules() if isinstance(module, wrap_class)]
        for unit in units:  # what fsdp.yaml asks for: one FSDP2 unit per TiMoLayer, full shard, root unit last
            fully_shard(unit, reshard_after_forward=True)
        fully_shard(model, reshard_after_forward=True)
        sharded = all(p.to_local().shape[0] < p.shape[0] for p in model.parameters() if p.dim() == 2 and p.shape[0] > 1)
        pixel_values, noise = fsdp_batch()
        per_rank = pixel_values.shape[0] // world_size
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        grads = []
        for _ in range(2):  # two optimizer steps: the second forward runs on updated, re-gathered shards
            model(pixel_values=pixel_values[rows], noise=noise[rows]).loss.backward()
            grads.append({name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None})
            optimizer.step()
            optimizer.zero_grad()
        weights = {name: p.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:
            torch.save({"grads": grads, "weights": weights, "units": len(units), "sharded": sharded}, output)
    finally:
        dist.destroy_process_group()


def test_fsdp2_on_two_gloo_processes_matches_single_process_gradients(tmp_path):
    """TiMo sharded with torch FSDP2 as `fsdp.yaml` configures it, on 2 CPU processes (gloo), gives for two AdamW
    steps the gradients and weights of one process that runs both halves of the batch and averages (data
    parallelism; BatchNorm in the stem makes the full-batch gradient differ, as under DDP). accelerate 1.15 cannot run this: with ACCELERATE_USE_CPU its state
    becomes MULTI_CPU and it wraps in DDP, ignoring the FSDP plugin (FSDP is only enabled for GPU-like types)."""
    import torch.multiprocessing as mp

    config = ClusterConfig.from_yaml_file(str(CONFIGS / "fsdp.yaml"))
    wrap_class_name = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = tmp_path / "rank0.pt"
    mp.spawn(fsdp_worker, args=(2, port, wrap_class_name, str(output)), nprocs=2)
    result = torch.load(output)
    assert result["units"] == 4 + 1 and result["sharded"]

    torch.manual_seed(0)
    model = TiMoForMaskedImageModeling(fsdp_tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pixel_values, noise = fsdp_batch()
    for step in range(2):
        for half in (slice(0, 2), slice(2, 4)):
            (model(pixel_values=pixel_values[half], noise=noise[half]).loss / 2).backward()
        expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert set(result["grads"][step]) == set(expected) and len(expected) == len(list(model.parameters()))
        for name, grad in expected.items():
            torch.testing.assert_close(result["grads"][step][name], grad, rtol=1e-5, atol=1e-6, msg=name)
        optimizer.step()
        optimizer.zero_grad()
    for name, weight in model.named_parameters():
        torch.testing.assert_close(result["weights"][name], weight.detach(), rtol=1e-5, atol=1e-6, msg=name)
