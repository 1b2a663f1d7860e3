"""Shared test fixtures: tiny configurations and access to the official golden outputs in ../shared."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timo_hf import TiMoConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# TIMO_GOLDEN_DIR: the golden files elsewhere (e.g. carried to a GPU machine, which has no ../shared).
SHARED_GOLDEN = Path(os.environ.get("TIMO_GOLDEN_DIR", REPO.parent / "shared" / "golden"))
FSDP_ON_CPU = Path(__file__).resolve().with_name("fsdp_on_cpu.py")


def load_golden(name: str) -> dict:
    """Load `../shared/golden/<name>` (or `$TIMO_GOLDEN_DIR/<name>`), skipping the test where the clone has no
    ../shared (users' clones)."""
    path = SHARED_GOLDEN / name
    if not path.is_file():
        pytest.skip(f"official golden file {path} not available (only CI and developers have ../shared)")
    return torch.load(path, weights_only=True)


def config_from_official(official: dict, **fields) -> TiMoConfig:
    """TiMoConfig of an official backbone description (`embed_dims`, `sa_num_heads`, `depths`, `local`, ...)
    as stored in the golden files; `local` codes are 0 MHSA, 1 STGA, 2 D-STGA."""
    return TiMoConfig(
        hidden_sizes=official["embed_dims"],
        num_heads=official["sa_num_heads"],
        depths=official["depths"],
        attention_types=[{0: "mhsa", 1: "stga", 2: "dstga"}[int(code)] for code in official["local"]],
        mlp_ratio=official["mlp_ratios"][0],
        qkv_bias=official["qkv_bias"],
        **fields,
    )


@pytest.fixture
def tiny_config_kwargs() -> dict:
    """Smallest configuration that exercises all three attention types."""
    return dict(
        hidden_sizes=[16, 32, 48, 64],
        num_heads=[2, 2, 4, 4],
        depths=[1, 1, 1, 1],
        attention_types=["dstga", "stga", "mhsa", "mhsa"],
    )


def accelerate_launch(script: str | Path, *args: str, processes: int = 2, fsdp: bool = False, cwd: Path | None = None,
                      timeout: int = 400) -> subprocess.CompletedProcess:
    """`accelerate launch` of a training script on `processes` CPU processes (gloo), as users run it: DDP, or FSDP
    with `training/accelerate/fsdp.yaml` (through `fsdp_on_cpu.py`, which lets accelerate use FSDP on CPUs).
    Fails the test with the tail of stderr when the launch fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port)]
    if fsdp:
        command += ["--config_file", str(REPO / "training" / "accelerate" / "fsdp.yaml"), str(FSDP_ON_CPU)]
    elif processes > 1:
        command.insert(3, "--multi_gpu")
    command += [str(script), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # In a session of its own, so that a launch that hangs is killed with all its worker processes (killing the
    # launcher alone would leave them running, holding CPUs for the rest of the suite).
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"accelerate launch still running after {timeout} s (killed); last stderr:\n{stderr[-4000:]}")
    completed = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed
