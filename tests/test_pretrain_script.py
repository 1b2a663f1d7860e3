"""training/pretrain.py end to end on CPU: loss falls, exact resume, 2-process DDP, fine-tuning the result, errors."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from timo_hf import TiMoForMaskedImageModeling, TiMoForSemanticSegmentation
from timo_hf.image_processing_timo import TiMoImageProcessor

from .conftest import accelerate_launch


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))

import common  # noqa: E402
import pretrain  # noqa: E402


TINY = str(REPO / "training" / "configs" / "tiny_cpu.yaml")


def write_series(folder: Path, count: int, frames: int = 10, size: int = 64, seed: int = 0) -> Path:
    """`count` uint8 RGB series `[frames, 3, size, size]`: a colour per series, a linear ramp across the image and a
    seasonal brightness factor per date, plus noise: units are predictable from the visible ones."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows, cols = np.mgrid[0:size, 0:size] / (size - 1)
    for index in range(count):
        colour = rng.uniform(20, 230, size=(3, 1, 1))
        ramp = rng.uniform(-30, 30, size=(3, 1, 1)) * rows + rng.uniform(-30, 30, size=(3, 1, 1)) * cols
        season = 1 + 0.2 * np.sin(0.6 * np.arange(frames) + rng.uniform(0, 6))
        series = season[:, None, None, None] * (colour + ramp)[None] + rng.normal(0, 3, (frames, 3, size, size))
        np.save(folder / f"{index:06d}.npy", np.clip(series, 0, 255).astype(np.uint8))
    return folder


def run_script(tmp: Path, corpus: Path, *overrides: str) -> dict:
    return pretrain.main(["--config", TINY, "--data.path", str(corpus), "--output_dir", str(tmp), *overrides])


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in common.read_jsonl(run_dir / "logs" / "metrics.jsonl")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_series(tmp_path_factory.mktemp("corpus"), 16)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus) -> Path:
    run_dir = tmp_path_factory.mktemp("trained")
    run_script(run_dir, corpus, "--max_steps", "40", "--lr", "4e-3", "--save_steps", "1000")
    return run_dir


# ---------------------------------------------------------------------------------------------- learning
def test_loss_falls_clearly_on_a_generated_corpus(trained_run):
    """40 steps of batch 4 at lr 4e-3 (warm-up 2, cosine), tiny model, per-unit normalised targets: the mean loss
    of the last 10 steps must be below 80% of that of the first 5 (measured 1.03 -> 0.55; over seeds 0-3 the ratio
    was 0.45-0.63)."""
    per_step = losses(trained_run)
    assert sorted(per_step) == list(range(1, 41))
    first, last = np.mean([per_step[s] for s in range(1, 6)]), np.mean([per_step[s] for s in range(31, 41)])
    assert last < 0.8 * first, (first, last)
    records = common.read_jsonl(trained_run / "logs" / "metrics.jsonl")
    assert all({"loss", "lr", "samples_per_second", "epoch"} <= set(r) for r in records)
    assert (trained_run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    folder = trained_run / "model"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert (folder / name).is_file(), name
    processor = TiMoImageProcessor.from_pretrained(folder)
    assert len(processor.image_mean) == 3 and 20 < processor.image_mean[0] < 240
    summary = json.loads((trained_run / "run_summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 40


def test_a_script_checkpoint_fine_tunes_through_semantic_segmentation(trained_run):
    folder = trained_run / "model"
    mim = TiMoForMaskedImageModeling.from_pretrained(folder)
    model = TiMoForSemanticSegmentation.from_pretrained(folder, num_labels=3)
    assert model.config.attention_types == ["dstga", "dstga", "mhsa", "mhsa"]
    for key, value in mim.timo.state_dict().items():
        assert torch.equal(model.timo.state_dict()[key], value), key
    assert torch.equal(model.timo.embeddings.stem.conv1.weight, mim.timo.embeddings.stem.conv1.weight)
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, 3, 64, 64)
    labels = (pixel_values[:, 0, 0] > 0).long() + (pixel_values[:, 0, 1] > 1).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    history = []
    for _ in range(8):
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < history[0]


def test_continued_pretraining_adapts_the_start_to_the_data_bands(tmp_path, trained_run):
    """The RGB model, saved with a processor naming B4, B3, B2, continues on 4-band series (B2, B3, B4, B8): its
    stem and pixel prediction keep the three bands' weights in the data's order, B8 starts at zero (lr 0 here, so
    the saved model shows exactly that)."""
    import shutil

    from timo_hf.image_processing_timo import TiMoImageProcessor

    start = Path(shutil.copytree(trained_run / "model", tmp_path / "start"))
    TiMoImageProcessor(band_names=["B4", "B3", "B2"], image_mean=[0.0] * 3, image_std=[255.0] * 3,
                       ).save_pretrained(start)
    TiMoImageProcessor(band_names=["B2", "B3", "B4", "B8"], image_mean=[0.0] * 4, image_std=[255.0] * 4,
                       ).save_pretrained(tmp_path / "processor")
    corpus = tmp_path / "four_bands"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        np.save(corpus / f"{index:06d}.npy", rng.integers(0, 255, (10, 4, 64, 64), dtype=np.uint8))

    run_script(tmp_path / "run", corpus, "--model.pretrained", str(start), "--model.config.num_channels", "4",
               "--data.processor", str(tmp_path / "processor"), "--max_steps", "1", "--lr", "0")

    before = TiMoForMaskedImageModeling.from_pretrained(start)
    after = TiMoForMaskedImageModeling.from_pretrained(tmp_path / "run" / "model")
    stem, old_stem = after.timo.embeddings.stem.conv1.weight, before.timo.embeddings.stem.conv1.weight
    assert torch.equal(stem[:, :3], old_stem.flip(1)) and not stem[:, 3].any()
    rows = after.decoder.prediction.weight.view(4, -1, after.decoder.prediction.in_features)
    old_rows = before.decoder.prediction.weight.view(3, -1, before.decoder.prediction.in_features)
    assert torch.equal(rows[:3], old_rows.flip(0)) and not rows[3].any()


# ---------------------------------------------------------------------------------------------- resume
def test_interrupted_run_resumes_exactly(tmp_path, corpus):
    """Batch 2 x accumulation 2 on 16 series = 4 steps per epoch; interrupted after step 3 (mid-epoch), resumed to
    step 6 (next epoch): losses and final weights equal those of an uninterrupted run, bit for bit, with drop path
    (the restored global RNG is not drawn from when the data loader starts). Then a run over the same folder with
    --overwrite_output_dir starts clean: its own checkpoints and log records only."""
    settings = ("--max_steps", "6", "--per_device_batch_size", "2", "--gradient_accumulation_steps", "2",
                "--save_steps", "2", "--save_total_limit", "2", "--max_grad_norm", "1.0",
                "--model.config.drop_path_rate", "0.3")
    whole = run_script(tmp_path / "whole", corpus, *settings)
    first = run_script(tmp_path / "parts", corpus, *settings, "--stop_at_step", "3")
    assert not first["finished"] and not (tmp_path / "parts" / "model").exists()
    names = sorted(p.name for p in (tmp_path / "parts" / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000003"]
    second = run_script(tmp_path / "parts", corpus, *settings, "--resume", "latest")

    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")  # steps 1-3 from the first part, 4-6 resumed
    assert second["rank_parameter_digests"] == whole["rank_parameter_digests"]
    names = sorted(p.name for p in (tmp_path / "parts" / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000006"]  # rotation kept the newest two

    run_script(tmp_path / "parts", corpus, *settings, "--overwrite_output_dir", "true", "--max_steps", "2")
    assert sorted(p.name for p in (tmp_path / "parts" / "checkpoints").iterdir()) == ["step_00000002"]
    assert list(losses(tmp_path / "parts")) == [1, 2]


def test_resume_errors_are_clear_and_lose_nothing(tmp_path, corpus):
    settings = ("--max_steps", "2", "--save_steps", "1", "--per_device_batch_size", "2")
    with pytest.raises(common.CheckpointError, match="no complete checkpoint"):
        run_script(tmp_path, corpus, *settings, "--resume", "latest")
    run_script(tmp_path, corpus, *settings)
    with pytest.raises(FileExistsError, match="--resume latest"):
        run_script(tmp_path, corpus, *settings)
    latest = tmp_path / "checkpoints" / "step_00000002"
    (latest / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(common.CheckpointError, match="step_00000002 is corrupt"):
        run_script(tmp_path, corpus, *settings, "--max_steps", "3", "--resume", "latest")
    (latest / "training_state.json").write_text("{")
    with pytest.raises(common.CheckpointError, match="cannot read training_state.json"):
        run_script(tmp_path, corpus, *settings, "--max_steps", "3", "--resume", str(latest))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    # starting over is an explicit choice: the corrupt checkpoints are replaced by the new run's
    assert run_script(tmp_path, corpus, *settings, "--overwrite_output_dir", "true")["finished"]
    assert json.loads((latest / "training_state.json").read_text())["step"] == 2
    assert sorted(losses(tmp_path)) == [1, 2]


# ---------------------------------------------------------------------------------------------- distributed
def test_two_process_ddp_run_keeps_ranks_identical(tmp_path, corpus):
    accelerate_launch(
        REPO / "training" / "pretrain.py", "--config", TINY, "--data.path", str(corpus), "--output_dir", str(tmp_path),
        "--max_steps", "3", "--save_steps", "2", "--per_device_batch_size", "2", timeout=300,
    )
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["effective_batch_size"] == 4
    first, second = summary["rank_parameter_digests"]
    assert first == second
    assert {p.name for p in (tmp_path / "checkpoints" / "step_00000002").iterdir()} >= {
        "random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "optimizer.bin"
    }
    saved = TiMoForMaskedImageModeling.from_pretrained(tmp_path / "model")
    assert common.state_digest(dict(saved.named_parameters())) == first == summary["parameter_digest"]
    assert sorted(losses(tmp_path)) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------- data and config
def test_npy_series_named_by_data_band_names_give_a_model_that_knows_its_bands(tmp_path, corpus):
    """Bare .npy series name no bands: `data.band_names` names them, and the saved image processor records them
    (timo predict / timo embed pick the model's bands from files by these names)."""
    import json

    run_script(tmp_path / "named", corpus, "--max_steps", "1", "--data.band_names", "[B4, B3, B2]")
    saved = json.loads((tmp_path / "named" / "model" / "preprocessor_config.json").read_text())
    assert saved["band_names"] == ["B4", "B3", "B2"] and len(saved["image_mean"]) == 3


def test_series_shorter_than_the_frame_draw(tmp_path):
    short = write_series(tmp_path / "short", 4, frames=2)
    with pytest.raises(ValueError, match="has 2 frames but data.num_frames = 3.*short_series: repeat"):
        run_script(tmp_path / "error", short, "--max_steps", "1", "--per_device_batch_size", "2")
    summary = run_script(
        tmp_path / "repeat", short, "--max_steps", "1", "--per_device_batch_size", "2", "--short_series", "repeat"
    )
    assert summary["finished"]


def test_configuration_merging_and_overrides():
    tokens = ["--lr", "1e-3", "--model.config.mask_ratio=0.5", "--data.image_size", "[32, 32]"]
    overrides = common.parse_cli_overrides(tokens)
    assert overrides == {"lr": 0.001, "model.config.mask_ratio": 0.5, "data.image_size": [32, 32]}
    merged = common.merge_config(pretrain.DEFAULTS, {"training": {"max_steps": 5}}, overrides)
    assert merged["training"]["lr"] == 0.001 and merged["training"]["max_steps"] == 5
    assert merged["model"]["config"] == {"mask_ratio": 0.5} and merged["data"]["image_size"] == [32, 32]
    with pytest.raises(ValueError, match="Unknown setting training.max_step "):
        common.merge_config(pretrain.DEFAULTS, {"training": {"max_step": 5}}, {})
    with pytest.raises(ValueError, match="--nonsense is unknown"):
        common.merge_config(pretrain.DEFAULTS, {}, {"nonsense": 1})


def test_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--help"])
    shown = capsys.readouterr().out
    for section, values in pretrain.DEFAULTS.items():
        for key in values:
            assert f"--{section}.{key} " in shown
    assert '--training.base_lr 0.00015' in shown and '--data.source "npy"' in shown


def test_a_loss_curve_of_one_logged_step_shows_the_point(tmp_path):
    """A very short run logs one loss: the curve must still show it (a line through one point draws nothing)."""
    from matplotlib.image import imread

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    image = imread(common.plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png"))
    line_colour = np.array([0x1F, 0x77, 0xB4]) / 255  # matplotlib's first colour (C0)
    assert (np.abs(image[..., :3] - line_colour).max(axis=-1) < 0.05).sum() > 4


def test_optimizer_groups_and_schedule():
    model = pretrain.build_model({**pretrain.DEFAULTS["model"], "config": {
        "hidden_sizes": [16, 32, 48, 64], "num_heads": [2, 2, 4, 4], "depths": [1, 1, 1, 1],
        "mim_decoder_hidden_size": 32, "mim_decoder_depth": 1, "mim_decoder_num_heads": 2}})
    decay, no_decay = common.weight_decay_param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "decoder.mask_token" in no_decay_names and "timo.embeddings.stem.layernorm.weight" in no_decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert common.scaled_learning_rate(1.5e-4, 512) == pytest.approx(3e-4)
    schedule = [common.warmup_cosine_lr(step, 1.0, 10, 2) for step in range(10)]
    assert schedule[:3] == [0.5, 1.0, 1.0] and schedule[-1] < 0.05
    assert all(earlier > later for earlier, later in zip(schedule[2:], schedule[3:]))


def test_push_to_hub_uploads_the_final_folder(tmp_path):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload_folder", folder_path, repo_id))
            return "https://hub/commit/1"

    assert common.push_folder_to_hub(tmp_path, "user/timo-mim", "msg", api=FakeApi()) == "https://hub/commit/1"
    assert calls == [("create_repo", "user/timo-mim"), ("upload_folder", str(tmp_path), "user/timo-mim")]


def test_project_dataset_loader_streams_into_the_script_and_resumes_exactly(tmp_path):
    """data.source timo: the MillionST builder (official npy + CSV layout), streamed with a shuffle block of 3 and
    read through the image processor; interrupted after step 2 (mid-block, mid-epoch) and resumed from the saved stream
    position, the run repeats the losses of an uninterrupted one."""
    from timo_hf.data.synthetic import write_millionst

    raw = write_millionst(tmp_path / "millionst", layout="npy", num_locations=6, num_timestamps=10, size=64)
    settings = ("--data.source", "timo", "--data.name", "millionst", "--data.streaming", "true",
                "--data.options", "{layout: npy}", "--data.normalization", "rgb_uint8", "--data.shuffle_buffer", "3",
                "--max_steps", "4", "--per_device_batch_size", "2", "--save_steps", "2")
    whole = run_script(tmp_path / "whole", raw, *settings)
    assert whole["finished"] and np.isfinite(whole["final_loss"])
    processor = TiMoImageProcessor.from_pretrained(tmp_path / "whole" / "model")
    assert processor.normalization == "rgb_uint8"

    run_script(tmp_path / "parts", raw, *settings, "--stop_at_step", "2")
    state = json.loads((tmp_path / "parts" / "checkpoints" / "step_00000002" / "data_state_rank0.json").read_text())
    assert state["samples_consumed"] == 4 and state["block_offset"] not in (0, None)  # resumed mid-block
    resumed = run_script(tmp_path / "parts", raw, *settings, "--resume", "latest")
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    assert resumed["parameter_digest"] == whole["parameter_digest"]


def test_tensorboard_receives_the_metrics_when_installed(tmp_path, corpus):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (optional); JSONL logging only")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_script(tmp_path, corpus, "--max_steps", "2", "--per_device_batch_size", "2")
    events = [EventAccumulator(str(path)) for path in (tmp_path / "logs" / "timo_pretrain").glob("events*")]
    scalars = {tag: [e.value for e in event.Scalars(tag)] for event in events if event.Reload()
               for tag in event.Tags()["scalars"]}
    assert scalars["loss"] == pytest.approx([record for _, record in sorted(losses(tmp_path).items())])
