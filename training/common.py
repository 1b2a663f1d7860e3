"""Utilities shared by the timo_hf training scripts (`pretrain.py`; a fine-tuning script reuses them).

- configuration: YAML defaults merged with `--section.key value` command-line overrides;
- optimisation: AdamW parameter groups without weight decay on norms and biases, the `base_lr * batch / 256`
  rule, linear warm-up then cosine decay per optimizer step;
- tracking: a JSONL tracker for accelerate (plus TensorBoard when installed) and the loss-curve PNG;
- checkpoints: `accelerator.save_state` into numbered folders written atomically, rotation, and resume from the
  latest or a given folder with clear errors for corrupt ones.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate.tracking import GeneralTracker


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
    `micro` (under autocast; gradients are synchronised across processes on the last one only), backward of
    `loss / accumulation`, optional clipping, step, zero_grad. Returns the loss averaged over micro-batches and
    processes and the gradient norm (None without clipping); a non-finite loss raises FloatingPointError."""
    losses = []
    for micro in range(accumulation):
        sync = contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            loss = loss_of(micro)
            accelerator.backward(loss / accumulation)
        losses.append(loss.detach().float())
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)) if max_grad_norm else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mean_loss = float(accelerator.reduce(torch.stack(losses).mean(), reduction="mean"))
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"Loss became {mean_loss} at step {step + 1}; lower the learning rate or check data.")
    return mean_loss, grad_norm


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
        """Drop records after `step` (a run resumed from that step rewrites them)."""
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
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
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    records = [r for r in read_jsonl(metrics_path) if key in r] if Path(metrics_path).is_file() else []
    if not records:
        return None
    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    axis.plot([r["step"] for r in records], [r[key] for r in records], linewidth=1.2)
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

    def save(self, step: int, training_state: dict) -> Path:
        accelerator = self.accelerator
        final = self.directory / f"step_{step:08d}"
        staging = self.directory / f".incomplete-step_{step:08d}"
        if accelerator.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            if staging.exists():
                shutil.rmtree(staging)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
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

    def load(self, resume: str | os.PathLike) -> dict:
        """Restore model, optimizer, scaler and RNG states from a checkpoint; return its training state.

        Raises `CheckpointError` naming the folder when it is incomplete or corrupt (no fallback to another one).
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
        try:
            self.accelerator.load_state(str(path))
        except Exception as err:  # safetensors, pickle and shape errors all mean the same thing here
            raise CheckpointError(
                f"Checkpoint {path} is corrupt and cannot be loaded ({type(err).__name__}: {err}). Nothing was "
                "deleted; resume from another checkpoint with --resume <folder>."
            ) from err
        return training_state


def open_checkpoints(accelerator, output_dir: str | os.PathLike, training: dict) -> CheckpointManager:
    """The `CheckpointManager` of `<output_dir>/checkpoints` (`training.save_total_limit`); refuses to start a new run
    over existing checkpoints unless `training.resume` or `training.overwrite_output_dir` is set."""
    checkpoints = CheckpointManager(accelerator, Path(output_dir) / "checkpoints", training["save_total_limit"])
    if checkpoints.checkpoints() and not training["resume"] and not training["overwrite_output_dir"]:
        raise FileExistsError(
            f"{output_dir} already holds checkpoints; pass --resume latest to continue, or "
            "--overwrite_output_dir true / another --output_dir to start over."
        )
    return checkpoints


def truncate_logs_after(accelerator, step: int) -> None:
    """A run resumed from `step` logs the later steps again: drop them from the JSONL log first (main process)."""
    if step and accelerator.is_main_process:
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
