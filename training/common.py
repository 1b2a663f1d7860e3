"""Utilities shared by the timo_hf training scripts (`pretrain.py`; a fine-tuning script reuses them).

- configuration: YAML defaults merged with `--section.key value` command-line overrides;
- optimisation: AdamW parameter groups without weight decay on norms and biases, the `base_lr * batch / 256`
  rule, linear warm-up then cosine decay per optimizer step;
- tracking: a JSONL tracker for accelerate (plus TensorBoard when installed) and the loss-curve PNG;
- checkpoints: `accelerator.save_state` into numbered folders written atomically, rotation, and resume from the
  latest or a given folder with clear errors for corrupt ones.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import hashlib
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate.tracking import GeneralTracker
from transformers.utils import logging as transformers_logging

from timo_hf import TiMoConfig, TiMoImageProcessor
from timo_hf.band_adaptation import NEW_BAND_WEIGHTS
from timo_hf.image_processing_timo import canonical_band
from timo_hf.plotting import pyplot


logger = logging.getLogger("timo_hf.training")


# ----------------------------------------------------------------------------------------------- configuration
class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 loader that also reads `1e-3` / `3E+2` (no dot) as floats, as YAML 1.2 and humans do."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str):
    """A command-line or YAML scalar: `10` -> int, `1e-3` -> float, `[1, 2]` -> list, `null` -> None."""
    return yaml.load(text, Loader=_ConfigLoader)


def parse_cli_overrides(tokens: list[str]) -> dict[str, object]:
    """`["--training.max_steps", "10", "--lr", "1e-3"]` -> `{"training.max_steps": 10, "lr": 0.001}`.

    Values are parsed as YAML (`10` -> int, `[1, 2]` -> list, `null` -> None, `true` -> bool); `--key=value` works.
    """
    overrides, index = {}, 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"Expected a --key value override, got {token!r}.")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if index + 1 >= len(tokens) or tokens[index + 1].startswith("--"):
                raise ValueError(f"Override --{key} needs a value.")
            index += 1
            value = tokens[index]
        overrides[key.replace("-", "_")] = parse_value(value)
        index += 1
    return overrides


def config_fields() -> set[str]:
    """What a `model.config` section may set: the TiMoConfig fields, and the properties `num_labels`,
    `out_features` and `out_indices`."""
    fields = {field.name for field in dataclasses.fields(TiMoConfig) if not field.name.startswith("_")}
    return fields | {"num_labels", "out_features", "out_indices"}


def processor_fields() -> set[str]:
    """What a `data.processor` section may set: the arguments of TiMoImageProcessor."""
    parameters = inspect.signature(TiMoImageProcessor.__init__).parameters
    return {name for name, parameter in parameters.items()
            if name != "self" and parameter.kind is not inspect.Parameter.VAR_KEYWORD}


def check_fields(values: dict, known: set[str], setting: str) -> None:
    """Refuse entries of a free-form setting that the class it feeds does not know: the class would keep them as
    stray attributes, and a misspelt option would silently do nothing."""
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown field(s) {unknown} in {setting}; known: {sorted(known)}")


def start_bands(model_settings: dict) -> list[str] | None:
    """The bands of the start in its stem's order: `model.pretrained_bands`, else the `band_names` of the image
    processor saved with `model.pretrained` (None where neither names them)."""
    if model_settings["pretrained_bands"]:
        return list(model_settings["pretrained_bands"])
    if not model_settings["pretrained"]:
        return None
    try:
        return TiMoImageProcessor.from_pretrained(model_settings["pretrained"]).band_names
    except OSError:  # the start has no image processor
        return None


def bands_to_adapt(model_settings: dict, band_names: list[str] | None) -> list[str] | None:
    """The start's bands where its stem is to be adapted to the data's `band_names`: both known, in another order
    or set, and sharing at least one band (None otherwise)."""
    if not (model_settings["adapt_bands"] and band_names):
        return None
    pretrained_bands = start_bands(model_settings)
    if not pretrained_bands:
        return None
    start, data = [canonical_band(band) for band in pretrained_bands], [canonical_band(band) for band in band_names]
    if not set(start) & set(data):
        logger.info("The data's bands %s share none with the start's %s: the stem is not adapted.",
                    band_names, pretrained_bands)
        return None
    return pretrained_bands if start != data else None


def check_band_settings(model_settings: dict) -> None:
    """Refuse an unknown `model.new_band_weights` at start-up (it is read only where bands are adapted)."""
    if model_settings["new_band_weights"] not in NEW_BAND_WEIGHTS:
        raise ValueError(f"model.new_band_weights must be one of {NEW_BAND_WEIGHTS}, got "
                         f"{model_settings['new_band_weights']!r}.")


def plan_band_adaptation(model_settings: dict, band_names: list[str] | None) -> tuple[dict, list[str] | None]:
    """(the model settings to load the start with, the start's bands to adapt its input layers from, or None).

    Where the stem is to be adapted (`bands_to_adapt`), the start loads with its own band count, and
    `timo_hf.band_adaptation.adapt_input_bands(model, pretrained_bands, band_names)` then carries it over."""
    pretrained_bands = bands_to_adapt(model_settings, band_names)
    if pretrained_bands is None:
        return model_settings, None
    requested = model_settings["config"].get("num_channels")
    if requested is not None and requested != len(band_names):
        raise ValueError(f"model.config.num_channels is {requested} but the data has {len(band_names)} bands "
                         f"({band_names}); drop num_channels.")
    config = {**model_settings["config"], "num_channels": len(pretrained_bands)}
    return {**model_settings, "config": config}, pretrained_bands


@contextlib.contextmanager
def without_load_report():
    """Silence transformers' per-key report of a `from_pretrained` whose summary the script logs itself (the newly
    initialised groups): dozens of lines per head otherwise."""
    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(previous)


def settings_parser(description: str, defaults: dict, script: str) -> argparse.ArgumentParser:
    """The script's argument parser: `--config` and, in `--help`, every `--section.key` setting with its default
    (the comments beside DEFAULTS in `script` say what each does)."""
    lines = [f"settings (--section.key value; the comments beside DEFAULTS in {script} explain them):"]
    for section, values in defaults.items():
        lines += [f"  --{section}.{key} {json.dumps(value)}" for key, value in values.items()]
    parser = argparse.ArgumentParser(description=description, epilog="\n".join(lines),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with model / data / training sections")
    return parser


def merge_config(defaults: dict, file_config: dict | None, overrides: dict[str, object]) -> dict:
    """Defaults <- YAML file <- overrides, for a two-level `{section: {key: value}}` configuration.

    Sections and keys must exist in `defaults` (a typo is an error naming the known keys). A key whose default is
    an empty dict is free-form (e.g. `model.config`, passed on to the model configuration): its entries are merged
    and can be overridden as `--section.key.entry value`. An override without a section (`--max_steps 10`) is
    accepted when exactly one section has that key.
    """
    config = copy.deepcopy(defaults)

    def assign(section: str, key: str, value, where: str, entry: str | None = None):
        if section not in config:
            raise ValueError(f"Unknown section {section!r} ({where}); known sections: {sorted(config)}")
        if key not in config[section]:
            raise ValueError(
                f"Unknown setting {section}.{key} ({where}); known in {section}: {sorted(config[section])}"
            )
        free_form = isinstance(defaults[section][key], dict)
        if entry is not None:
            if not free_form:
                raise ValueError(f"Setting {section}.{key}.{entry} ({where}): {section}.{key} is a plain value.")
            config[section][key][entry] = value
        elif free_form:
            if not isinstance(value, dict):
                raise ValueError(f"Setting {section}.{key} ({where}) must be a mapping, got {value!r}.")
            config[section][key].update(value)
        else:
            config[section][key] = value

    for section, values in (file_config or {}).items():
        if not isinstance(values, dict):
            raise ValueError(f"Section {section!r} of the config file must be a mapping, got {values!r}.")
        for key, value in values.items():
            assign(section, key, value, "config file")
    for dotted, value in overrides.items():
        path = dotted.split(".")
        if len(path) == 1:
            sections = [name for name, section in config.items() if dotted in section]
            if len(sections) != 1:
                raise ValueError(
                    f"Override --{dotted} is {'ambiguous' if sections else 'unknown'}; use --<section>.{dotted} "
                    f"(sections: {sorted(config)})."
                )
            path = [sections[0], dotted]
        if len(path) > 3:
            raise ValueError(f"Override --{dotted} is nested too deeply (section.key or section.key.entry).")
        assign(path[0], path[1], value, "command line", entry=path[2] if len(path) == 3 else None)
    return config


def flatten_settings(tree: dict, prefix: str = "") -> dict:
    """`{"training": {"lr": 1e-3}}` -> `{"training.lr": 1e-3}` (empty mappings kept as values), for trackers."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_yaml(path: str | os.PathLike | None) -> dict:
    if path is None:
        return {}
    with open(path) as handle:
        loaded = yaml.load(handle, Loader=_ConfigLoader) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: the configuration file must hold a mapping of sections.")
    return loaded


# ----------------------------------------------------------------------------------------------- optimisation
def weight_decay_param_groups(
    model: torch.nn.Module, weight_decay: float, no_decay_names: tuple[str, ...] = ("mask_token",)
) -> list[dict]:
    """Two AdamW groups: weight decay on weight matrices and convolution kernels; none on biases, norm scales and
    shifts (every parameter with fewer than 2 dimensions) nor on parameters whose name ends with `no_decay_names`."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or name.endswith(no_decay_names):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_learning_rate(base_lr: float, effective_batch_size: int, reference_batch_size: int = 256) -> float:
    """The linear scaling rule of MAE and TiMo: `base_lr * effective_batch / 256`."""
    return base_lr * effective_batch_size / reference_batch_size


def warmup_cosine_lr(step: int, peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up from 0 over `warmup_steps`, then half-cycle
    cosine from `peak_lr` down to `min_lr` at `total_steps`."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate


def optimizer_step(accelerator, model, optimizer, loss_of, accumulation: int, max_grad_norm: float | None,
                   step: int) -> tuple[float, float | None]:
    """One optimizer step over `accumulation` micro-batches: `loss_of(micro)` computes the loss of micro-batch
    `micro` (under autocast), backward, optional clipping, step, zero_grad. Returns the loss averaged over
    micro-batches and processes and the gradient norm (None without clipping); a non-finite loss raises
    FloatingPointError.

    The accelerator must have been built with `gradient_accumulation_steps=accumulation`: `accelerator.backward`
    then divides each loss by it (DeepSpeed's engine does the same with the value accelerate hands it), and
    `sync_gradients` is set per micro-batch so that gradients are reduced, and DeepSpeed's engine steps, on the
    last micro-batch only, whatever the engine (DDP, FSDP, DeepSpeed)."""
    if accelerator.gradient_accumulation_steps != accumulation:
        raise ValueError(
            f"The accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches but the step has "
            f"{accumulation}; build it with Accelerator(gradient_accumulation_steps={accumulation})."
        )
    losses = []
    for micro in range(accumulation):
        last = micro == accumulation - 1
        accelerator.sync_gradients = last
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            loss = loss_of(micro)
            accelerator.backward(loss)
        losses.append(loss.detach().float())
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm) if max_grad_norm else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mean_loss = float(accelerator.reduce(torch.stack(losses).mean(), reduction="mean"))
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"Loss became {mean_loss} at step {step + 1}; lower the learning rate or check data.")
    return mean_loss, None if grad_norm is None else float(grad_norm)


def full_state_dict(accelerator, model) -> dict:
    """The whole model's state dict, gathered from the shards under FSDP / DeepSpeed ZeRO-3 (on the main process;
    other processes may get an empty dict). Every process must call it: gathering is collective."""
    return accelerator.get_state_dict(model)


def load_full_state_dict(accelerator, model, state_dict: dict) -> None:
    """Load a whole-model state dict into a prepared model, sharded (FSDP2: the main process's copy is broadcast into
    the shards) or not."""
    if getattr(accelerator, "is_fsdp2", False):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
        set_model_state_dict(model, state_dict if accelerator.is_main_process else {}, options=options)
    else:
        accelerator.unwrap_model(model).load_state_dict(state_dict, strict=True)


def state_digest(state_dict: dict) -> str:
    """SHA-256 of every tensor's bytes, in name order (equal digests = bit-identical weights and buffers)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def is_sharded(accelerator) -> bool:
    """Whether each process holds only part of the weights (FSDP, DeepSpeed)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def end_training(accelerator) -> None:
    """`accelerator.end_training()` (trackers closed, process group destroyed) once the accelerator's references to
    the prepared model and optimizer are gone; the caller drops its own first. A DDP reducer that outlives its gloo
    process group can hang in the group's destructor at interpreter exit."""
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


def derive_seed(*parts: int) -> int:
    """A 32-bit seed that depends on every part (run seed, epoch, step, rank, ...), independent of global RNGs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------- tracking
class JsonlTracker(GeneralTracker):
    """accelerate tracker writing one JSON object per `log` call (`{"step": N, ...values}`) to
    `<dir>/metrics.jsonl`."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, logging_dir: str | os.PathLike, filename: str = "metrics.jsonl"):
        super().__init__()
        self.path = Path(logging_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        (self.path.parent / "run_config.json").write_text(json.dumps(values, indent=2, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs):
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records after `step` (a run resumed from that step rewrites them), all of them for step 0 (a run
        that starts over)."""
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if step and line and json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept))


def make_trackers(logging_dir: str | os.PathLike) -> list:
    """The JSONL tracker, plus accelerate's TensorBoard tracker when `tensorboard` is installed."""
    trackers: list = [JsonlTracker(logging_dir)]
    if importlib.util.find_spec("tensorboard") is not None:
        trackers.append("tensorboard")
    return trackers


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike, key: str = "loss") -> Path | None:
    """Plot `key` against `step` from a metrics JSONL file to a PNG (None when nothing was logged)."""
    plt = pyplot()

    records = [r for r in read_jsonl(metrics_path) if key in r] if Path(metrics_path).is_file() else []
    if not records:
        return None
    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    # Markers where there are few points: a line through one point draws nothing.
    axis.plot([r["step"] for r in records], [r[key] for r in records], linewidth=1.2,
              marker="o" if len(records) <= 20 else None, markersize=3)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(key)
    axis.set_title(f"{key} per step")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)
    return Path(png_path)


# ----------------------------------------------------------------------------------------------- checkpoints
class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from (missing, incomplete or corrupt); nothing was deleted."""


class CheckpointManager:
    """Numbered `accelerator.save_state` folders `<directory>/step_<N>` written atomically, with rotation.

    A save goes to `.incomplete-step_<N>` (every rank writes its part there), gets `training_state.json` last,
    and is renamed to `step_<N>` by the main process; only then are the oldest complete checkpoints beyond
    `total_limit` deleted, so a crash during a save never costs an existing checkpoint. Left-over `.incomplete-*`
    folders are not checkpoints and are never resumed from.
    """

    STATE_FILE = "training_state.json"
    PATTERN = re.compile(r"^step_(\d+)$")

    def __init__(self, accelerator, directory: str | os.PathLike, total_limit: int | None = None):
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.total_limit = total_limit

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self.PATTERN.match(p.name))]
        return [path for _, path in sorted(found)]

    def save(self, step: int, training_state: dict, write_rank_files=None) -> Path:
        """Write checkpoint `step`; `write_rank_files(folder)`, if given, runs on every process once the
        accelerator's state is in the folder (e.g. each rank's data position)."""
        accelerator = self.accelerator
        final = self.directory / f"step_{step:08d}"
        staging = self.directory / f".incomplete-step_{step:08d}"
        if accelerator.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            if staging.exists():
                shutil.rmtree(staging)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        if write_rank_files is not None:
            write_rank_files(staging)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state_path = staging / self.STATE_FILE
            state_path.write_text(json.dumps({**training_state, "step": step}, indent=2, default=str))
            if final.exists():  # the same step saved again (e.g. a resumed run): replace it only now
                shutil.rmtree(final)
            os.replace(staging, final)
            self._rotate(keep=final)
        accelerator.wait_for_everyone()
        return final

    def _rotate(self, keep: Path) -> None:
        if not self.total_limit:
            return
        complete = [path for path in self.checkpoints() if path != keep]
        for path in complete[: max(len(complete) + 1 - self.total_limit, 0)]:
            shutil.rmtree(path)

    def resolve(self, resume: str | os.PathLike) -> Path:
        """`"latest"` -> the newest complete checkpoint under the directory; anything else is a checkpoint folder."""
        if str(resume) == "latest":
            complete = self.checkpoints()
            if not complete:
                raise CheckpointError(
                    f"--resume latest: no complete checkpoint (step_<N> folder) in {self.directory}."
                )
            return complete[-1]
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder.")
        return path

    def load(self, resume: str | os.PathLike, model=None, optimizer=None) -> dict:
        """Restore model, optimizer, scaler and RNG states from a checkpoint; return its training state.

        A checkpoint written with sharded weights (FSDP, `pytorch_model_fsdp_0/`) resumes in a run that keeps whole
        weights (one process, DDP) and the reverse: `model` and `optimizer` (the prepared ones) are then loaded
        from the whole-model states (see `load_across_layouts`). Between two sharded runs, torch.distributed
        .checkpoint re-shards for any process count. Raises `CheckpointError` naming the folder when it is
        incomplete or corrupt (no fallback to another one).
        """
        path = self.resolve(resume)
        state_path = path / self.STATE_FILE
        try:
            training_state = json.loads(state_path.read_text())
            int(training_state["step"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"Checkpoint {path} is incomplete or corrupt: cannot read {self.STATE_FILE} ({err}). Nothing was "
                "deleted; resume from another checkpoint with --resume <folder>."
            ) from err
        saved, running = checkpoint_layout(path), weights_layout(self.accelerator)
        try:
            if saved == running:
                self.accelerator.load_state(str(path))
            elif model is None or optimizer is None:
                raise ValueError(f"a checkpoint with {saved} weights needs the model and optimizer to convert")
            else:
                load_across_layouts(self.accelerator, path, saved, model, optimizer)
        except Exception as err:  # safetensors, pickle and shape errors all mean the same thing here
            raise CheckpointError(
                f"Checkpoint {path} is corrupt and cannot be loaded ({type(err).__name__}: {err}). Nothing was "
                "deleted; resume from another checkpoint with --resume <folder>."
            ) from err
        return training_state


SHARDED_MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's names for FSDP's SHARDED_STATE_DICT checkpoints
SHARDED_OPTIMIZER_DIR = "optimizer_0"


def checkpoint_layout(path: Path) -> str:
    """`"sharded"` for a checkpoint written under FSDP (torch.distributed.checkpoint folders), else `"whole"`."""
    return "sharded" if (path / SHARDED_MODEL_DIR).is_dir() else "whole"


def weights_layout(accelerator) -> str:
    """How `accelerator.save_state` of this run writes weights: `"sharded"` under FSDP with a sharded state dict."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if getattr(accelerator, "is_fsdp2", False) and "SHARDED" in str(getattr(plugin, "state_dict_type", "")):
        return "sharded"
    return "whole"


def _read_distributed_checkpoint(folder: Path) -> dict:
    """A torch.distributed.checkpoint folder as one in-memory dict of whole tensors (no process group needed)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "whole.pt"
        dcp_to_torch_save(str(folder), str(target))
        return torch.load(target, weights_only=True)


def _optimizer_state_by_name(saved: dict, optimizer, names: dict[int, str]) -> dict:
    """`optimizer.state_dict()` format (parameters numbered in param-group order) -> keyed by parameter name."""
    ordered = [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
    return {
        "state": {ordered[index]: value for index, value in saved["state"].items()},
        "param_groups": [{**group, "params": [ordered[i] for i in group["params"]]} for group in saved["param_groups"]],
    }


def load_across_layouts(accelerator, path: Path, saved: str, model, optimizer) -> None:
    """Resume from a checkpoint whose weights layout differs from this run's (sharded <-> whole): model and AdamW
    states are read whole and loaded into this run's layout. RNG states are not restored (they belong to the old
    process layout): only dropout / drop-path draws can differ from an uninterrupted run."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    unwrapped = accelerator.unwrap_model(model)
    inner_optimizer = getattr(optimizer, "optimizer", optimizer)
    if saved == "sharded":
        model_state = _read_distributed_checkpoint(path / SHARDED_MODEL_DIR)["model"]
        optimizer_state = _read_distributed_checkpoint(path / SHARDED_OPTIMIZER_DIR)["optimizer"]
    else:
        model_state = load_file(str(path / "model.safetensors"))
        names = {id(parameter): name for name, parameter in unwrapped.named_parameters()}
        optimizer_state = _optimizer_state_by_name(
            torch.load(path / "optimizer.bin", weights_only=True), inner_optimizer, names
        )
    load_full_state_dict(accelerator, model, model_state)
    sharded = getattr(accelerator, "is_fsdp2", False)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
    if sharded and not accelerator.is_main_process:
        optimizer_state = {}
    set_optimizer_state_dict(unwrapped, inner_optimizer, optimizer_state, options=options)
    scaler = path / "scaler.pt"
    if accelerator.scaler is not None and scaler.is_file():
        accelerator.scaler.load_state_dict(torch.load(scaler, weights_only=True))


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator. Starting an iterator draws the workers' base seed from the loader's generator,
    by default torch's global RNG, which a resumed run has just restored: that draw would shift its dropout and drop
    path masks against an uninterrupted run's."""
    return torch.Generator().manual_seed(seed)


def open_checkpoints(accelerator, output_dir: str | os.PathLike, training: dict) -> CheckpointManager:
    """The `CheckpointManager` of `<output_dir>/checkpoints` (`training.save_total_limit`); refuses to start a new run
    over existing checkpoints unless `training.resume` or `training.overwrite_output_dir` is set. Overwriting deletes
    the old run's checkpoints: kept, they would outrank the new run's in the rotation and in `--resume latest`."""
    checkpoints = CheckpointManager(accelerator, Path(output_dir) / "checkpoints", training["save_total_limit"])
    if checkpoints.checkpoints() and not training["resume"]:
        if not training["overwrite_output_dir"]:
            raise FileExistsError(
                f"{output_dir} already holds checkpoints; pass --resume latest to continue, or "
                "--overwrite_output_dir true / another --output_dir to start over."
            )
        if accelerator.is_main_process:
            shutil.rmtree(checkpoints.directory)
        accelerator.wait_for_everyone()
    return checkpoints


def truncate_logs_after(accelerator, step: int) -> None:
    """A run resumed from `step` logs the later steps again, and one starting at step 0 logs every step anew: drop
    those records from the JSONL log first (main process)."""
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            if isinstance(tracker, JsonlTracker):
                tracker.truncate_after(step)


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, commit_message: str, api=None) -> str:
    """Create (if needed) the model repository `repo_id` and upload `folder` to it; returns the commit URL."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))
