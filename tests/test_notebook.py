"""notebooks/finetune_segmentation.ipynb runs end to end (nbclient) against a tiny random TiMo checkpoint."""

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from timo_hf import TiMoConfig, TiMoModel


NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "finetune_segmentation.ipynb"


def test_finetune_notebook_executes_end_to_end(tmp_path):
    checkpoint = tmp_path / "tiny-timo"
    TiMoModel(TiMoConfig(hidden_sizes=[16, 32, 48, 64], num_heads=[2, 2, 4, 4], depths=[1, 1, 1, 1],
                         uper_hidden_size=16)).save_pretrained(checkpoint)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    parameters[0].source = "\n".join([
        f"PRETRAINED = {str(checkpoint)!r}",
        f"OUTPUT_DIR = {str(tmp_path / 'out')!r}",
        "NUM_TRAIN = 16", "NUM_EPOCHS = 1", "BATCH_SIZE = 8", "LEARNING_RATE = 1e-3",
    ])
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute(env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    except Exception as err:  # nbclient's CellExecutionError carries the failing cell and traceback
        pytest.fail(f"notebook failed: {err}")

    outputs = {index: "".join(output.get("text", "") for output in cell.get("outputs", []))
               for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
    text = "\n".join(outputs.values())
    assert "newly initialised: ['classifier', 'decode_head'" in text
    assert "epoch 1: loss" in text and "mIoU" in text and "kappa" in text
    assert "reloaded model gives the same predictions: True" in text
    assert any(output.get("output_type") == "display_data" and "image/png" in output.get("data", {})
               for cell in notebook.cells for output in cell.get("outputs", []))
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["id2label"] == {"0": "stable (1 level)", "1": "changing (4 levels)"}
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
