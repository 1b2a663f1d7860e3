"""Model cards of TiMo: the pre-trained variants and every model `training/finetune.py` produces.

* `write_finetuned_card(folder, results, settings)` renders `finetuned_template.md` into `<folder>/README.md`: YAML
  metadata (library, pipeline tag, tags, dataset, licence, base model, model-index with this run's test results),
  the results table, per-class scores, inputs, a usage example and the training settings.
* `pretrained_card(variant)` renders `pretrained_template.md` for `base`, `large` or `huge`, with the model-index
  of the paper's reported results (`paper_results.yaml`, marked as reported by the paper).
  `python model_cards/card_generator.py` rewrites `timo-base.md`, `timo-large.md` and `timo-huge.md`.

Only string templates (`string.Template`, `$name` fields) and `huggingface_hub.ModelCardData` for the metadata.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCardData


CARDS_DIR = Path(__file__).resolve().parent
PAPER_URL = "https://arxiv.org/abs/2505.08723"
HUB_NAMESPACE = "timo-hf"  # repository ids of the pre-trained variants: timo-hf/timo-base, ...
VARIANTS = {
    "base": {"widths": [128, 256, 512, 1024], "heads": [4, 8, 16, 32], "depths": [2, 2, 18, 2],
             "parameters": "90.2M", "paper_parameters": "91M"},
    "large": {"widths": [384, 768, 960, 1536], "heads": [6, 12, 24, 48], "depths": [2, 2, 18, 2],
              "parameters": "296.9M", "paper_parameters": "298M"},
    "huge": {"widths": [512, 1024, 1280, 2048], "heads": [8, 16, 32, 64], "depths": [3, 3, 22, 3],
             "parameters": "672.5M", "paper_parameters": "675M"},
}
TAGS = ["timo", "satellite-image-time-series", "remote-sensing", "earth-observation", "sentinel-2"]
PIPELINE_TAGS = {"segmentation": "image-segmentation", "classification": "image-classification"}
SCORE_NAMES = {"overall_accuracy": "overall accuracy", "accuracy": "accuracy", "mean_iou": "mIoU",
               "mean_accuracy": "mAcc", "mean_f1": "mF1", "kappa": "Cohen's kappa"}


def render(template: str, **fields) -> str:
    return string.Template((CARDS_DIR / template).read_text()).substitute(**fields)


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------------------ pre-trained
def paper_results(variant: str) -> list[dict]:
    """The paper's reported numbers for `variant` that are transcribed in `paper_results.yaml` (value not null)."""
    table = yaml.safe_load((CARDS_DIR / "paper_results.yaml").read_text())
    values = table["values"].get(variant, {})
    return [{**entry, "value": values[entry["key"]]} for entry in table["experiments"]
            if values.get(entry["key"]) is not None]


def pretrained_card(variant: str) -> str:
    spec = VARIANTS[variant]
    repo_id = f"{HUB_NAMESPACE}/timo-{variant}"
    reported = paper_results(variant)
    eval_results = [
        EvalResult(task_type=entry["task"], dataset_type=entry["dataset_type"], dataset_name=entry["dataset"],
                   metric_type=entry["metric_type"], metric_name=entry["metric"], metric_value=entry["value"],
                   dataset_split="test", source_name="reported by the TiMo paper (arXiv 2505.08723)",
                   source_url=PAPER_URL)
        for entry in reported
    ]
    metadata = ModelCardData(
        library_name="transformers", pipeline_tag="image-feature-extraction", license="unknown",
        tags=TAGS + ["masked-image-modeling", "foundation-model"], datasets=["millionst"],
        model_name=f"timo-{variant}" if eval_results else None, eval_results=eval_results or None,
    )
    if reported:
        lines = ["These numbers are **reported by the paper** (fine-tuned TiMo-" + variant.capitalize() + "), not "
                 "measured by timo-hf:", "", "| dataset | metric | reported (%) |", "| --- | --- | --- |"]
        lines += [f"| {entry['dataset']} | {entry['metric']} | {entry['value']} |" for entry in reported]
    else:
        lines = ["The paper's downstream numbers for this variant are not transcribed yet (`model_cards/"
                 "paper_results.yaml`), so this card has no model-index. Until then, see the tables of "
                 f"[arXiv 2505.08723]({PAPER_URL}); any number there is reported by the paper, not measured by "
                 "timo-hf."]
    return render(
        "pretrained_template.md", metadata=metadata.to_yaml(), title=f"TiMo-{variant.capitalize()}",
        variant=f"TiMo-{variant.capitalize()}", repo_id=repo_id, widths=", ".join(map(str, spec["widths"])),
        heads=", ".join(map(str, spec["heads"])), depths=", ".join(map(str, spec["depths"])),
        parameters=spec["parameters"], paper_parameters=spec["paper_parameters"], last_width=spec["widths"][-1],
        paper_results="\n".join(lines),
    )


def write_pretrained_cards(folder: Path = CARDS_DIR) -> list[Path]:
    paths = []
    for variant in VARIANTS:
        path = Path(folder) / f"timo-{variant}.md"
        path.write_text(pretrained_card(variant))
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ fine-tuned
def _results_table(test: dict, task: str) -> str:
    names = ["accuracy", "mean_f1", "kappa"] if task == "classification" else \
        ["mean_iou", "overall_accuracy", "mean_accuracy", "mean_f1", "kappa"]
    header = "| " + " | ".join(SCORE_NAMES[name] for name in names) + " |"
    return "\n".join([header, "|" + " --- |" * len(names),
                      "| " + " | ".join(_fmt(test.get(name)) for name in names) + " |"])


def _per_class_table(test: dict, class_names: list[str], task: str) -> str:
    columns = ["per_category_f1", "per_category_accuracy"] if task == "classification" else \
        ["per_category_iou", "per_category_f1", "per_category_accuracy"]
    titles = {"per_category_iou": "IoU", "per_category_f1": "F1", "per_category_accuracy": "accuracy (recall)"}
    lines = ["| class | " + " | ".join(titles[c] for c in columns) + " |", "| --- |" + " --- |" * len(columns)]
    for name in class_names:
        lines.append(f"| {name} | " + " | ".join(_fmt(test[c].get(name)) for c in columns) + " |")
    return "\n".join(lines)


def _normalisation(processor: dict) -> str:
    if processor.get("normalization"):
        return f"preset `{processor['normalization']}`"
    mean, std = processor.get("image_mean"), processor.get("image_std")
    if mean is None and std is None:
        return "none (raw values)"
    def as_text(values) -> str:
        return ", ".join(f"{x:.4g}" for x in values) if isinstance(values, list) else f"{values}"

    return f"`(x - mean) / std` with mean [{as_text(mean)}] and std [{as_text(std)}]"


def finetuned_card(results: dict, settings: dict, processor: dict, config: dict, repo_id: str) -> str:
    """The card of a fine-tuned model folder (`processor` / `config`: its preprocessor and model config dicts)."""
    task, data, training = results["task"], settings["data"], settings["training"]
    generated = data["source"] == "time_tells"
    dataset_name = data["name"] or ("only time tells (generated)" if generated else str(data["path"]))
    dataset_type = data["name"] or data["source"]
    test = results.get("test")
    pretrained = settings["model"]["pretrained"]
    eval_results = None
    if test:
        headline = ["accuracy", "mean_f1"] if task == "classification" else \
            ["mean_iou", "overall_accuracy", "mean_f1", "kappa"]
        eval_results = [
            EvalResult(task_type=PIPELINE_TAGS[task], dataset_type=dataset_type, dataset_name=dataset_name,
                       dataset_split=test["split"], metric_type=name, metric_name=SCORE_NAMES[name],
                       metric_value=round(test[name], 4))
            for name in headline if test.get(name) is not None
        ]
    metadata = ModelCardData(
        library_name="transformers", pipeline_tag=PIPELINE_TAGS[task], license="unknown",
        tags=TAGS + [task, "timo-finetuned"], datasets=[dataset_type],
        base_model=pretrained if pretrained and not Path(pretrained).exists() else None,  # Hub ids only
        model_name=(Path(repo_id).name if training["push_to_hub"] else f"timo-{dataset_type}-{task}")
        if eval_results else None, eval_results=eval_results or None,
    )
    per_frame = (task == "segmentation" and config.get("temporal_fusion") == "none") or \
        (task == "classification" and config.get("classifier_pooling") == "per_frame")
    prediction_shape = {("segmentation", False): "one class map per series, `[batch, height, width]`",
                        ("segmentation", True): "one class map per frame, `[batch, time, height, width]`",
                        ("classification", False): "one class per series, `[batch]`",
                        ("classification", True): "one class per frame, `[batch, time]`"}[(task, per_frame)]
    frames = processor.get("num_frames") or "all"
    size = processor.get("size")
    example_size = 64 if not size else max(size["height"], 32)
    run = results["run"]
    lr_text = f"{run['peak_lr']:.3g} ({training['scheduler']}, warm-up {training['warmup_epochs']} epochs)"
    rows = [("initial weights", results["initialisation"]["source"]),
            ("optimizer steps", f"{run['steps']} ({run['steps_per_epoch']} per epoch)"),
            ("effective batch", f"{run['effective_batch_size']} ({run['world_size']} "
                                f"process{'es' if run['world_size'] > 1 else ''})"),
            ("learning rate", lr_text),
            ("optimizer", f"AdamW {tuple(training['betas'])}, weight decay {training['weight_decay']} "
                          "(not on norms and biases)"),
            ("drop path", str(config.get("drop_path_rate"))),
            ("training examples", f"{run['train_examples']} of {run['train_examples_total']} "
                                  f"(fraction {data['train_fraction']}, subset seed {data['subset_seed']})"),
            ("model selection", f"best validation {training['metric_for_best']}")]
    init = results["initialisation"]["newly_initialised"]
    new_parts = [f"{entry['tensors']} {name.replace('_', ' ')} tensors"
                 for name, entry in init.items() if entry["tensors"]]
    initialisation = results["initialisation"]["source"]
    if new_parts and not initialisation.startswith("random"):
        initialisation += f"; newly initialised: {', '.join(new_parts)}"
    bands = results["initialisation"].get("bands")
    if bands:
        kept, new, dropped = (", ".join(bands[key]) or "none" for key in ("kept", "new", "dropped"))
        initialisation += (f"; stem adapted to the data's bands (pre-trained filters kept for {kept}; new: {new}; "
                           f"dropped: {dropped})")
    fraction = float(data["train_fraction"])
    title = Path(repo_id).name if training["push_to_hub"] else f"TiMo fine-tuned on {dataset_name}"
    return render(
        "finetuned_template.md", metadata=metadata.to_yaml(), title=title,
        task_description="semantic segmentation" if task == "segmentation" else "image classification",
        task_title="Semantic segmentation" if task == "segmentation" else "Image classification",
        dataset_name=dataset_name, initialisation=initialisation,
        test_split=test["split"] if test else "(none)", num_evaluated=test["num_evaluated"] if test else 0,
        unit="pixels" if task == "segmentation" else ("frames" if per_frame else "series"),
        best_metric=training["metric_for_best"], best_step=results["best"]["step"],
        best_epoch=_fmt(results["best"]["epoch"], 2),
        results_table=_results_table(test, task) if test else "No test split was evaluated.",
        per_class_table=_per_class_table(test, results["class_names"], task) if test else "",
        bands=", ".join(processor.get("band_names") or [f"{config.get('num_channels')} bands as in the dataset"]),
        frames=frames, temporal_sampling=processor.get("temporal_sampling", "all"),
        temporal_encoding="frame index" if processor.get("temporal_encoding", "index") == "index" else "days",
        size=f"{size['height']} x {size['width']} px (resized)" if size else "native size of the input",
        normalisation=_normalisation(processor), model_class="TiMoForSemanticSegmentation" if task == "segmentation"
        else "TiMoForImageClassification", repo_id=repo_id, example_frames=frames if isinstance(frames, int) else 3,
        num_channels=config.get("num_channels"), example_size=example_size,
        class_dim="1" if task == "segmentation" and not per_frame else ("2" if task == "segmentation" else "-1"),
        prediction_shape=prediction_shape, train_examples=run["train_examples"],
        fraction_note=f" (a fixed {fraction:.0%} subset)" if fraction < 1 else "",
        training_table="\n".join(f"| {name} | {value} |" for name, value in rows),
    )


def write_finetuned_card(folder, results: dict, settings: dict, repo_id: str | None = None) -> Path:
    """Render the card of the fine-tuned model saved in `folder` (with its config and preprocessor) to README.md."""
    folder = Path(folder)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    repo_id = repo_id or settings["training"]["push_to_hub"] or str(folder)
    path = folder / "README.md"
    path.write_text(finetuned_card(results, settings, processor, config, repo_id))
    return path


if __name__ == "__main__":
    for written in write_pretrained_cards():
        print(f"wrote {written}")
