"""training/pretrain.py and training/finetune.py under the scale-out engines, on CPU processes (gloo).

FSDP runs use `training/accelerate/fsdp.yaml` through `fsdp_on_cpu.py` (accelerate only enables its FSDP plugin on
accelerator devices). Every run uses 2 series per micro-batch; "one process" runs accumulate 2 micro-batches, so that
a step sees the same samples, masks and BatchNorm batches as a 2-process step: losses then agree to float rounding.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from timo_hf import TiMoForMaskedImageModeling, TiMoForSemanticSegmentation

from .conftest import REPO, accelerate_launch
from .test_pretrain_script import TINY, losses, run_script, write_series


PRETRAIN = REPO / "training" / "pretrain.py"
STEPS = ("--max_steps", "4", "--save_steps", "2", "--per_device_batch_size", "2")
ONE_PROCESS = (*STEPS, "--gradient_accumulation_steps", "2")
# float32 reduction order differs between engines (reduce-scatter vs accumulation): losses agree to ~1e-6
LOSS_TOLERANCE = dict(rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_series(tmp_path_factory.mktemp("corpus"), 16)


def launch_pretrain(output_dir: Path, corpus: Path, *args: str, processes: int = 2, fsdp: bool = False):
    return accelerate_launch(PRETRAIN, "--config", TINY, "--data.path", str(corpus), "--output_dir", str(output_dir),
                             *args, processes=processes, fsdp=fsdp)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, corpus) -> Path:
    run_dir = tmp_path_factory.mktemp("one")
    run_script(run_dir, corpus, *ONE_PROCESS)
    return run_dir


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, corpus) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdp")
    launch_pretrain(run_dir, corpus, *STEPS, fsdp=True)
    return run_dir


def resume_from(checkpoint: Path, run_dir: Path) -> Path:
    """A fresh output folder holding only `checkpoint`, to resume from."""
    shutil.copytree(checkpoint, run_dir / "checkpoints" / checkpoint.name)
    return run_dir


def assert_same_losses(run: Path, reference: Path, steps) -> None:
    got, expected = losses(run), losses(reference)
    for step in steps:
        assert got[step] == pytest.approx(expected[step], **LOSS_TOLERANCE), (step, got, expected)


def test_fsdp_pretraining_matches_one_process(fsdp_run, one_process_run):
    """FSDP2 (full shard, TiMoLayer units) over 2 processes follows the one-process run step by step, writes sharded
    checkpoints, and its final folder is an ordinary checkpoint that loads on one CPU."""
    assert_same_losses(fsdp_run, one_process_run, range(1, 5))
    checkpoint = fsdp_run / "checkpoints" / "step_00000002"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()
    summary = json.loads((fsdp_run / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["rank_parameter_digests"] is None  # shards differ by design

    folder = fsdp_run / "model"
    assert not [path.name for path in folder.iterdir() if path.name.startswith("_fsdp")]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForMaskedImageModeling"] == "modeling_timo_mim.TiMoForMaskedImageModeling"
    sharded = TiMoForMaskedImageModeling.from_pretrained(folder)
    single = TiMoForMaskedImageModeling.from_pretrained(one_process_run / "model")
    for (name, parameter), other in zip(sharded.named_parameters(), single.parameters()):
        torch.testing.assert_close(parameter, other, rtol=1e-4, atol=1e-5, msg=name)


def test_sharded_checkpoint_resumes_on_one_process(fsdp_run, tmp_path, corpus):
    """Save on 2 FSDP processes, resume on 1 plain process: steps 3-4 repeat the uninterrupted FSDP run."""
    run_dir = resume_from(fsdp_run / "checkpoints" / "step_00000002", tmp_path)
    summary = run_script(run_dir, corpus, *ONE_PROCESS, "--resume", "latest")
    assert summary["finished"] and summary["world_size"] == 1
    assert sorted(losses(run_dir)) == [3, 4]
    assert_same_losses(run_dir, fsdp_run, (3, 4))


def test_whole_checkpoint_resumes_on_two_fsdp_processes(one_process_run, tmp_path, corpus):
    """The reverse: save on 1 process, resume with FSDP on 2."""
    run_dir = resume_from(one_process_run / "checkpoints" / "step_00000002", tmp_path)
    launch_pretrain(run_dir, corpus, *STEPS, "--resume", "latest", fsdp=True)
    assert sorted(losses(run_dir)) == [3, 4]
    assert_same_losses(run_dir, one_process_run, (3, 4))


def test_ddp_checkpoints_resume_across_process_counts(one_process_run, tmp_path, corpus):
    """DDP: save on 2 processes and resume on 1, and save on 1 and resume on 2; both follow the one-process run."""
    two = tmp_path / "two"
    launch_pretrain(two, corpus, *STEPS, "--stop_at_step", "2")
    on_one = run_script(resume_from(two / "checkpoints" / "step_00000002", tmp_path / "on_one"), corpus,
                        *ONE_PROCESS, "--resume", "latest")
    assert on_one["finished"]
    assert_same_losses(two, one_process_run, (1, 2))
    assert_same_losses(tmp_path / "on_one", one_process_run, (3, 4))

    on_two = resume_from(one_process_run / "checkpoints" / "step_00000002", tmp_path / "on_two")
    launch_pretrain(on_two, corpus, *STEPS, "--resume", "latest")
    summary = json.loads((on_two / "run_summary.json").read_text())
    first, second = summary["rank_parameter_digests"]
    assert first == second == summary["parameter_digest"]
    assert_same_losses(on_two, one_process_run, (3, 4))


def test_fine_tuning_under_fsdp(tmp_path):
    """finetune.py unchanged under FSDP on 2 processes: validation and test collectives stay in step (9 test series
    over 2 ranks), the best model is reloaded into the shards, and the final folder loads on one CPU."""
    out = tmp_path / "fsdp"
    accelerate_launch(
        REPO / "training" / "finetune.py", "--config", str(REPO / "training" / "configs" / "time_tells_tiny.yaml"),
        "--output_dir", str(out), "--data.options.num_samples", "{train: 16, validation: 3, test: 9}",
        "--max_steps", "2", "--per_device_batch_size", "4", "--eval_batch_size", "2", "--num_quicklooks", "1",
        fsdp=True, cwd=tmp_path,
    )
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["world_size"] == 2
    assert results["test"]["num_evaluated"] == 9 * 32 * 32
    model = TiMoForSemanticSegmentation.from_pretrained(out / "model")
    assert model.config.num_labels == len(results["class_names"])
