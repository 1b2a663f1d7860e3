"""Hub integration: save/load round trips, Auto classes, remote code without timo_hf, push_to_hub (offline)."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
)
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

import timo_hf.modeling_timo
from timo_hf import TiMoBackbone, TiMoConfig, TiMoImageProcessor, TiMoModel
from timo_hf.modeling_timo import TiMoForImageClassification, TiMoForSemanticSegmentation


EXPECTED_AUTO_MAP = {
    "AutoConfig": "configuration_timo.TiMoConfig",
    "AutoModel": "modeling_timo.TiMoModel",
    "AutoBackbone": "modeling_timo.TiMoBackbone",
    "AutoModelForImageClassification": "modeling_timo.TiMoForImageClassification",
    "AutoModelForSemanticSegmentation": "modeling_timo.TiMoForSemanticSegmentation",
    "AutoModelForMaskedImageModeling": "modeling_timo_mim.TiMoForMaskedImageModeling",
}


# modeling_timo.py and every module it imports relatively (configuration_timo.py, attention kernels, the MIM model...)
MODULE_FILES = sorted(
    {Path(timo_hf.modeling_timo.__file__).name}
    | {Path(f).name for f in get_relative_import_files(timo_hf.modeling_timo.__file__)}
)


@pytest.fixture
def config(tiny_config_kwargs):
    return TiMoConfig(num_labels=3, **tiny_config_kwargs)


def build(model_class, config):
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that their saving is checked too
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean") or name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model


def assert_same_state(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert [k for k in state_a if not torch.equal(state_a[k], state_b[k])] == []


def logits_of(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values)[0]


@pytest.mark.parametrize(
    "model_class, auto_class",
    [
        (TiMoModel, AutoModel),
        (TiMoForImageClassification, AutoModelForImageClassification),
        (TiMoForSemanticSegmentation, AutoModelForSemanticSegmentation),
    ],
)
def test_round_trip_through_auto_classes_is_bit_exact(tmp_path, config, model_class, auto_class):
    model = build(model_class, config)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    assert isinstance(AutoConfig.from_pretrained(tmp_path), TiMoConfig)
    reloaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(reloaded) is model_class  # the installed classes win over the copied remote code
    assert_same_state(model, reloaded)
    pixel_values = torch.randn(2, 2, 3, 40, 48)
    assert torch.equal(logits_of(model, pixel_values), logits_of(reloaded, pixel_values))


def test_backbone_from_a_saved_folder(tmp_path, config):
    """`AutoBackbone.from_pretrained(<local folder>)` is broken in transformers 5.24 (it asks the Hub whether the
    path is a repo, HFValidationError); the working routes are `AutoBackbone.from_config` + `TiMoBackbone`."""
    config.out_features = ["stage1", "stage4"]
    backbone = build(TiMoBackbone, config)
    backbone.save_pretrained(tmp_path)
    assert isinstance(AutoBackbone.from_config(AutoConfig.from_pretrained(tmp_path)), TiMoBackbone)
    reloaded = TiMoBackbone.from_pretrained(tmp_path).eval()
    assert_same_state(backbone, reloaded)
    assert reloaded.out_features == ["stage1", "stage4"]


def test_head_starts_from_a_pretrained_bare_model(tmp_path, config):
    encoder = build(TiMoModel, config)
    encoder.save_pretrained(tmp_path)
    for head_class in (TiMoForImageClassification, TiMoForSemanticSegmentation):
        head = head_class.from_pretrained(tmp_path, num_labels=5)
        assert head.config.num_labels == 5
        assert_same_state(encoder, head.timo)


def test_saved_folder_carries_complete_remote_code(tmp_path, config):
    build(TiMoForSemanticSegmentation, config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == EXPECTED_AUTO_MAP
    assert saved["architectures"] == ["TiMoForSemanticSegmentation"]
    shipped = {"modeling_timo.py", "configuration_timo.py", "attention_timo.py", "modeling_timo_mim.py"}
    assert shipped <= set(MODULE_FILES)
    assert sorted(p.name for p in tmp_path.glob("*.py")) == MODULE_FILES
    # The copied modules may only import torch, transformers (and its huggingface_hub) and the standard library.
    allowed = {"torch", "transformers", "huggingface_hub", *sys.stdlib_module_names}
    for module_file in tmp_path.glob("*.py"):
        assert sorted(set(get_imports(module_file)) - allowed) == [], module_file.name


REMOTE_CODE_CHECK = textwrap.dedent(
    """
    import sys
    sys.path[:] = [p for p in sys.path if p and "site-packages" not in p] + [sys.argv[2]]
    try:
        import timo_hf
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("timo_hf must not be importable here, got " + timo_hf.__file__)
    import torch
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForMaskedImageModeling,
                              AutoModelForSemanticSegmentation)
    folder = sys.argv[1]
    try:
        AutoModelForSemanticSegmentation.from_pretrained(folder)
    except ValueError as error:
        assert "trust_remote_code" in str(error), error
    else:
        raise SystemExit("remote code was loaded without trust_remote_code=True")
    reference = torch.load(folder + "/reference.pt", weights_only=True)
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        logits = model(reference["pixel_values"]).logits
    assert torch.equal(logits, reference["logits"]), (logits - reference["logits"]).abs().max()
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    bare = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert processor.band_names == ["B4", "B3", "B2"], processor.band_names
    mim = AutoModelForMaskedImageModeling.from_pretrained(folder, trust_remote_code=True)
    print("REMOTE-CODE-OK", *(type(item).__name__ for item in (config, model, bare, processor, mim)))
    """
)


def test_remote_code_loads_where_timo_hf_is_not_importable(tmp_path, config):
    """A fresh interpreter without site processing (so without the editable timo_hf install) and outside the
    repository loads the saved folder through `trust_remote_code=True` and reproduces the logits exactly."""
    folder = tmp_path / "timo-seg"
    model = build(TiMoForSemanticSegmentation, config)
    model.save_pretrained(folder)
    TiMoImageProcessor(normalization="rgb_uint8").save_pretrained(folder)
    pixel_values = torch.randn(1, 2, 3, 32, 40)
    torch.save({"pixel_values": pixel_values, "logits": logits_of(model, pixel_values)}, folder / "reference.pt")
    script = tmp_path / "check_remote_code.py"
    script.write_text(REMOTE_CODE_CHECK)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    result = subprocess.run(
        [sys.executable, "-S", str(script), str(folder), sysconfig.get_paths()["purelib"]],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("REMOTE-CODE-OK TiMoConfig TiMoForSemanticSegmentation TiMoModel TiMoImageProcessor "
            "TiMoForMaskedImageModeling") in result.stdout


class OfflineHub:
    """Stand-in for `huggingface_hub.HfApi` that commits into a local folder (no network)."""

    def __init__(self, root: Path):
        self.root = root

    def create_repo(self, repo_id, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            target = self.root / repo_id / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(operation.path_or_fileobj, target)
        return SimpleNamespace(commit_url=f"offline://{repo_id}", oid="0" * 40, pr_url=None)


def test_push_to_hub_offline_simulation(tmp_path, config):
    """OFFLINE SIMULATION of push_to_hub: transformers' Hub client is replaced by a local folder, so this checks
    what would be uploaded and that it loads back, not the network round trip."""
    model = build(TiMoForImageClassification, config)
    card = ModelCard("---\nlibrary_name: transformers\n---\n# TiMo test card\n")
    with (
        mock.patch("transformers.utils.hub.hf_api", return_value=OfflineHub(tmp_path / "hub")),
        mock.patch("transformers.utils.hub.create_and_tag_model_card", return_value=card),
    ):
        model.push_to_hub("someone/timo-tiny-classifier")
    repo = tmp_path / "hub" / "someone" / "timo-tiny-classifier"
    uploaded = sorted(p.name for p in repo.iterdir())
    assert uploaded == sorted(["README.md", "config.json", "model.safetensors", *MODULE_FILES])
    assert json.loads((repo / "config.json").read_text())["auto_map"] == EXPECTED_AUTO_MAP
    reloaded = AutoModelForImageClassification.from_pretrained(repo).eval()
    assert_same_state(model, reloaded)
    pixel_values = torch.randn(2, 3, 3, 32, 32)
    assert torch.equal(logits_of(model, pixel_values), logits_of(reloaded, pixel_values))


def test_image_processor_loads_through_auto_image_processor(tmp_path):
    from transformers import AutoImageProcessor

    from timo_hf import TiMoImageProcessor

    processor = TiMoImageProcessor(band_names=["B4", "B3", "B2"], image_mean=[0.1, 0.2, 0.3], image_std=[1, 2, 3])
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, TiMoImageProcessor)
    assert reloaded.to_dict() == processor.to_dict()
