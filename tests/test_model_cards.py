"""Model cards (model_cards/) and README.md: metadata, and every code block runs against tiny random checkpoints.

Python blocks of a file run in order in one namespace (pre-filled with `import torch` and `from timo_hf import *`),
with the Hub ids and paths they mention replaced by local stand-ins: a tiny random TiMo for `timo-hf/timo-*`, a
tiny fine-tuned folder for `runs/.../model`, the official golden checkpoint for `TiMo_base.pth`, a synthetic raw
copy for `/data/MultiSenGE`, a local folder for the Hub repo `me/multisenge`; `TiMoConfig.from_preset` gives the
tiny architecture of the golden checkpoint. Shell blocks: every `accelerate launch training/finetune.py ...`
command is checked by the script's argument parser (config file, every override); other shell lines (make, pip,
pre-training commands with placeholders) are not run. A block preceded by `<!-- skip-test: reason -->` is skipped.
"""

import re
import shlex
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from timo_hf import TiMoConfig, TiMoModel

from .conftest import SHARED_GOLDEN


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
sys.path.insert(0, str(ROOT / "model_cards"))

import card_generator  # noqa: E402
import finetune  # noqa: E402


FENCE = re.compile(r"(?P<skip><!-- skip-test[^>]*-->\s*\n)?^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```", re.M | re.S)
GOLDEN_ARCH = dict(hidden_sizes=[32, 64, 128, 256], num_heads=[2, 4, 8, 16], depths=[1, 1, 2, 1],
                   attention_types=["dstga", "stga", "mhsa", "mhsa"])


def code_blocks(text: str) -> list[tuple[str, str]]:
    return [(match["lang"], match["code"]) for match in FENCE.finditer(text) if not match["skip"]]


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def check_finetune_commands(code: str) -> int:
    """Parse every `accelerate launch training/finetune.py` command with the script's own parser."""
    checked = 0
    for command in code.replace("\\\n", " ").splitlines():
        words = shlex.split(command, comments=True)
        if "training/finetune.py" not in words:
            continue
        arguments = words[words.index("training/finetune.py") + 1:]
        config = arguments[arguments.index("--config") + 1]
        assert (ROOT / config).is_file(), config
        arguments[arguments.index("--config") + 1] = str(ROOT / config)
        finetune.parse_args(arguments)
        checked += 1
    return checked


def run_blocks(text: str, substitutions: dict[str, str]) -> dict[str, int]:
    namespace: dict = {}
    exec("import torch\nfrom timo_hf import *", namespace)
    counts = {"python": 0, "commands": 0}
    for lang, code in code_blocks(text):
        if lang == "python":
            for old, new in substitutions.items():
                code = code.replace(old, new)
            exec(compile(code, "<code block>", "exec"), namespace)
            counts["python"] += 1
        elif lang in ("bash", "sh", "shell"):
            counts["commands"] += check_finetune_commands(code)
    return counts


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny") / "timo-tiny"
    config = TiMoConfig(hidden_sizes=[16, 32, 48, 64], num_heads=[2, 2, 4, 4], depths=[1, 1, 1, 1])
    TiMoModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """A tiny model fine-tuned for 2 steps by training/finetune.py (its folder holds the generated card)."""
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path_factory.mktemp("finetuned")
    try:
        finetune.main(["--config", str(ROOT / "training" / "configs" / "time_tells_tiny.yaml"), "--output_dir",
                       str(out), "--data.options.num_samples", "{train: 16, validation: 4, test: 4}",
                       "--max_steps", "2", "--num_quicklooks", "0"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return out / "model"


# ------------------------------------------------------------------------------------------------ pre-trained cards
@pytest.mark.parametrize("variant", ["base", "large", "huge"])
def test_pretrained_card_is_generated_and_has_the_hub_metadata(variant):
    text = (ROOT / "model_cards" / f"timo-{variant}.md").read_text()
    assert text == card_generator.pretrained_card(variant), "run `python model_cards/card_generator.py`"
    meta = front_matter(text)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-feature-extraction"
    assert {"timo", "satellite-image-time-series"} <= set(meta["tags"]) and meta["datasets"] == ["millionst"]
    assert meta["license"] == "unknown"
    for section in ("## Intended use", "## Inputs", "## Limitations", "## Citation", "B4, B3, B2", "divided by 255",
                    "## Results reported by the paper"):
        assert section in text, section
    widths = card_generator.VARIANTS[variant]["widths"]
    assert ", ".join(map(str, widths)) in text and f"[1, {widths[-1]}]" in text


def test_paper_results_enter_the_model_index_marked_as_reported(monkeypatch, tmp_path):
    table = yaml.safe_load((ROOT / "model_cards" / "paper_results.yaml").read_text())
    table["values"]["base"]["multisenge_t3"] = 12.34
    (tmp_path / "paper_results.yaml").write_text(yaml.safe_dump(table))
    shutil.copy(ROOT / "model_cards" / "pretrained_template.md", tmp_path)
    monkeypatch.setattr(card_generator, "CARDS_DIR", tmp_path)
    text = card_generator.pretrained_card("base")
    result = front_matter(text)["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "mean_iou", "value": 12.34, "name": "mIoU"}
    assert result["source"]["name"] == "reported by the TiMo paper (arXiv 2505.08723)"
    assert "**reported by the paper**" in text and "| MultiSenGE (T=3) | mIoU | 12.34 |" in text


@pytest.mark.parametrize("variant", ["base", "large", "huge"])
def test_pretrained_card_code_blocks_run(variant, tiny_checkpoint):
    text = (ROOT / "model_cards" / f"timo-{variant}.md").read_text()
    counts = run_blocks(text, {f"timo-hf/timo-{variant}": tiny_checkpoint})
    assert counts == {"python": 2, "commands": 1}


# ------------------------------------------------------------------------------------------------ fine-tuned cards
def test_finetuned_card_metadata_results_and_code(finetuned):
    text = (finetuned / "README.md").read_text()
    results = yaml.safe_load((finetuned / "results.json").read_text())
    meta = front_matter(text)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-segmentation"
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["mean_iou"] == round(results["test"]["mean_iou"], 4)
    assert "Not numbers from the paper" in text and "| stable (1 level) |" in text
    assert "B4, B3, B2" in text and "(x - mean) / std" in text
    assert run_blocks(text, {}) == {"python": 1, "commands": 0}


def test_finetuned_template_has_no_unfilled_fields(finetuned):
    text = (finetuned / "README.md").read_text()
    assert not re.search(r"\$[a-z_]+", text)


# ------------------------------------------------------------------------------------------------ README
def test_readme_code_blocks_run(tmp_path, monkeypatch, tiny_checkpoint, finetuned):
    import datasets

    from timo_hf.data import write_synthetic

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(TiMoConfig, "from_preset", classmethod(lambda cls, name, **kw: cls(**{**GOLDEN_ARCH, **kw})))
    golden = SHARED_GOLDEN / "timo_official_small.pt"
    text = (ROOT / "README.md").read_text()
    if golden.is_file():
        torch.save(torch.load(golden, weights_only=True)["state_dict"], tmp_path / "TiMo_base.pth")
    else:  # users' clones have no ../shared: leave out the block that converts an official checkpoint
        block = "```python\nfrom timo_hf import TiMoConfig, convert_original_checkpoint"
        text = text.replace(block, "<!-- skip-test -->\n" + block)
    raw = write_synthetic("multisenge", tmp_path / "MultiSenGE")
    hub = tmp_path / "hub"

    def fake_push_to_hub(folder_or_dataset, repo_id, **kwargs):
        shutil.copytree(folder_or_dataset, repo_id, dirs_exist_ok=True)

    substitutions = {"timo-hf/timo-base": tiny_checkpoint, "timo-hf/timo-large": tiny_checkpoint,
                     "runs/time-tells-tiny/model": str(finetuned), "/data/MultiSenGE": str(raw),
                     "me/multisenge": str(hub / "me" / "multisenge")}
    with mock.patch("timo_hf.data.push_to_hub", fake_push_to_hub):
        counts = run_blocks(text, substitutions)
    assert counts["python"] >= 7 and counts["commands"] >= 3
    assert (tmp_path / "timo-base" / "model.safetensors").is_file() or not golden.is_file()
