#!/usr/bin/env python
"""Masked-image-modelling pre-training of TiMo (official objective, official-timo.md section 2) with accelerate.

    accelerate launch training/pretrain.py --config training/configs/<name>.yaml [--section.key value ...]

One CPU, several CPU processes (`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...`) or many
GPUs run the same script. Settings come from the defaults below, then the YAML file, then `--section.key value`
overrides (`--key value` when only one section has the key, e.g. `--max_steps 100`, `--resume latest`,
`--push_to_hub user/timo-mim`). `model.config` takes any `TiMoConfig` field (with `model.preset` as the base).

Continued pre-training on other bands: where the start (`model.pretrained`) names its bands (its saved image
processor, or `model.pretrained_bands`) and the data's image processor names its own, and the two differ but share
a band, the stem and the decoder's pixel prediction are carried over band by band (`timo_hf.band_adaptation`):
shared bands keep their weights, new ones start at zero (`model.new_band_weights: random` for the model's
initialisation); `model.adapt_bands: false` turns this off.

Writes under `training.output_dir`: `checkpoints/step_<N>` (`accelerator.save_state`, every `save_steps`, the
newest `save_total_limit` kept), `logs/metrics.jsonl` (loss, lr, samples/s per step; TensorBoard too when
installed), `loss_curve.png`, `run_summary.json` (final loss, parameter digests) and `model/` (the final
`save_pretrained` folder: config, safetensors, image-processor config, model card).

`--resume latest` (or a checkpoint folder) continues exactly where the run stopped, mid-epoch included: the data
order, the frame draws and the masks are functions of (seed, step, sample slot), and the checkpoint restores model,
optimizer and RNG states. The same holds across process counts when the per-device batch and the effective batch
stay the same (save on 2 processes, resume on 1 with `gradient_accumulation_steps` doubled, and the reverse).
`training.stop_at_step` ends a run after that step with a checkpoint, keeping the schedule of `max_steps` (for
time-limited jobs that resume later).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CheckpointError,
    check_band_settings,
    check_fields,
    config_fields,
    derive_seed,
    end_training,
    flatten_settings,
    full_state_dict,
    is_sharded,
    load_yaml,
    make_trackers,
    merge_config,
    open_checkpoints,
    optimizer_step,
    parse_cli_overrides,
    plan_band_adaptation,
    plot_loss_curve,
    push_folder_to_hub,
    scaled_learning_rate,
    set_learning_rate,
    settings_parser,
    state_digest,
    truncate_logs_after,
    warmup_cosine_lr,
    weight_decay_param_groups,
)
from pretrain_data import build_batches, load_data_state, make_processor, open_source, save_data_state  # noqa: E402

from timo_hf import TiMoConfig, TiMoForMaskedImageModeling, adapt_input_bands  # noqa: E402


logger = logging.getLogger("timo_hf.pretrain")

DEFAULTS = {
    "model": {
        "preset": None,  # "base" | "large" | "huge": start from an official size
        "pretrained": None,  # a TiMoForMaskedImageModeling folder or Hub id to continue pre-training from
        "config": {},  # TiMoConfig fields (override the preset / the pretrained config)
        "adapt_bands": True,  # input layers matched to the data's bands by name (see the module docstring)
        "pretrained_bands": None,  # the start's bands in stem order; default: its image processor's band_names
        "new_band_weights": "zeros",  # weights of bands the start has not seen: "zeros" | "random"
    },
    "data": {
        "source": "npy",  # "timo" (timo_hf.data.load_timo_dataset) | "npy" (folder of .npy series)
        "path": None,  # raw data_dir of a timo_hf builder, or the .npy folder
        "name": None,  # "timo": dataset name ("millionst", ...), exported Parquet folder, or Hub dataset id
        "split": "train",
        "streaming": False,
        "options": {},  # builder options for load_timo_dataset (e.g. layout: npy, bands: [B4, B3, B2])
        "band_names": None,  # the series' bands in order (.npy series name none); default: the examples' own
        "num_frames": 3,  # frames drawn per series per step (paper Table 8: 3 of 10); null = all frames
        "temporal_order": "sorted",  # "sorted" (chronological) | "random" (official draw order)
        "short_series": "error",  # series with fewer frames than num_frames: "error" | "repeat" (with replacement)
        "image_size": None,  # [H, W] to resize to (official: 224 x 224); multiples of model mask_unit_size
        "processor": None,  # a saved TiMoImageProcessor (folder or Hub id); else built from `normalization`
        "normalization": "auto",  # "auto" (stats of the first samples) | processor preset | {mean, std} | "none"
        "normalization_samples": 64,
        "shuffle_buffer": 256,  # streaming only: examples shuffled together (a seeded block shuffle)
        "stream_resume": "exact",  # streaming: "exact" (re-read one block) | "fast" (skip the rest of the block)
        "num_workers": 0,
    },
    "training": {
        "output_dir": "runs/pretrain",
        "overwrite_output_dir": False,
        "seed": 0,
        "max_steps": None,  # optimizer steps; or num_epochs for map-style data
        "num_epochs": None,
        "per_device_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "base_lr": 1.5e-4,  # lr = base_lr * effective_batch / 256 unless lr is given
        "lr": None,
        "min_lr": 0.0,
        "warmup_steps": None,  # default: warmup_ratio of the run
        "warmup_ratio": 0.1,
        "weight_decay": 0.05,
        "betas": [0.9, 0.95],
        "max_grad_norm": None,  # gradient clipping (off by default, as official)
        "mixed_precision": None,  # "no" | "bf16" | "fp16"; None: what `accelerate launch` says
        "activation_checkpointing": False,
        "logging_steps": 1,
        "save_steps": 500,
        "save_total_limit": 3,
        "resume": None,  # "latest" or a checkpoint folder
        "stop_at_step": None,
        "push_to_hub": None,  # a Hub repository id for the final folder
    },
}


def parse_args(argv: list[str] | None = None) -> dict:
    parser = settings_parser(__doc__.split("\n\n")[0], DEFAULTS, "training/pretrain.py")
    args, rest = parser.parse_known_args(argv)
    settings = merge_config(DEFAULTS, load_yaml(args.config), parse_cli_overrides(rest))
    check_fields(settings["model"]["config"], config_fields(), "model.config")
    check_band_settings(settings["model"])
    return settings


def build_model(model_settings: dict, band_names: list[str] | None = None) -> TiMoForMaskedImageModeling:
    """The model to pre-train; a `model.pretrained` start whose bands differ from the data's `band_names` has its
    stem and pixel prediction carried over to them by band name (`plan_band_adaptation`)."""
    model_settings, pretrained_bands = plan_band_adaptation(model_settings, band_names)
    overrides = dict(model_settings["config"])
    if model_settings["pretrained"]:
        model = TiMoForMaskedImageModeling.from_pretrained(model_settings["pretrained"], **overrides)
    elif model_settings["preset"]:
        model = TiMoForMaskedImageModeling(TiMoConfig.from_preset(model_settings["preset"], **overrides))
    else:
        model = TiMoForMaskedImageModeling(TiMoConfig(**overrides))
    if pretrained_bands:
        bands = adapt_input_bands(model, pretrained_bands, band_names, model_settings["new_band_weights"])
        logger.info("Stem and pixel prediction adapted to the data's bands: pre-trained %s, new %s, dropped %s",
                    list(bands.kept), list(bands.new), list(bands.dropped))
    return model


def write_model_card(folder: Path, settings: dict, summary: dict, config: TiMoConfig) -> None:
    training, data = settings["training"], settings["data"]
    card = f"""---
library_name: transformers
tags:
- timo
- satellite-image-time-series
- remote-sensing
- masked-image-modeling
- pretraining
pipeline_tag: image-feature-extraction
---

# TiMo masked-image-modelling checkpoint

TiMo (arXiv 2505.08723) pre-trained with the masked-image-modelling objective of the official code: mask units of
{config.mask_unit_size} px, mask ratio {config.mask_ratio} drawn jointly over all frames, MHSA encoder over the
visible units, decoder width {config.mim_decoder_hidden_size} / depth {config.mim_decoder_depth}, target
normalisation `{config.mim_target_normalization}`. Produced by `training/pretrain.py` of timo_hf.

Load the encoder for fine-tuning with `timo_hf` installed:

```python
import timo_hf
from timo_hf import TiMoModel, TiMoForSemanticSegmentation
encoder = TiMoModel.from_pretrained("<this folder or repo>")
```

The fine-tuning attention types are `{config.attention_types}`; D-STGA offset branches (if any) start from their
initialisation, every other encoder weight comes from this checkpoint.

## Training

| setting | value |
| --- | --- |
| data | {data["source"]} `{data["path"]}` {data["name"] or ""} |
| frames per series | {data["num_frames"]} ({data["temporal_order"]}) |
| image size | {data["image_size"] or "native"} |
| optimizer steps | {summary["steps"]} |
| effective batch | {summary["effective_batch_size"]} |
| peak learning rate | {summary["peak_lr"]:.3g} (AdamW {tuple(training["betas"])}) |
| weight decay | {training["weight_decay"]} (not on norms and biases) |
| processes | {summary["world_size"]} |
| final loss | {summary["final_loss"]} |

The inputs were prepared by the `TiMoImageProcessor` saved here (`preprocessor_config.json`: per-band mean and
std, size); load it with `TiMoImageProcessor.from_pretrained("<this folder or repo>")`.
"""
    (folder / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> dict:
    settings = parse_args(argv)
    training, data = settings["training"], settings["data"]
    output_dir = Path(training["output_dir"])
    batch_size = int(training["per_device_batch_size"])
    accumulation = int(training["gradient_accumulation_steps"])
    accelerator = Accelerator(
        mixed_precision=training["mixed_precision"],
        gradient_accumulation_steps=accumulation,
        log_with=make_trackers(output_dir / "logs"),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    seed = int(training["seed"])
    set_seed(seed)
    checkpoints = open_checkpoints(accelerator, output_dir, training)

    source = open_source(data)
    processor = make_processor(data, source)

    model = build_model(settings["model"], processor.band_names)
    config = model.config
    if training["activation_checkpointing"]:
        model.activation_checkpointing_enable()

    world_size, rank = accelerator.num_processes, accelerator.process_index
    effective_batch = batch_size * accumulation * world_size
    peak_lr = training["lr"]  # an explicit 0 too (a run that must not move the weights)
    if peak_lr is None:
        peak_lr = scaled_learning_rate(training["base_lr"], effective_batch)

    optimizer = torch.optim.AdamW(
        weight_decay_param_groups(model, training["weight_decay"]), lr=peak_lr, betas=tuple(training["betas"])
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    start_step = 0
    if training["resume"]:
        state = checkpoints.load(training["resume"], model, optimizer)
        start_step = int(state["step"])
        saved_layout = (state.get("effective_batch_size"), state.get("per_device_batch_size"))
        if saved_layout != (effective_batch, batch_size):
            logger.warning(
                "Resuming with batch %d of %d per process, the checkpoint had %s of %s: the data order continues "
                "from the same sample count but is no longer that of an uninterrupted run (keep both equal, e.g. "
                "double gradient_accumulation_steps when halving the processes).",
                effective_batch, batch_size, *saved_layout,
            )

    batches, micro_batches_per_epoch = build_batches(
        data, processor, source, batch_size, world_size, rank, seed, start_micro_batch=start_step * accumulation
    )
    if training["resume"]:  # streams continue from the position each rank saved (map-style data: from the step)
        load_data_state(batches, checkpoints.resolve(training["resume"]))
    max_steps = training["max_steps"]
    if max_steps is None:
        if training["num_epochs"] is None or micro_batches_per_epoch is None:
            raise ValueError("Set training.max_steps (required for streamed data) or training.num_epochs.")
        max_steps = math.ceil(training["num_epochs"] * micro_batches_per_epoch / accumulation)
    max_steps = int(max_steps)
    warmup_steps = training["warmup_steps"]
    if warmup_steps is None:
        warmup_steps = int(training["warmup_ratio"] * max_steps)
    stop_at = min(int(training["stop_at_step"] or max_steps), max_steps)

    accelerator.init_trackers("timo_pretrain", config={k: str(v) for k, v in flatten_settings(settings).items()})
    truncate_logs_after(accelerator, start_step)
    logger.info(
        "TiMo MIM pre-training: %d parameters, %d processes x %d x %d accumulation = batch %d, lr %.3g, steps %d..%d",
        sum(p.numel() for p in model.parameters()), world_size, batch_size, accumulation, effective_batch, peak_lr,
        start_step, stop_at,
    )

    unit = config.mask_unit_size

    def masked_image_loss(micro: int) -> torch.Tensor:
        pixel_values = next(batches).to(accelerator.device)
        if pixel_values.shape[2] != config.num_channels:
            raise ValueError(
                f"The data has {pixel_values.shape[2]} bands after the image processor but the model expects "
                f"config.num_channels = {config.num_channels}; set model.config.num_channels."
            )
        frames, height, width = pixel_values.shape[1], pixel_values.shape[-2], pixel_values.shape[-1]
        # The mask depends on the micro-batch's slot in the global step (micro * world + rank), which holds the
        # same samples for any process count at the same per-device batch: a resume on another world size
        # with matching accumulation sees the same masks.
        slot = micro * world_size + rank
        generator = torch.Generator().manual_seed(derive_seed(seed, step, slot))
        noise = torch.rand(pixel_values.shape[0], frames * (height // unit) * (width // unit), generator=generator)
        return model(pixel_values=pixel_values, noise=noise.to(accelerator.device)).loss

    progress = tqdm(
        total=max_steps, initial=start_step, disable=not accelerator.is_local_main_process, desc="pretrain"
    )
    model.train()
    step, last_loss = start_step, None
    while step < stop_at:
        started = time.perf_counter()
        learning_rate = warmup_cosine_lr(step, peak_lr, max_steps, warmup_steps, training["min_lr"])
        set_learning_rate(optimizer, learning_rate)
        last_loss, grad_norm = optimizer_step(
            accelerator, model, optimizer, masked_image_loss, accumulation, training["max_grad_norm"], step
        )
        step += 1
        samples_per_second = effective_batch / (time.perf_counter() - started)
        if step % int(training["logging_steps"]) == 0 or step == stop_at:
            values = {"loss": last_loss, "lr": learning_rate, "samples_per_second": samples_per_second}
            if grad_norm is not None:
                values["grad_norm"] = grad_norm
            if micro_batches_per_epoch:
                values["epoch"] = step * accumulation / micro_batches_per_epoch
            accelerator.log(values, step=step)
        progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{learning_rate:.2e}", samples_s=f"{samples_per_second:.1f}")
        progress.update(1)
        if step % int(training["save_steps"]) == 0 or step == stop_at:
            checkpoints.save(
                step, {"world_size": world_size, "effective_batch_size": effective_batch,
                       "per_device_batch_size": batch_size, "max_steps": max_steps},
                write_rank_files=lambda folder: save_data_state(batches, folder, rank),
            )
    progress.close()

    summary = {
        "steps": step,
        "final_loss": last_loss,
        "world_size": world_size,
        "effective_batch_size": effective_batch,
        "peak_lr": peak_lr,
        "finished": step >= max_steps,
    }
    final_state = full_state_dict(accelerator, model)  # collective: every process takes part
    summary.update(weight_digests(accelerator, model, final_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (output_dir / "run_summary.json").write_text(json.dumps(summary, indent=2))
        plot_loss_curve(output_dir / "logs" / "metrics.jsonl", output_dir / "loss_curve.png")
    if step >= max_steps:
        save_final_folder(accelerator, model, final_state, processor, settings, summary, output_dir)
    del model, optimizer
    end_training(accelerator)
    return summary


def weight_digests(accelerator, model, final_state: dict) -> dict:
    """`parameter_digest`: the final parameters (main process); `rank_parameter_digests`: those each process holds,
    which must be equal when every process keeps a replica (None when the processes hold shards)."""
    names = {name for name, _ in accelerator.unwrap_model(model).named_parameters()}
    main = state_digest({k: v for k, v in final_state.items() if k in names}) if accelerator.is_main_process else None
    local = None
    if not is_sharded(accelerator):
        local = state_digest(dict(accelerator.unwrap_model(model).named_parameters()))
    ranks = gather_object([local])
    return {"parameter_digest": main, "rank_parameter_digests": None if local is None else ranks}


def save_final_folder(
    accelerator, model, final_state: dict, processor, settings: dict, summary: dict, output_dir: Path
) -> None:
    folder = output_dir / "model"
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        folder, state_dict=final_state, is_main_process=accelerator.is_main_process, save_function=accelerator.save
    )
    if accelerator.is_main_process:
        processor.save_pretrained(folder)
        write_model_card(folder, settings, summary, unwrapped.config)
        if (output_dir / "loss_curve.png").is_file():
            shutil.copy(output_dir / "loss_curve.png", folder / "loss_curve.png")
        repo = settings["training"]["push_to_hub"]
        if repo:
            url = push_folder_to_hub(folder, repo, f"TiMo MIM pre-training, {summary['steps']} steps")
            logger.info("Pushed %s to %s", folder, url)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, FileExistsError, ValueError) as err:
        logger.error("%s", err)
        raise SystemExit(f"pretrain.py: error: {err}") from None
