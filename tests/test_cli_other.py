"""`timo embed`, `timo export` and `timo info`."""

import json

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import Affine

from timo_hf import TiMoConfig, TiMoModel
from timo_hf.cli import main
from timo_hf.flops import TABLE7_GFLOPS
from timo_hf.modeling_timo import TiMoForImageClassification, TiMoForSemanticSegmentation

from .test_cli_predict import DATES, HEIGHT, NODATA_BOX, TRANSFORM, WIDTH, save_model, tiny_segmentation_config


@pytest.fixture(scope="module")
def segmentation_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("seg"), TiMoForSemanticSegmentation(tiny_segmentation_config()))


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    from .test_cli_predict import scene_arrays, write_frame

    folder = tmp_path_factory.mktemp("scene")
    return [write_frame(folder / f"S2_{date}_L2A.tif", array) for date, array in zip(DATES, scene_arrays())]


# ------------------------------------------------------------------------------------------------ embed
def test_embed_writes_stage_features_on_the_stage_grid(segmentation_dir, scene_files, tmp_path):
    out = tmp_path / "stage2.tif"
    args = ["embed", "--model", str(segmentation_dir), "--inputs", *map(str, scene_files), "--out", str(out),
            "--stage", "stage2", "--tile-size", "64", "--overlap", "16", "--quiet"]
    assert main(args) == 0
    with rasterio.open(out) as dataset:
        assert dataset.count == 16 and dataset.dtypes[0] == "float32"
        assert (dataset.height, dataset.width) == (-(-HEIGHT // 8), -(-WIDTH // 8))
        assert dataset.transform == TRANSFORM @ Affine.scale(8) and dataset.crs.to_epsg() == 32631
        assert dataset.tags()["TIMO_STAGE"] == "stage2"
        features = dataset.read()
    rows, cols = NODATA_BOX
    assert np.isnan(features[:, rows.start // 8 + 1, cols.start // 8 + 1]).all()  # cell inside the nodata box
    assert np.isfinite(features[:, -1, -1]).all() and np.isfinite(features).mean() > 0.9

    per_date = tmp_path / "per_date.tif"
    assert main([*args[:-9], "--out", str(per_date), "--stage", "stage4", "--temporal-pooling", "none",
                 "--tile-size", "64", "--overlap", "32", "--quiet"]) == 0
    with rasterio.open(per_date) as dataset:
        assert dataset.count == 3 * 16 and dataset.descriptions[16] == "t1_c0"
        assert dataset.transform == TRANSFORM @ Affine.scale(32)


def test_embed_matches_the_encoder_on_a_single_tile(segmentation_dir, scene_files, tmp_path):
    """With one tile covering the scene, the embedding is the encoder's own stage map (mean over dates)."""
    from timo_hf.inference import inference_processor, load_processor

    out = tmp_path / "one_tile.tif"
    assert main(["embed", "--model", str(segmentation_dir), "--inputs", *map(str, scene_files), "--out", str(out),
                 "--stage", "stage3", "--tile-size", "192", "--overlap", "0", "--quiet"]) == 0
    encoder = TiMoForSemanticSegmentation.from_pretrained(segmentation_dir).timo.eval()
    processor = inference_processor(load_processor(segmentation_dir))
    series = np.stack([rasterio.open(p).read().astype(np.float32) for p in scene_files])
    series[:, :, (series == 0).any(axis=(0, 1))] = np.nan  # nodata
    tile = np.full((3, 3, 160, 192), np.nan, np.float32)  # the scene padded to multiples of 32
    tile[:, :, :HEIGHT, :WIDTH] = series
    inputs = processor(tile, return_tensors="pt")
    with torch.no_grad():
        stage = encoder.compute_feature_maps(inputs["pixel_values"], inputs["temporal_positions"])[3]
    expected = stage.mean(dim=0).numpy()[:, : -(-HEIGHT // 16), : -(-WIDTH // 16)]
    with rasterio.open(out) as dataset:
        actual = dataset.read()
    finite = np.isfinite(actual)
    assert finite.mean() > 0.9
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ export
def test_export_wrapper_is_frozen_in_eval_mode():
    from timo_hf.inference.exporting import frozen_wrapper

    model = TiMoForSemanticSegmentation(tiny_segmentation_config()).train()
    wrapper = frozen_wrapper(model)
    assert not any(module.training for module in wrapper.modules())
    assert not any(parameter.requires_grad for parameter in wrapper.parameters())
    assert model.training and all(parameter.requires_grad for parameter in model.parameters())  # a copy is frozen


@pytest.mark.slow
def test_export_onnx_and_torch_export_of_the_segmentation_model(segmentation_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "export"
    assert main(["export", "--model", str(segmentation_dir), "--out", str(out), "--frames", "3",
                 "--dynamic-batch"]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["inputs"]["pixel_values"] == ["batch", 3, 3, 64, 64]  # the processor's training size
    for fmt in ("onnx", "torch-export"):
        assert report["parity"][fmt]["ok"] and report["parity"][fmt]["shape"] == [3, 3, 64, 64]
    assert (out / "model.onnx").is_file() and (out / "model.pt2").is_file()
    assert (out / "preprocessor_config.json").is_file() and (out / "config.json").is_file()

    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values", "temporal_positions"]
    capsys.readouterr()
    assert main(["export", "--model", str(segmentation_dir), "--out", str(out), "--format", "onnx"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_export_torch_program_of_the_classification_model(tmp_path):
    torch.manual_seed(0)
    folder = save_model(tmp_path / "cls", TiMoForImageClassification(tiny_segmentation_config()))
    out = tmp_path / "export"
    assert main(["export", "--model", str(folder), "--out", str(out), "--format", "torch-export", "--frames", "2",
                 "--height", "64", "--width", "96"]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["architecture"] == "TiMoForImageClassification"
    assert report["parity"]["torch-export"]["ok"] and report["parity"]["torch-export"]["shape"] == [1, 3]
    program = torch.export.load(str(out / "model.pt2")).module()
    model = TiMoForImageClassification.from_pretrained(folder).eval()
    pixel_values, positions = torch.randn(1, 2, 3, 64, 96), torch.tensor([[0.0, 1.0]])
    with torch.no_grad():
        expected = model(pixel_values, temporal_positions=positions).logits
        torch.testing.assert_close(program(pixel_values, positions), expected)


# ------------------------------------------------------------------------------------------------ info
def test_info_reports_config_parameters_and_flops(segmentation_dir, capsys):
    assert main(["info", str(segmentation_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    model = TiMoForSemanticSegmentation.from_pretrained(segmentation_dir)
    assert summary["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert summary["parameters"]["part:timo"] == sum(p.numel() for p in model.timo.parameters())
    assert summary["flops"]["input_shape"] == [1, 3, 3, 64, 64] and summary["flops"]["total"] > 0
    assert summary["labels"] == ["water", "forest", "crop"]
    assert summary["processor"]["band_names"] == ["B4", "B3", "B2"]

    assert main(["info", str(segmentation_dir), "--height", "128", "--frames", "6"]) == 0
    text = capsys.readouterr().out
    assert "(1, 6, 3, 128, 128)" in text and "parameters" in text and "D-M-M-M" in text
    assert "labels       3: water; forest; crop " in text  # names may hold commas ("groves, hedges")


def test_info_of_a_preset_matches_the_papers_flops(capsys):
    assert main(["info", "--preset", "base", "--height", "256", "--frames", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    official_gflops = TABLE7_GFLOPS[("dstga", "dstga", "mhsa", "mhsa")][0]
    assert summary["flops"]["total"] / 1e9 == pytest.approx(official_gflops, rel=1e-3)
    base = TiMoModel(TiMoConfig.from_preset("base"))
    assert summary["parameters"]["total"] == sum(p.numel() for p in base.parameters())


def test_info_without_processor_and_bad_folder(tmp_path, capsys):
    folder = save_model(tmp_path / "bare", TiMoModel(TiMoConfig(hidden_sizes=[16, 16, 16, 16], num_heads=[1] * 4,
                                                                depths=[1, 1, 1, 1])), processor=False)
    assert main(["info", str(folder)]) == 0
    assert "preprocessor_config.json missing" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("command, option", [("info", "--frames"), ("info", "--batch-size"), ("export", "--height"),
                                             ("export", "--width")])
def test_sizes_below_one_are_usage_errors(command, option, capsys):
    from timo_hf.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "model", *(["--out", "m.onnx"] if command == "export" else []), option, "0"])
    assert exit_info.value.code == 2
    assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err
