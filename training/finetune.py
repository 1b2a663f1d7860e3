#!/usr/bin/env python
"""Fine-tune and evaluate TiMo on a downstream task (segmentation or classification) with accelerate.

    accelerate launch training/finetune.py --config training/configs/<experiment>.yaml [--section.key value ...]

One CPU, several CPU processes (`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...`) or many
GPUs run the same script. Settings: the defaults below, then the YAML file, then `--section.key value` overrides
(`--key value` when only one section has the key, e.g. `--num_epochs 5`, `--resume latest`,
`--push_to_hub user/timo-multisenge`); `model.config`, `data.options` and `data.processor` take free-form entries
(`--model.config.drop_path_rate 0.1`).

Start: `model.pretrained` (a timo_hf folder or Hub id of any TiMo class: its encoder weights are used),
`model.original_checkpoint` (an official `.pth`: pre-training, backbone, segmentation or classification; the
architecture comes from `model.preset` / `model.config`), or neither (random initialisation). What was not in the
checkpoint (the task head, D-STGA offset branches absent from a pre-training checkpoint, a stem of another band
count) is listed as newly initialised in the log and in `results.json`.

Bands: where the bands of the start (`model.pretrained_bands`, by default the `band_names` of the image processor
saved with `model.pretrained`; official checkpoints name none, so give them, e.g. `[B4, B3, B2]` for the official
pre-training) and of the data (`data.processor.band_names`, else the examples' own) are both known, differ and
share a band, the stem is adapted band by band (`timo_hf.band_adaptation`): shared bands keep their pre-trained
filters, in the data's order, new bands start at zero (`model.new_band_weights: random` for the model's
initialisation) and the others are dropped; `results.json` lists them under `initialisation.bands`. The official
code instead re-initialises the whole stem when the band count differs (`model.adapt_bands: false`).

Data: `data.source` `timo` (a raw download read by the `timo_hf.data` builders: `data.name`, `data.path`,
`data.options`), `export` (a Parquet folder or Hub dataset of `timo_hf.data.export_to_parquet`: `data.path`) or
`time_tells` (the generated benchmark of `timo_hf.synthetic_time_tells`, options as its `make_time_tells`).
Examples go through `TiMoImageProcessor(**data.processor)` (`data.train_processor` overrides it for training, e.g.
random frame draws); `data.normalization_statistics: train` normalises with per-band statistics of the training
split. `data.train_fraction` (0.1 / 0.2 / 0.5 / 1.0 in the paper's data-efficiency study) trains on a fixed
subset: the first `round(fraction * N)` examples of the permutation `numpy.random.default_rng(data.subset_seed)`
of the N training examples, so every smaller subset is contained in every larger one and runs with the same seed
see the same examples whatever the number of processes.

Each epoch: training (data order a function of (seed, epoch), ranks never share samples; a whole number of
optimizer steps, the micro-batches short of one more step left out like the incomplete last batch), then validation;
the model with the best `training.metric_for_best` is kept in `best_model/`. `checkpoints/step_<N>`
(`accelerator.save_state`) are written after every validation (and at `training.stop_at_step`); `--resume latest`
continues exactly (data order, frame draws, dropout); `--overwrite_output_dir true` deletes the old run's checkpoints
and log records first. At the end the best model is evaluated on the test split.
Metrics come from confusion matrices summed over processes (`timo_hf.metrics`); every sample is evaluated on one
process only.

Outputs under `training.output_dir`: `logs/metrics.jsonl` (loss and lr per step, validation metrics per epoch, test
metrics), `results.json`, `confusion_matrix.png`, `quicklooks/*.png` (input RGB, ground truth, prediction),
`loss_curve.png` and `model/` (best weights, image processor, `results.json`, model card with the results table),
pushed with `--push_to_hub <repo>`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

TRAINING_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TRAINING_DIR))
sys.path.insert(0, str(TRAINING_DIR.parent / "model_cards"))

from card_generator import write_finetuned_card  # noqa: E402
from common import (  # noqa: E402
    CheckpointError,
    check_band_settings,
    check_fields,
    config_fields,
    derive_seed,
    end_training,
    flatten_settings,
    full_state_dict,
    load_full_state_dict,
    load_yaml,
    loader_generator,
    make_trackers,
    merge_config,
    open_checkpoints,
    optimizer_step,
    parse_cli_overrides,
    plan_band_adaptation,
    plot_loss_curve,
    processor_fields,
    push_folder_to_hub,
    scaled_learning_rate,
    set_learning_rate,
    settings_parser,
    truncate_logs_after,
    warmup_cosine_lr,
    weight_decay_param_groups,
    without_load_report,
)
from pretrain_data import EpochBatchPlan  # noqa: E402

from timo_hf import TiMoConfig  # noqa: E402
from timo_hf.convert_original import (  # noqa: E402
    load_original_state_dict,
    rename_backbone_key,
    rename_decoder_key,
    rename_pretraining_key,
)
from timo_hf.band_adaptation import adapt_input_bands  # noqa: E402
from timo_hf.image_processing_timo import TiMoImageProcessor  # noqa: E402
from timo_hf.inference.quicklook import class_listed_colormap  # noqa: E402
from timo_hf.metrics import ConfusionMatrix  # noqa: E402
from timo_hf.modeling_timo import (  # noqa: E402
    CLASSIFICATION_IGNORE_INDEX,
    TiMoForImageClassification,
    TiMoForSemanticSegmentation,
)
from timo_hf.plotting import pyplot  # noqa: E402


logger = logging.getLogger("timo_hf.finetune")

MODEL_CLASSES = {"segmentation": TiMoForSemanticSegmentation, "classification": TiMoForImageClassification}
PADDED_FRAMES = ("leave_out", "keep")  # data.padded_frames
# The scores of every evaluation per task, any of which can be training.metric_for_best (default below).
HEADLINE_SCORES = {"segmentation": ["overall_accuracy", "mean_iou", "mean_accuracy", "mean_f1", "kappa"],
                   "classification": ["accuracy", "mean_f1", "kappa", "mean_accuracy"]}
DEFAULT_METRIC_FOR_BEST = {"segmentation": "mean_iou", "classification": "accuracy"}

DEFAULTS = {
    "model": {
        "task": "segmentation",  # "segmentation" (TiMoForSemanticSegmentation) | "classification"
        "pretrained": None,  # timo_hf folder or Hub id (TiMoModel, TiMoForMaskedImageModeling, a fine-tuned head...)
        "original_checkpoint": None,  # official .pth (pre-training / backbone / segmentation / classification)
        "preset": None,  # "base" | "large" | "huge" architecture (random init or official checkpoint)
        "config": {},  # TiMoConfig fields (num_channels, temporal_fusion, classifier_pooling, drop_path_rate, ...)
        "adapt_bands": True,  # stem weights matched to the data's bands by name (false: official, see the docstring)
        "pretrained_bands": None,  # the start's bands in stem order; default: its image processor's band_names
        "new_band_weights": "zeros",  # stem weights of bands the start has not seen: "zeros" | "random"
    },
    "data": {
        "source": "timo",  # "timo" (raw download) | "export" (Parquet folder / Hub dataset) | "time_tells"
        "name": None,  # timo_hf dataset name for source "timo" (multisenge, multiearth, mtlcc, kurosiwo, sen12flood)
        "path": None,  # raw data_dir (timo) or export folder / Hub id (export)
        "options": {},  # builder options (timo) or make_time_tells arguments (time_tells)
        "cache_dir": None,
        "train_split": "train",
        "validation_split": "validation",  # null: no validation (the last epoch is kept)
        "test_split": "test",  # null: no test evaluation
        "class_names": None,  # default: the dataset's
        "train_fraction": 1.0,  # fixed training subset (see the module docstring)
        "subset_seed": 0,
        "processor": {},  # TiMoImageProcessor arguments for evaluation (and training)
        "train_processor": {},  # overrides for training (temporal_sampling: random, random_crop: true, ...)
        "normalization_statistics": None,  # "train" (per-band stats of the training split) | JSON file | null
        "statistics_samples": 256,
        "num_workers": 0,
        "padded_frames": "leave_out",  # frames the processor pads (frame_mask False): "leave_out" of the model, or
        # "keep" them as frames (official: the model sees the padding)
    },
    "training": {
        "output_dir": "runs/finetune",
        "overwrite_output_dir": False,
        "seed": 0,
        "num_epochs": 30,
        "max_steps": None,  # optimizer steps; overrides num_epochs
        "per_device_batch_size": 2,
        "eval_batch_size": None,  # default: per_device_batch_size
        "gradient_accumulation_steps": 1,
        "lr": None,  # absolute peak learning rate ...
        "base_lr": None,  # ... or base_lr * effective_batch / 256 (MAE rule)
        "scheduler": "constant",  # "constant" | "cosine" (half-cycle cosine to min_lr), after linear warm-up
        "warmup_epochs": 0,
        "min_lr": 0.0,
        "weight_decay": 0.01,
        "betas": [0.9, 0.999],
        "max_grad_norm": None,
        "mixed_precision": None,  # "no" | "bf16" | "fp16"; None: what `accelerate launch` says
        "activation_checkpointing": False,  # recompute blocks in backward: less memory, more time
        "sync_batchnorm": True,  # SyncBatchNorm across GPUs (as the official DDP runs); not available on CPU
        "find_unused_parameters": False,
        "metric_for_best": None,  # any of HEADLINE_SCORES; default mean_iou (segmentation), accuracy (classification)
        "greater_is_better": True,
        "logging_steps": 10,
        "save_total_limit": 2,
        "resume": None,  # "latest" or a checkpoint folder
        "stop_at_step": None,  # end after this optimizer step with a checkpoint (resume later)
        "num_quicklooks": 4,
        "push_to_hub": None,  # Hub repository id for the final model folder
    },
}


def parse_args(argv: list[str] | None = None) -> dict:
    parser = settings_parser(__doc__.split("\n\n")[0], DEFAULTS, "training/finetune.py")
    args, rest = parser.parse_known_args(argv)
    settings = merge_config(DEFAULTS, load_yaml(args.config), parse_cli_overrides(rest))
    if settings["model"]["task"] not in MODEL_CLASSES:
        raise ValueError(f"model.task must be one of {sorted(MODEL_CLASSES)}, got {settings['model']['task']!r}.")
    if settings["model"]["pretrained"] and settings["model"]["original_checkpoint"]:
        raise ValueError("Set model.pretrained or model.original_checkpoint, not both.")
    fraction = settings["data"]["train_fraction"]
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"data.train_fraction must be in (0, 1], got {fraction!r}.")
    if settings["data"]["padded_frames"] not in PADDED_FRAMES:
        raise ValueError(f"data.padded_frames must be one of {PADDED_FRAMES}, got "
                         f"{settings['data']['padded_frames']!r}.")
    check_fields(settings["model"]["config"], config_fields(), "model.config")
    for name in ("processor", "train_processor"):
        check_fields(settings["data"][name], processor_fields(), f"data.{name}")
    metrics = HEADLINE_SCORES[settings["model"]["task"]]
    settings["training"]["metric_for_best"] = (settings["training"]["metric_for_best"]
                                               or DEFAULT_METRIC_FOR_BEST[settings["model"]["task"]])
    if settings["training"]["metric_for_best"] not in metrics:
        raise ValueError(f"training.metric_for_best must be one of {metrics} for {settings['model']['task']}, got "
                         f"{settings['training']['metric_for_best']!r}.")
    check_band_settings(settings["model"])
    return settings


# ----------------------------------------------------------------------------------------------------------- data
def load_splits(data: dict) -> tuple[dict, list[str] | None]:
    """`{split name: datasets.Dataset}` (numpy-formatted) for the configured splits, and the dataset's class names."""
    source, wanted = data["source"], [data[f"{kind}_split"] for kind in ("train", "validation", "test")]
    options = dict(data["options"])
    class_names = None
    if source == "time_tells":
        from timo_hf.synthetic_time_tells import class_names as time_tells_classes, make_time_tells

        dataset = make_time_tells(**options)
        class_names = time_tells_classes(options.get("num_frames", 4), options.get("num_classes", 2))
    elif source in ("timo", "export"):
        from timo_hf.data import BUILDERS, canonical_name, load_timo_dataset

        if source == "timo":
            if not data["name"] or not data["path"]:
                raise ValueError("data.source 'timo' needs data.name (dataset) and data.path (raw download folder).")
            dataset = load_timo_dataset(data["name"], data_dir=data["path"], cache_dir=data["cache_dir"], **options)
            builder = BUILDERS[canonical_name(data["name"])]
            class_names = list(builder.CLASS_NAMES) if getattr(builder, "CLASS_NAMES", None) else None
            classes_file = Path(data["path"]) / "classes.txt"  # MTLCC: one "id|name" row per class
            if class_names is None and classes_file.is_file():
                rows = [row.split("|") for row in classes_file.read_text().splitlines() if "|" in row]
                class_names = [row[1].strip() for row in rows if row[0].strip().isdigit()]
        else:
            dataset = load_timo_dataset(data["path"], cache_dir=data["cache_dir"], **options)
    else:
        raise ValueError(f"data.source must be 'timo', 'export' or 'time_tells', got {source!r}.")
    missing = [split for split in wanted if split and split not in dataset]
    if missing:
        raise ValueError(f"Split(s) {missing} not in the dataset (it has {sorted(dataset)}).")
    splits = {split: dataset[split] for split in wanted if split}
    return splits, data["class_names"] or class_names


def train_subset_indices(num_examples: int, fraction: float, seed: int) -> np.ndarray:
    """The fixed training subset: the first `round(fraction * num_examples)` (at least 1) entries of the permutation
    `default_rng(seed).permutation(num_examples)`, sorted. Nested across fractions for a given seed."""
    count = max(1, int(round(float(fraction) * num_examples)))
    return np.sort(np.random.default_rng(seed).permutation(num_examples)[:count])


def examples_band_names(dataset) -> list[str] | None:
    """The bands the first example of `dataset` names, in order (None where it names none)."""
    if "band_names" in dataset.column_names and len(dataset):
        return dataset.select_columns(["band_names"])[0]["band_names"]
    return None


def build_processors(data: dict, train_dataset) -> tuple[TiMoImageProcessor, TiMoImageProcessor]:
    """(evaluation processor, training processor). `data.normalization_statistics` (`"train"`: computed on the
    training examples; or a JSON file of `timo_hf.data.compute_band_statistics`) sets the bands and their mean/std
    unless `data.processor` gives them. Padded label pixels get the processor's `label_pad_value`, 255 by default:
    the segmentation ignore index."""
    settings = dict(data["processor"])
    statistics = data["normalization_statistics"]
    if statistics == "train":
        from timo_hf.data import compute_band_statistics

        statistics = compute_band_statistics(train_dataset, max_samples=int(data["statistics_samples"]))
    elif statistics:
        statistics = json.loads(Path(statistics).read_text())
    if statistics:
        settings = {"band_names": statistics["band_names"], "image_mean": statistics["image_mean"],
                    "image_std": statistics["image_std"], **settings}
    if not settings.get("band_names") and not TiMoImageProcessor(**settings).band_names:
        # The saved model must know its bands (timo predict picks them by name): the examples' own, in their order.
        settings["band_names"] = examples_band_names(train_dataset)
    return TiMoImageProcessor(**settings), TiMoImageProcessor(**{**settings, **data["train_processor"]})


class IndexedExamples(torch.utils.data.Dataset):
    """`(index, seed)` -> `(example, seed)` over a subset of a dataset (keys from `EpochBatchPlan`)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, 0)
        return self.dataset[self.indices[index]], seed


class ProcessBatch:
    """Collate `(example, seed)` pairs into model inputs with a processor, its random draws seeded by the batch;
    with `padded_frames="keep"` the batch has no `frame_mask`, so the model sees padded frames as frames."""

    def __init__(self, processor: TiMoImageProcessor, padded_frames: str = "leave_out"):
        self.processor, self.padded_frames = processor, padded_frames

    def __call__(self, items):
        examples = [example for example, _ in items]
        batch = self.processor(examples, seed=derive_seed(*[seed for _, seed in items]))
        if self.padded_frames == "keep":
            del batch["frame_mask"]
        batch["sample_id"] = [example.get("sample_id") for example in examples]
        return batch


# ----------------------------------------------------------------------------------------------------------- model
def build_config(model_settings: dict, class_names: list[str] | None) -> TiMoConfig:
    overrides = dict(model_settings["config"])
    if class_names and "id2label" not in overrides:
        if overrides.get("num_labels", len(class_names)) != len(class_names):
            raise ValueError(f"model.config.num_labels is {overrides['num_labels']} but the dataset has "
                             f"{len(class_names)} classes ({class_names}); drop num_labels or set data.class_names.")
        overrides.pop("num_labels", None)
        overrides["id2label"] = {index: name for index, name in enumerate(class_names)}
        overrides["label2id"] = {name: index for index, name in enumerate(class_names)}
    if model_settings["pretrained"]:
        try:
            return TiMoConfig.from_pretrained(model_settings["pretrained"], **overrides)
        except OSError as error:
            raise OSError(f"model.pretrained {model_settings['pretrained']!r} could not be loaded ({error}). Give a "
                          "local timo_hf folder (e.g. written by timo convert), a Hub id reachable from here, or "
                          "--model.pretrained null for random initialisation.") from error
    if model_settings["preset"]:
        return TiMoConfig.from_preset(model_settings["preset"], **overrides)
    return TiMoConfig(**overrides)


def describe_new_weights(keys, list_modules: bool = True) -> dict[str, dict]:
    """Newly initialised weights grouped into the task head, the D-STGA offset branches and the rest: per group the
    number of tensors and (with `list_modules`) the modules that own them."""
    groups = {"head": [], "offset_branches": [], "other": []}
    for key in sorted(keys):
        if key.startswith(("decode_head.", "classifier.")):
            groups["head"].append(key)
        elif ".query_offset." in key:
            groups["offset_branches"].append(key)
        else:
            groups["other"].append(key)
    return {group: {"tensors": len(names), **({"modules": sorted({name.rsplit(".", 1)[0] for name in names})}
                                               if list_modules else {})}
            for group, names in groups.items()}


def rename_official_key(key: str, kind: str) -> str | None:
    """timo_hf name (with the `timo.` prefix of the task models) of an official key, None when it has none here."""
    if kind == "pretraining":
        new_key = rename_pretraining_key(key)
        return new_key if new_key and new_key.startswith("timo.") else None  # the MIM decoder is dropped
    if kind == "segmentation":
        if key.startswith("encoder."):
            new_key = rename_backbone_key(key.removeprefix("encoder."))
            return None if new_key is None else "timo." + new_key
        return rename_decoder_key(key)
    new_key = rename_backbone_key(key)  # backbone / TiMo_cls: its `head` is dropped (unused or another task's)
    return None if new_key is None else "timo." + new_key


def load_original_weights(model, checkpoint) -> dict:
    """Load the weights of an official checkpoint that fit `model`; report what was loaded, dropped and new."""
    state_dict = load_original_state_dict(checkpoint)
    if any(key.startswith(("decoder_", "mask_token")) for key in state_dict):
        kind = "pretraining"
    elif any(key.startswith("encoder.") for key in state_dict):
        kind = "segmentation"
    else:
        kind = "backbone"
    expected = model.state_dict()
    loaded, dropped, mismatched = {}, [], []
    for key, tensor in state_dict.items():
        new_key = rename_official_key(key, kind)
        if new_key is None or new_key not in expected:
            dropped.append(key)
        elif tuple(tensor.shape) != tuple(expected[new_key].shape):
            mismatched.append(f"{new_key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[new_key].shape)}")
        else:
            loaded[new_key] = tensor
    model.load_state_dict(loaded, strict=False)
    new = set(expected) - set(loaded)
    return {"checkpoint_kind": kind, "loaded": len(loaded), "dropped": sorted(dropped),
            "mismatched_reinitialised": mismatched, "newly_initialised": describe_new_weights(new)}


def build_model(model_settings: dict, class_names: list[str] | None, band_names: list[str] | None = None):
    """The task model and a report of where its weights come from (and which are newly initialised); with
    `band_names` (the data's bands) the stem is adapted to them (`plan_band_adaptation`)."""
    model_settings, pretrained_bands = plan_band_adaptation(model_settings, band_names)
    model_class = MODEL_CLASSES[model_settings["task"]]
    config = build_config(model_settings, class_names)
    if model_settings["pretrained"]:
        with without_load_report():  # log_initialisation summarises it
            model, info = model_class.from_pretrained(
                model_settings["pretrained"], config=config, output_loading_info=True, ignore_mismatched_sizes=True
            )
        mismatched = [f"{key}: checkpoint {tuple(old)} vs model {tuple(new)}"
                      for key, old, new in info["mismatched_keys"]]
        report = {"source": f"pretrained {model_settings['pretrained']}", "dropped": sorted(info["unexpected_keys"]),
                  "mismatched_reinitialised": mismatched,
                  "newly_initialised": describe_new_weights(
                      set(info["missing_keys"]) | {entry[0] for entry in info["mismatched_keys"]})}
    elif model_settings["original_checkpoint"]:
        model = model_class(config)
        report = {"source": f"official checkpoint {model_settings['original_checkpoint']}",
                  **load_original_weights(model, model_settings["original_checkpoint"])}
    else:
        model = model_class(config)
        report = {"source": "random initialisation", "dropped": [], "mismatched_reinitialised": [],
                  "newly_initialised": describe_new_weights(model.state_dict(), list_modules=False)}
    if pretrained_bands:
        stem = [entry for entry in report["mismatched_reinitialised"] if "embeddings.stem.conv1.weight" in entry]
        if stem:
            raise ValueError(f"model.pretrained_bands lists {len(pretrained_bands)} bands ({pretrained_bands}) but "
                             f"the start's stem takes another number: {stem[0]}.")
        report["bands"] = adapt_input_bands(model, pretrained_bands, band_names,
                                            model_settings["new_band_weights"]).to_dict()
    return model, report


def log_initialisation(report: dict) -> None:
    logger.info("Weights: %s", report["source"])
    for group, entry in report["newly_initialised"].items():
        if entry["tensors"]:
            modules = entry.get("modules", [])
            logger.info("Newly initialised %s: %d tensors%s", group.replace("_", " "), entry["tensors"],
                        f" ({', '.join(modules[:4])}{', ...' if len(modules) > 4 else ''})" if modules else "")
    for entry in report["mismatched_reinitialised"]:
        logger.info("Re-initialised (shape differs): %s", entry)
    if "bands" in report:
        bands = report["bands"]
        logger.info("Stem adapted to the data's bands: pre-trained %s, new %s, dropped %s",
                    bands["kept"], bands["new"], bands["dropped"])
    if report["dropped"]:
        logger.info("Checkpoint tensors not used: %d (e.g. %s)", len(report["dropped"]), report["dropped"][:3])


# ----------------------------------------------------------------------------------------------------------- eval
def model_inputs(batch: dict, device) -> dict:
    """The processor's outputs the model takes, on `device` (with a `frame_mask`, padded frames are left out)."""
    return {name: batch[name].to(device) for name in ("pixel_values", "temporal_positions", "frame_mask")
            if name in batch}


def predict(model, batch: dict, device) -> torch.Tensor:
    """Class indices: `[B, H, W]` / `[B, T, H, W]` (segmentation) or `[B]` / `[B, T]` (classification)."""
    logits = model(**model_inputs(batch, device)).logits
    channel_dim = -3 if isinstance(model, TiMoForSemanticSegmentation) else -1
    return logits.argmax(dim=channel_dim)


def ignore_index_of(model) -> int:
    if isinstance(model, TiMoForSemanticSegmentation):
        return model.config.semantic_loss_ignore_index
    return CLASSIFICATION_IGNORE_INDEX


@torch.no_grad()
def evaluate_split(model, dataset, processor: TiMoImageProcessor, *, batch_size: int, accelerator=None,
                   num_quicklooks: int = 0, desc: str = "eval",
                   padded_frames: str = "leave_out") -> tuple[ConfusionMatrix, list[dict]]:
    """Confusion matrix of `model` on `dataset`, summed over processes, and up to `num_quicklooks` samples
    (inputs, labels, predictions) of the main process (`padded_frames` as `ProcessBatch` takes it).

    Process `r` of `W` evaluates examples `r, r + W, ...` (each example counted exactly once), with the model
    unwrapped and its buffers (BatchNorm statistics) broadcast from process 0, so results do not depend on `W`.
    Every process runs the same number of forward passes (its share is padded with repeats that are not counted):
    under FSDP each forward is a collective.
    """
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    if world > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)
    was_training = model.training
    model.eval()
    share = list(range(rank, len(dataset), world))
    padded = share + share[:1] * (math.ceil(len(dataset) / world) - len(share))
    loader = torch.utils.data.DataLoader(
        IndexedExamples(dataset, padded), batch_size=batch_size, collate_fn=ProcessBatch(processor, padded_frames),
        generator=loader_generator(0),
    )
    matrix = ConfusionMatrix(model.config.num_labels, ignore_index_of(model))
    quicklooks = []
    show = accelerator is None or accelerator.is_local_main_process
    seen = 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not show):
        counted = max(0, min(len(batch["labels"]), len(share) - seen))
        seen += len(batch["labels"])
        predictions = predict(model, batch, device).cpu()[:counted]
        matrix.update(predictions, batch["labels"][:counted])
        for index in range(len(predictions)):
            if len(quicklooks) < num_quicklooks:
                quicklooks.append({"sample_id": batch["sample_id"][index], "pixel_values": batch["pixel_values"][index],
                                   "labels": batch["labels"][index], "predictions": predictions[index]})
    matrix.reduce(accelerator)
    model.train(was_training)
    return matrix, quicklooks


def summarise(matrix: ConfusionMatrix, class_names: list[str], task: str) -> dict:
    """JSON-ready scores of a confusion matrix: the headline numbers, per-class values and the matrix itself."""
    scores = matrix.compute()
    summary = {name: _finite(scores[name]) for name in HEADLINE_SCORES[task]}
    per_class = ["per_category_iou", "per_category_accuracy", "per_category_f1"]
    if task == "classification":
        per_class = ["per_category_f1", "per_category_accuracy"]
    for name in per_class:
        summary[name] = {label: _finite(value) for label, value in zip(class_names, scores[name].tolist())}
    summary["confusion_matrix"] = matrix.matrix.tolist()
    summary["num_evaluated"] = matrix.total
    return summary


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


# ----------------------------------------------------------------------------------------------------------- plots
def plot_confusion_matrix(matrix: torch.Tensor, class_names: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (rows: ground truth) with the counts written in the cells."""
    plt = pyplot()

    counts = matrix.double().numpy()
    normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.5 * len(class_names) + 2.5)
    figure, axis = plt.subplots(figsize=(size, size), dpi=100)
    axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(range(len(class_names)), class_names, fontsize=8)
    axis.set_xlabel("prediction")
    axis.set_ylabel("ground truth")
    axis.set_title(title, fontsize=10)
    if len(class_names) <= 20:
        for row in range(len(class_names)):
            for col in range(len(class_names)):
                axis.text(col, row, f"{int(counts[row, col])}", ha="center", va="center", fontsize=7,
                          color="white" if normalised[row, col] > 0.5 else "black")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def display_bands(band_names: list[str] | None, num_channels: int) -> list[int]:
    """Channels shown as RGB: B4/B3/B2 when present, VV/VH as (VV, VH, VV), otherwise the first three (or one)."""
    names = [str(name).upper().replace("B0", "B") for name in band_names or []]
    for wanted in (("B4", "B3", "B2"), ("VV", "VH", "VV")):
        if all(name in names for name in wanted):
            return [names.index(name) for name in wanted]
    return [0, 1, 2] if num_channels >= 3 else [0, 0, 0]


def save_quicklooks(quicklooks: list[dict], band_names, class_names: list[str], folder: Path, task: str) -> list[Path]:
    """One PNG per sample: every input frame as RGB (2-98% stretch), the ground truth and the prediction, classes
    in the colours of `timo predict`'s quicklooks, with a legend."""
    plt = pyplot()
    from matplotlib.patches import Patch

    folder.mkdir(parents=True, exist_ok=True)
    cmap = class_listed_colormap(max(len(class_names), 1))
    legend = [Patch(color=cmap(index), label=name) for index, name in enumerate(class_names)]
    paths = []
    for look in quicklooks:
        pixels = look["pixel_values"].float().numpy()  # [T, C, H, W]
        frames = pixels[:, display_bands(band_names, pixels.shape[1])]
        low, high = np.percentile(frames, [2, 98])
        frames = np.clip((frames - low) / max(high - low, 1e-6), 0, 1).transpose(0, 2, 3, 1)
        labels, predictions = look["labels"].numpy(), look["predictions"].numpy()
        per_frame_maps = task == "segmentation" and labels.ndim == 3
        columns = len(frames) + (0 if per_frame_maps or task == "classification" else 2)
        rows = 3 if per_frame_maps else 1
        legend_inches = 1.8 if task == "segmentation" else 0.0
        figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns + legend_inches, 2.3 * rows), dpi=100,
                                    squeeze=False)
        for t, frame in enumerate(frames):
            axes[0, t].imshow(frame)
            title = f"frame {t}"
            if task == "classification":
                truth = labels[t] if labels.ndim else labels
                guess = predictions[t] if predictions.ndim else predictions
                title += f"\ntrue {_name(class_names, truth)} / pred {_name(class_names, guess)}"
            axes[0, t].set_title(title, fontsize=7)
        if task == "segmentation":
            maps = [(labels[t], predictions[t], f"frame {t}") for t in range(len(frames))] if per_frame_maps \
                else [(labels, predictions, "")]
            for index, (truth, guess, suffix) in enumerate(maps):
                shown = np.ma.masked_where(truth == 255, truth)
                row_truth, col_truth = (1, index) if per_frame_maps else (0, len(frames))
                row_pred, col_pred = (2, index) if per_frame_maps else (0, len(frames) + 1)
                axes[row_truth, col_truth].imshow(shown, cmap=cmap, vmin=0, vmax=cmap.N - 1, interpolation="nearest")
                axes[row_truth, col_truth].set_title(f"ground truth {suffix}", fontsize=7)
                axes[row_pred, col_pred].imshow(guess, cmap=cmap, vmin=0, vmax=cmap.N - 1, interpolation="nearest")
                axes[row_pred, col_pred].set_title(f"prediction {suffix}", fontsize=7)
        for axis in axes.flat:
            axis.set_axis_off()
        figure.suptitle(str(look["sample_id"]), fontsize=8)
        if legend_inches:
            figure.legend(handles=legend, loc="center right", fontsize=7, frameon=False)
        figure.tight_layout(rect=(0, 0, 1 - legend_inches / figure.get_figwidth(), 1))
        path = folder / f"{len(paths):02d}_{_safe(look['sample_id'])}.png"
        figure.savefig(path)
        plt.close(figure)
        paths.append(path)
    return paths


def _name(class_names, index) -> str:
    index = int(index)
    return class_names[index] if 0 <= index < len(class_names) else str(index)


def _safe(text) -> str:
    return "".join(char if char.isalnum() or char in "-_" else "_" for char in str(text))[:60]


# ----------------------------------------------------------------------------------------------------------- train
def learning_rate_at(step: int, training: dict, peak_lr: float, total_steps: int, warmup_steps: int) -> float:
    if training["scheduler"] == "cosine":
        return warmup_cosine_lr(step, peak_lr, total_steps, warmup_steps, training["min_lr"])
    if training["scheduler"] != "constant":
        raise ValueError(f"training.scheduler must be 'constant' or 'cosine', got {training['scheduler']!r}.")
    return peak_lr * (step + 1) / warmup_steps if step < warmup_steps else peak_lr


def training_loss(model, batch: dict, device) -> torch.Tensor:
    """Cross-entropy of the task; the model checks the labels and leaves padded frames out."""
    return model(**model_inputs(batch, device), labels=batch["labels"].to(device)).loss


def is_better(value: float | None, best: float | None, greater_is_better: bool) -> bool:
    if value is None:
        return best is None
    if best is None:
        return True
    return value > best if greater_is_better else value < best


def main(argv: list[str] | None = None) -> dict:
    settings = parse_args(argv)
    model_settings, data, training = settings["model"], settings["data"], settings["training"]
    task = model_settings["task"]
    output_dir = Path(training["output_dir"])
    accelerator = Accelerator(
        mixed_precision=training["mixed_precision"],
        gradient_accumulation_steps=int(training["gradient_accumulation_steps"]),
        log_with=make_trackers(output_dir / "logs"),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(training["find_unused_parameters"]))],
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", force=True)
    seed = int(training["seed"])
    set_seed(seed)
    checkpoints = open_checkpoints(accelerator, output_dir, training)

    with accelerator.main_process_first():  # a raw build writes the Arrow cache once, the other ranks read it
        splits, dataset_classes = load_splits(data)
    train_full = splits[data["train_split"]]
    subset = train_subset_indices(len(train_full), data["train_fraction"], int(data["subset_seed"]))
    eval_processor, train_processor = build_processors(data, train_full.select(subset))

    model, init_report = build_model(model_settings, dataset_classes, eval_processor.band_names)
    config = model.config
    if training["activation_checkpointing"]:
        model.activation_checkpointing_enable()
    class_names = [config.id2label[index] for index in range(config.num_labels)]
    if accelerator.is_main_process:
        log_initialisation(init_report)
    if training["sync_batchnorm"] and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)

    batch_size = int(training["per_device_batch_size"])
    accumulation = int(training["gradient_accumulation_steps"])
    world_size, rank = accelerator.num_processes, accelerator.process_index
    effective_batch = batch_size * accumulation * world_size
    if (training["lr"] is None) == (training["base_lr"] is None):
        raise ValueError("Set exactly one of training.lr (absolute) and training.base_lr (scaled by batch / 256).")
    peak_lr = float(training["lr"]) if training["lr"] is not None else scaled_learning_rate(
        float(training["base_lr"]), effective_batch)
    optimizer = torch.optim.AdamW(weight_decay_param_groups(model, training["weight_decay"]), lr=peak_lr,
                                  betas=tuple(training["betas"]))
    model, optimizer = accelerator.prepare(model, optimizer)

    plan = EpochBatchPlan(len(subset), batch_size, world_size, rank, seed, micro_batches_per_step=accumulation)
    steps_per_epoch = plan.per_epoch // accumulation
    max_steps = int(training["max_steps"] or training["num_epochs"] * steps_per_epoch)
    warmup_steps = int(round(float(training["warmup_epochs"]) * steps_per_epoch))
    stop_at = min(int(training["stop_at_step"] or max_steps), max_steps)

    state = {"step": 0, "best_metric": None, "best_step": None, "best_epoch": None, "history": []}
    if training["resume"]:
        state.update(checkpoints.load(training["resume"], model, optimizer))
    start_step = int(state["step"])
    plan.start = start_step * accumulation
    loader = torch.utils.data.DataLoader(
        IndexedExamples(train_full, subset), batch_sampler=plan,
        collate_fn=ProcessBatch(train_processor, data["padded_frames"]),
        num_workers=int(data["num_workers"]), generator=loader_generator(seed),
    )
    batches = iter(loader)

    accelerator.init_trackers("timo_finetune", config={k: str(v) for k, v in flatten_settings(settings).items()})
    truncate_logs_after(accelerator, start_step)
    logger.info(
        "TiMo fine-tuning (%s, %d classes): %d/%d training examples (fraction %s), %d processes x %d x %d "
        "accumulation = batch %d, lr %.3g (%s), %d steps per epoch, steps %d..%d of %d", task, config.num_labels,
        len(subset), len(train_full), data["train_fraction"], world_size, batch_size, accumulation, effective_batch,
        peak_lr, training["scheduler"], steps_per_epoch, start_step, stop_at, max_steps,
    )

    eval_batch = int(training["eval_batch_size"] or batch_size)
    validation = splits.get(data["validation_split"]) if data["validation_split"] else None
    best_dir = output_dir / "best_model"
    progress = tqdm(total=max_steps, initial=start_step, desc="finetune", disable=not accelerator.is_local_main_process)
    model.train()
    step, last_loss, started = start_step, None, time.perf_counter()
    while step < stop_at:
        learning_rate = learning_rate_at(step, training, peak_lr, max_steps, warmup_steps)
        set_learning_rate(optimizer, learning_rate)
        micro_batches = [next(batches) for _ in range(accumulation)]  # collated outside autocast
        last_loss, grad_norm = optimizer_step(
            accelerator, model, optimizer, lambda micro: training_loss(model, micro_batches[micro], accelerator.device),
            accumulation, training["max_grad_norm"], step,
        )
        step += 1
        epoch = step / steps_per_epoch
        if step % int(training["logging_steps"]) == 0 or step == stop_at:
            values = {"loss": last_loss, "lr": learning_rate, "epoch": epoch}
            accelerator.log(values if grad_norm is None else {**values, "grad_norm": grad_norm}, step=step)
        progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{learning_rate:.2e}", epoch=f"{epoch:.2f}")
        progress.update(1)

        if step % steps_per_epoch == 0 or step == max_steps:
            record = {"step": step, "epoch": epoch}
            if validation is not None:
                matrix, _ = evaluate_split(accelerator.unwrap_model(model), validation, eval_processor,
                                           batch_size=eval_batch, accelerator=accelerator, desc="validation",
                                           padded_frames=data["padded_frames"])
                scores = summarise(matrix, class_names, task)
                record.update({name: value for name, value in scores.items() if not isinstance(value, (dict, list))})
                accelerator.log({f"validation/{name}": value for name, value in record.items()
                                 if name not in ("step", "epoch") and value is not None}, step=step)
                logger.info("step %d (epoch %.2f) validation: %s", step, epoch, _headline(scores, task))
                improved = is_better(scores[training["metric_for_best"]], state["best_metric"],
                                     training["greater_is_better"])
            else:
                improved = True
            state["history"].append(record)
            if improved:
                state.update(best_metric=record.get(training["metric_for_best"]), best_step=step, best_epoch=epoch)
                accelerator.unwrap_model(model).save_pretrained(
                    best_dir, state_dict=full_state_dict(accelerator, model),
                    is_main_process=accelerator.is_main_process, save_function=accelerator.save)
            accelerator.wait_for_everyone()
            checkpoints.save(step, {**state, "world_size": world_size, "effective_batch_size": effective_batch})
        elif step == stop_at:
            checkpoints.save(step, {**state, "world_size": world_size, "effective_batch_size": effective_batch})
    progress.close()

    results = None
    if step >= max_steps:
        results = finish(accelerator, model, settings, state, splits, eval_processor, class_names, init_report,
                         {"steps": step, "steps_per_epoch": steps_per_epoch, "effective_batch_size": effective_batch,
                          "peak_lr": peak_lr, "world_size": world_size, "final_train_loss": last_loss,
                          "train_examples": len(subset), "train_examples_total": len(train_full),
                          "train_subset_indices": subset.tolist() if data["train_fraction"] < 1 else None,
                          "train_seconds": time.perf_counter() - started})
    del model, optimizer
    end_training(accelerator)
    return results


def _headline(scores: dict, task: str) -> str:
    names = ("accuracy", "mean_f1", "kappa") if task == "classification" else \
        ("mean_iou", "overall_accuracy", "mean_f1", "kappa")
    return ", ".join(f"{name} {scores[name]:.4f}" for name in names if scores.get(name) is not None)


def finish(accelerator, model, settings, state, splits, eval_processor, class_names, init_report, run) -> dict:
    """Test evaluation of the best model, results JSON, plots, final model folder (+ card, + push)."""
    data, training, task = settings["data"], settings["training"], settings["model"]["task"]
    output_dir = Path(training["output_dir"])
    unwrapped = accelerator.unwrap_model(model)
    best_weights = output_dir / "best_model" / "model.safetensors"
    if best_weights.is_file():
        from safetensors.torch import load_file

        load_full_state_dict(accelerator, model, load_file(str(best_weights)))
    results = {
        "task": task,
        "dataset": {"source": data["source"], "name": data["name"], "path": data["path"],
                    "train_fraction": data["train_fraction"], "subset_seed": data["subset_seed"]},
        "class_names": class_names,
        "initialisation": init_report,
        "best": {"metric": training["metric_for_best"], "value": state["best_metric"], "step": state["best_step"],
                 "epoch": state["best_epoch"]},
        "validation_history": state["history"],
        "run": run,
    }
    test_name = data["test_split"]
    quicklooks = []
    if test_name:
        batch_size = int(training["eval_batch_size"] or training["per_device_batch_size"])
        matrix, quicklooks = evaluate_split(unwrapped, splits[test_name], eval_processor, batch_size=batch_size,
                                            accelerator=accelerator, num_quicklooks=int(training["num_quicklooks"]),
                                            desc="test", padded_frames=data["padded_frames"])
        results["test"] = summarise(matrix, class_names, task)
        results["test"]["split"] = test_name
        accelerator.log({f"test/{name}": value for name, value in results["test"].items()
                         if isinstance(value, float)}, step=run["steps"])
        logger.info("test (best model, step %s): %s", state["best_step"], _headline(results["test"], task))
    folder = output_dir / "model"
    unwrapped.save_pretrained(folder, state_dict=full_state_dict(accelerator, model),
                              is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    if accelerator.is_main_process:
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        eval_processor.save_pretrained(folder)
        shutil.copy(output_dir / "results.json", folder / "results.json")
        if "test" in results:
            plot_confusion_matrix(torch.tensor(results["test"]["confusion_matrix"]), class_names,
                                  output_dir / "confusion_matrix.png",
                                  f"{test_name}: mIoU {results['test'].get('mean_iou') or 0:.3f}"
                                  if task == "segmentation" else
                                  f"{test_name}: accuracy {results['test']['accuracy'] or 0:.3f}")
            shutil.copy(output_dir / "confusion_matrix.png", folder / "confusion_matrix.png")
            band_names = eval_processor.band_names or splits[test_name][0].get("band_names")
            save_quicklooks(quicklooks, band_names, class_names, output_dir / "quicklooks", task)
        plot_loss_curve(output_dir / "logs" / "metrics.jsonl", output_dir / "loss_curve.png")
        write_finetuned_card(folder, results, settings)
        if training["push_to_hub"]:
            url = push_folder_to_hub(folder, training["push_to_hub"], f"TiMo fine-tuned ({task}), {run['steps']} steps")
            results["pushed_to"] = url
            (output_dir / "results.json").write_text(json.dumps(results, indent=2))
            logger.info("Pushed %s to %s", folder, url)
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, FileExistsError, ValueError) as err:
        logger.error("%s", err)
        raise SystemExit(f"finetune.py: error: {err}") from None
