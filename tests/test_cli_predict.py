"""`timo predict`: tiled whole-scene inference to a georeferenced COG, its inputs, bad inputs and bounded memory."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

from timo_hf import TiMoConfig
from timo_hf.cli import build_parser, main
from timo_hf.image_processing_timo import TiMoImageProcessor
from timo_hf.inference import Scene, resolve_inputs
from timo_hf.inference.inputs import date_from_name, expand_stack, parse_date
from timo_hf.inference.pipeline import default_companion, predict_scene
from timo_hf.inference.tile_models import TileSegmenter
from timo_hf.inference.tiling import BlendAccumulator, TileGrid, blend_weights
from timo_hf.modeling_timo import TiMoForImageClassification, TiMoForSemanticSegmentation


DATES = ("2021-03-01", "2021-06-15", "2021-09-30")
BANDS = ("B4", "B3", "B2")
HEIGHT, WIDTH = 150, 170
TRANSFORM = from_origin(500000.0, 5400000.0, 10.0, 10.0)
NODATA_DATE, NODATA_BOX = 1, (slice(10, 25), slice(30, 50))  # rows, cols missing in the second date


def write_frame(path, array, *, transform=TRANSFORM, crs="EPSG:32631", descriptions=BANDS, nodata=0):
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2], count=array.shape[0],
                       dtype=array.dtype.name, crs=crs, transform=transform, nodata=nodata) as dataset:
        dataset.write(array)
        if descriptions:
            dataset.descriptions = tuple(descriptions)
    return path


def scene_arrays(seed=0, height=HEIGHT, width=WIDTH):
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    arrays = []
    for t in range(len(DATES)):
        base = 1500 + 800 * np.sin(rows / 17.0 + t) * np.cos(cols / 23.0)
        frame = np.stack([base + 300 * c for c in range(3)]) + rng.normal(0, 50, (3, height, width))
        arrays.append(np.clip(frame, 1, 10000).astype(np.uint16))
    arrays[NODATA_DATE][:, NODATA_BOX[0], NODATA_BOX[1]] = 0
    return arrays


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scene")
    return [write_frame(folder / f"S2_{date}_L2A.tif", array) for date, array in zip(DATES, scene_arrays())]


def tiny_segmentation_config(**overrides):
    settings = dict(num_channels=3, hidden_sizes=[16, 16, 16, 16], num_heads=[1, 1, 1, 1], depths=[1, 0, 0, 1],
                    attention_types=["dstga", "mhsa", "mhsa", "mhsa"], uper_hidden_size=8, uper_pool_scales=[1, 2],
                    num_labels=3, id2label={0: "water", 1: "forest", 2: "crop"})
    return TiMoConfig(**{**settings, **overrides})


def save_model(folder, model, processor=True, **processor_overrides):
    model.save_pretrained(folder)
    if processor:
        settings = dict(band_names=list(BANDS), image_mean=[1500.0, 1800.0, 2100.0], image_std=[800.0] * 3, size=64)
        TiMoImageProcessor(**{**settings, **processor_overrides}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("model"), TiMoForSemanticSegmentation(tiny_segmentation_config()))


def predict_args(model_dir, inputs, out, *extra):
    return ["predict", "--model", str(model_dir), "--inputs", *map(str, inputs), "--out", str(out),
            "--tile-size", "64", "--overlap", "16", "--quiet", *extra]


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial" in p.name or ".cog." in p.name]


# ------------------------------------------------------------------------------------------------ the output
def test_predict_writes_georeferenced_cog_probabilities_and_quicklook(model_dir, scene_files, tmp_path, capsys):
    out = tmp_path / "map.tif"
    assert main(predict_args(model_dir, scene_files, out, "--probabilities")) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "map.png" in printed and "pixels" in printed

    with rasterio.open(out) as dataset, rasterio.open(scene_files[0]) as source:
        assert dataset.crs == source.crs and dataset.transform == source.transform
        assert (dataset.height, dataset.width, dataset.count) == (HEIGHT, WIDTH, 1)
        assert dataset.dtypes[0] == "uint8" and dataset.nodata == 255
        assert dataset.profile["tiled"] and dataset.compression.name.lower() == "deflate"
        assert dataset.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert dataset.colormap(1)[1][3] == 255
        assert json.loads(dataset.tags()["TIMO_CLASSES"]) == {"0": "water", "1": "forest", "2": "crop"}
        classes = dataset.read(1)
    missing = np.zeros((HEIGHT, WIDTH), bool)
    missing[NODATA_BOX] = True
    assert (classes[missing] == 255).all()
    assert (classes[~missing] < 3).all()

    with rasterio.open(tmp_path / "map_probabilities.tif") as dataset:
        assert dataset.count == 3 and dataset.descriptions == ("p(water)", "p(forest)", "p(crop)")
        assert dataset.scales[0] == pytest.approx(1 / 250)
        probabilities = dataset.read()
    assert (probabilities[:, missing] == 255).all()
    totals = probabilities[:, ~missing].astype(int).sum(axis=0)
    assert np.abs(totals - 250).max() <= 2  # three values rounded to 1/250 each
    assert (probabilities[:, ~missing].argmax(axis=0) == classes[~missing]).mean() > 0.99

    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers(tmp_path) == []


class PointwiseSegmenter:
    """Stands in for `TileSegmenter` with a per-pixel function of the inputs, so tiling must reproduce it exactly."""

    num_labels, device = 3, "cpu"
    model = SimpleNamespace(config=SimpleNamespace(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}))
    processor = SimpleNamespace(nodata_value=None)

    def maps_per_tile(self, num_frames):
        return 1

    @staticmethod
    def function(values):  # (..., T, C, h, w) -> (..., 3, h, w) probabilities
        x = np.nan_to_num(values, nan=0.0).mean(axis=(-4, -3)) / 1000.0
        logits = np.stack([np.sin(3 * x), np.cos(2 * x), 0.3 * x - 0.5], axis=-3)
        exp = np.exp(logits - logits.max(axis=-3, keepdims=True))
        return (exp / exp.sum(axis=-3, keepdims=True)).astype(np.float32)

    def __call__(self, tiles):
        return self.function(tiles)


@pytest.mark.parametrize("tile_size, overlap", [(64, 16), (96, 40), (256, 0)])
def test_tiles_blend_to_exactly_the_untiled_result(scene_files, tmp_path, tile_size, overlap):
    frames = resolve_inputs([str(p) for p in scene_files])
    with Scene(frames, band_names=list(BANDS), num_channels=3) as scene:
        whole, missing = scene.read(Window(0, 0, WIDTH, HEIGHT))
        predict_scene(scene, PointwiseSegmenter(), tmp_path / "map.tif", tile_size=tile_size, overlap=overlap,
                      batch_size=3, probabilities=tmp_path / "p.tif", progress=False)
    expected = PointwiseSegmenter.function(whole)
    with rasterio.open(tmp_path / "map.tif") as dataset:
        classes = dataset.read(1)
    with rasterio.open(tmp_path / "p.tif") as dataset:
        probabilities = dataset.read().astype(int)
    assert (classes[missing] == 255).all()
    assert (classes[~missing] == expected.argmax(axis=0)[~missing]).mean() > 0.999
    assert np.abs(probabilities[:, ~missing] - np.rint(expected[:, ~missing] * 250)).max() <= 1


def test_blend_accumulator_releases_every_pixel_once_with_normalised_weights():
    grid = TileGrid(100, 75, tile_size=32, overlap=12, scale=1)
    accumulator = BlendAccumulator(grid, channels=1)
    rows, cols = np.mgrid[0:grid.out_height, 0:grid.out_width]
    truth = (rows * 1000 + cols).astype(np.float32)
    seen = np.zeros(truth.shape, int)
    result = np.zeros(truth.shape, np.float32)
    for tile in grid:
        w = tile.out_window
        values = np.zeros((1, grid.tile_height, grid.tile_width), np.float32)
        values[0, : w.height, : w.width] = truth[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width]
        for window, blended, _ in accumulator.add(tile, values, np.zeros(values.shape[1:], bool)):
            region = (slice(window.row_off, window.row_off + window.height),
                      slice(window.col_off, window.col_off + window.width))
            seen[region] += 1
            result[region] = blended[0]
        assert accumulator.pending_pixels <= grid.tile_height * grid.out_width  # never the whole scene
    assert (seen == 1).all()
    np.testing.assert_allclose(result, truth, rtol=1e-6)
    weights = blend_weights(32, 32, 12)
    assert weights.min() > 0 and weights.max() == 1.0 and weights[16, 16] == 1.0


def test_grid_keeps_tiles_inside_the_scene_and_on_the_stride():
    grid = TileGrid(300, 130, tile_size=128, overlap=32, scale=8)
    assert grid.row_origins == [0, 96, 176] and grid.col_origins == [0, 8]
    assert all(origin % 8 == 0 for origin in grid.row_origins + grid.col_origins)
    small = TileGrid(40, 50, tile_size=256, overlap=64)
    assert (small.tile_height, small.tile_width, len(small)) == (64, 64, 1)


@pytest.mark.parametrize("length", [256, 257, 448, 449, 450, 640, 641, 1000])
def test_grid_uses_the_fewest_tiles_that_keep_the_overlap(length):
    """Every pixel is covered and neighbours share at least `overlap` pixels (the blending ramp), with the fewest
    tiles that allow it: 449 px need 3 tiles of 256 (2 would share 63 px only)."""
    tile, overlap = 256, 64
    origins = TileGrid(length, 32, tile_size=tile, overlap=overlap).row_origins
    assert origins[0] == 0 and origins[-1] + tile == length
    assert all(later - earlier <= tile - overlap for earlier, later in zip(origins, origins[1:]))
    assert len(origins) == 1 + -(-(length - tile) // (tile - overlap))


def test_tiles_keep_every_date_whatever_the_training_processor_dropped():
    """A processor saved with temporal sampling, resizing and min_valid_fraction still gives tiled inference every
    date of a tile, an empty one included (per-date models write one map per scene date)."""
    from timo_hf.inference import inference_processor

    trained = TiMoImageProcessor(num_frames=2, temporal_sampling="first", size=64, min_valid_fraction=0.5)
    tile = np.ones((3, 2, 32, 32), np.float32)
    tile[1] = np.nan  # a date outside the swath in this tile
    batch = inference_processor(trained)([tile], return_tensors="np")
    assert batch["pixel_values"].shape == (1, 3, 2, 32, 32) and batch["frame_mask"].all()


def test_per_date_models_write_one_map_band_per_date(scene_files, tmp_path):
    folder = save_model(tmp_path / "per_date", TiMoForSemanticSegmentation(tiny_segmentation_config(
        temporal_fusion="none")))
    out = tmp_path / "maps.tif"
    assert main(predict_args(folder, scene_files, out, "--probabilities", "--no-quicklook")) == 0
    with rasterio.open(out) as dataset:
        assert dataset.count == 3 and dataset.descriptions == tuple(f"class {date}" for date in DATES)
        maps = dataset.read()
    assert (maps[:, NODATA_BOX[0], NODATA_BOX[1]] == 255).all() and (maps[:, 0, 0] < 3).all()
    with rasterio.open(tmp_path / "maps_probabilities.tif") as dataset:
        assert dataset.count == 9 and dataset.descriptions[3] == f"p(water) {DATES[1]}"


# ------------------------------------------------------------------------------------------------ inputs
def test_dates_from_file_names_json_and_arguments(tmp_path, scene_files):
    assert str(date_from_name("S2_2021-06-15_L2A.tif")) == "2021-06-15"
    assert str(date_from_name("T31TCJ_20210615T105031_B04.tif")) == "2021-06-15"
    assert str(date_from_name("HLS.S30.T13REN.2018013T172747.v2.0.tif")) == "2018-01-13"
    assert str(date_from_name("plot7_acq20210615_v20.tif", r"acq(\d{8})")) == "2021-06-15"
    assert date_from_name("no_date_here.tif") is None
    with pytest.raises(ValueError, match="does not match"):
        date_from_name("a.tif", r"(\d{8})")

    reversed_files = [str(p) for p in scene_files[::-1]]
    frames = resolve_inputs(reversed_files)
    assert [str(f.date) for f in frames] == list(DATES)  # chronological, whatever the order given

    listing = tmp_path / "inputs.json"
    listing.write_text(json.dumps([{"path": str(scene_files[2]), "date": "2020-01-02"},
                                   {"path": str(scene_files[0]), "date": "2020-01-01"}]))
    frames = resolve_inputs([str(listing)])
    assert [f.path for f in frames] == [scene_files[0], scene_files[2]]
    assert [str(f.date) for f in frames] == ["2020-01-01", "2020-01-02"]

    frames = resolve_inputs(reversed_files, dates=["2022-01-01", "2022-02-01", "2022-03-01"])  # dates given win
    assert frames[0].path == scene_files[2]
    with pytest.raises(ValueError, match="3 input frames"):
        resolve_inputs(reversed_files, dates=["2022-01-01"])
    assert [f.path for f in resolve_inputs([str(scene_files[0].parent)])] == scene_files


def test_dates_with_a_time_of_day_keep_the_date(tmp_path, scene_files):
    assert str(parse_date("2021-04-06T10:30:00")) == str(parse_date("20210406T103000")) == "2021-04-06"
    assert str(parse_date("2021-04-06 10:30")) == "2021-04-06"
    times = [f"{date}T10:30:00Z" for date in DATES]
    assert [str(f.date) for f in resolve_inputs([str(p) for p in scene_files], dates=times)] == list(DATES)
    listing = tmp_path / "inputs.json"
    listing.write_text(json.dumps([{"path": str(path), "date": time} for path, time in zip(scene_files, times)]))
    assert [str(f.date) for f in resolve_inputs([str(listing)])] == list(DATES)


def test_a_stacked_file_gives_the_same_map_as_one_file_per_date(model_dir, scene_files, tmp_path):
    arrays = [rasterio.open(p).read() for p in scene_files]
    time_major = write_frame(tmp_path / "stack_time.tif", np.concatenate(arrays), descriptions=None)
    band_major = write_frame(tmp_path / "stack_band.tif", np.stack(arrays, axis=1).reshape(9, HEIGHT, WIDTH),
                             descriptions=None)
    assert expand_stack(time_major, 3, "band-major") == [(1, 4, 7), (2, 5, 8), (3, 6, 9)]
    dates = ["--dates", *DATES, "--no-quicklook"]
    assert main(predict_args(model_dir, scene_files, tmp_path / "files.tif", "--no-quicklook")) == 0
    assert main(predict_args(model_dir, [time_major], tmp_path / "tm.tif", "--stack-layout", "time-major", *dates)) == 0
    assert main(predict_args(model_dir, [band_major], tmp_path / "bm.tif", "--stack-layout", "band-major", *dates)) == 0
    reference = rasterio.open(tmp_path / "files.tif").read()
    np.testing.assert_array_equal(rasterio.open(tmp_path / "tm.tif").read(), reference)
    np.testing.assert_array_equal(rasterio.open(tmp_path / "bm.tif").read(), reference)


def test_bands_are_picked_by_name_from_descriptions_or_bands_option(model_dir, scene_files, tmp_path):
    reordered = []
    for path in scene_files:
        array = rasterio.open(path).read()
        extra = np.full((1, HEIGHT, WIDTH), 7, np.uint16)
        reordered.append(write_frame(tmp_path / path.name, np.concatenate([extra, array[::-1]]),
                                     descriptions=("B8", "B2", "B3", "B4")))
    assert main(predict_args(model_dir, scene_files, tmp_path / "a.tif", "--no-quicklook")) == 0
    assert main(predict_args(model_dir, reordered, tmp_path / "b.tif", "--no-quicklook")) == 0
    np.testing.assert_array_equal(rasterio.open(tmp_path / "a.tif").read(), rasterio.open(tmp_path / "b.tif").read())


def test_descriptions_that_are_no_band_names_leave_the_file_order(model_dir, scene_files, tmp_path):
    unnamed = [write_frame(tmp_path / path.name, rasterio.open(path).read(), descriptions=("red", "green", "blue"))
               for path in scene_files]
    assert main(predict_args(model_dir, scene_files, tmp_path / "a.tif", "--no-quicklook")) == 0
    assert main(predict_args(model_dir, unnamed, tmp_path / "b.tif", "--no-quicklook")) == 0
    np.testing.assert_array_equal(rasterio.open(tmp_path / "a.tif").read(), rasterio.open(tmp_path / "b.tif").read())


def test_band_descriptions_that_name_only_some_model_bands_are_refused(model_dir, tmp_path, capsys):
    files = [write_frame(tmp_path / f"S2_{date}.tif", array, descriptions=("B8", "B3", "B4"))
             for date, array in zip(DATES, scene_arrays())]
    run_expecting_error(predict_args(model_dir, files, tmp_path / "map.tif"), capsys,
                        files[0].name, "lacks the bands ['B2']", "--bands")


def test_a_stack_without_stack_layout_is_refused(model_dir, tmp_path, capsys):
    named = write_frame(tmp_path / "named.tif", np.concatenate(scene_arrays()), descriptions=BANDS * 3)
    run_expecting_error(predict_args(model_dir, [named], tmp_path / "map.tif"), capsys,
                        "named.tif", "more than once", "--stack-layout")
    unnamed = write_frame(tmp_path / "unnamed.tif", np.concatenate(scene_arrays()), descriptions=None)
    run_expecting_error(predict_args(model_dir, [unnamed], tmp_path / "map.tif"), capsys,
                        "unnamed.tif has 9 bands", "--stack-layout")


def test_a_stack_split_across_its_dates_is_refused(model_dir, tmp_path, capsys):
    """Per-date bands B2,B3,B4,B8 read 3 by 3 (--bands forgotten): the split cuts across the dates."""
    arrays = scene_arrays()
    four_bands = write_frame(tmp_path / "four.tif", np.concatenate([np.concatenate([a[::-1], a[:1]]) for a in arrays]),
                             descriptions=("B2", "B3", "B4", "B8") * 3)
    layout = ["--stack-layout", "time-major", "--dates", *DATES, "2021-12-01"]
    run_expecting_error(predict_args(model_dir, [four_bands], tmp_path / "map.tif", *layout), capsys,
                        "four.tif bands [4, 5, 6]", "lacks the bands ['B4']", "--stack-layout")
    six_bands = write_frame(tmp_path / "six.tif", np.concatenate([np.concatenate([a, a]) for a in arrays[:2]]),
                            descriptions=(*BANDS, "B8", "B11", "B12") * 2)  # dates 2 and 4 of the split name no band
    run_expecting_error(predict_args(model_dir, [six_bands], tmp_path / "map.tif", *layout), capsys,
                        "six.tif", "name none of them", "--stack-layout")


def test_align_resamples_dates_on_another_grid(model_dir, scene_files, tmp_path, capsys):
    shifted = rasterio.open(scene_files[1]).read()
    moved = write_frame(tmp_path / "S2_2021-06-15_L2A.tif", shifted,
                        transform=from_origin(500005.0, 5400000.0, 10.0, 10.0))
    inputs = [scene_files[0], moved, scene_files[2]]
    assert main(predict_args(model_dir, inputs, tmp_path / "map.tif")) == 2
    error = capsys.readouterr().err
    assert "not on one grid" in error and moved.name in error and "--align" in error
    assert not (tmp_path / "map.tif").exists()
    assert main(predict_args(model_dir, inputs, tmp_path / "map.tif", "--align", "bilinear", "--no-quicklook")) == 0
    assert "resampled onto the first date's grid" in capsys.readouterr().out
    with rasterio.open(tmp_path / "map.tif") as dataset:
        assert dataset.transform == TRANSFORM and (dataset.height, dataset.width) == (HEIGHT, WIDTH)


def test_align_keeps_the_nodata_value_out_of_resampling(tmp_path):
    """--nodata on a file without a nodata tag, resampled by --align, acts as the tag would: its zeros are not
    blended into the neighbouring valid pixels."""
    arrays = scene_arrays()
    arrays[1][:, 60:90, 60:90] = 0  # a gap written as zeros
    half_pixel_off = from_origin(TRANSFORM.c + 5.0, TRANSFORM.f - 5.0, 10.0, 10.0)
    reference = write_frame(tmp_path / f"S2_{DATES[0]}.tif", arrays[0], nodata=None)
    values = {}
    for tag in (None, 0):
        shifted = write_frame(tmp_path / f"tag{tag}_{DATES[1]}.tif", arrays[1], transform=half_pixel_off, nodata=tag)
        frames = resolve_inputs([str(reference), str(shifted)])
        with Scene(frames, band_names=list(BANDS), num_channels=3, align="bilinear", nodata=0) as scene:
            values[tag] = scene.read(Window(0, 0, WIDTH, HEIGHT))[0]
    np.testing.assert_array_equal(values[None], values[0])
    assert np.nanmin(values[None][1]) > 500  # no half-zero blends left as valid values


# ------------------------------------------------------------------------------------------------ bad input
def run_expecting_error(args, capsys, *fragments):
    assert main(args) == 2
    error = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in error, error
    return error


def test_gaps_fill_predicts_wherever_a_date_has_the_pixel(model_dir, scene_files, tmp_path):
    out = tmp_path / "filled.tif"
    assert main(predict_args(model_dir, scene_files, out, "--gaps", "fill", "--no-quicklook")) == 0
    with rasterio.open(out) as dataset:
        classes = dataset.read(1)
    assert (classes < 3).all()  # the second date's gap is predicted from the other dates


def gaps_fill_probabilities(model, inputs, out):
    """The uint8 probabilities of `timo predict --gaps fill` on `inputs`."""
    assert main(predict_args(model, inputs, out, "--gaps", "fill", "--probabilities", "--no-quicklook")) == 0
    with rasterio.open(default_companion(out, "_probabilities.tif")) as dataset:
        return dataset.read().astype(int)


@pytest.fixture(scope="module")
def days_model_dir(tmp_path_factory):
    """`model_dir`'s model with a processor that encodes the days since the first date."""
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("days"), TiMoForSemanticSegmentation(tiny_segmentation_config()),
                      temporal_encoding="days")


@pytest.mark.parametrize("missing_date", [0, 1, 2])
@pytest.mark.parametrize("encoding", ["index", "days"])
def test_gaps_fill_leaves_a_date_missing_from_a_tile_out_of_it(scene_files, model_dir, days_model_dir, tmp_path,
                                                               encoding, missing_date):
    """A date without any value (a swath that misses the scene) gives, with gaps='fill', exactly the map of the other
    dates alone: the kept dates are numbered as if the missing one had never been given (0, 1, ... or days since the
    first kept date)."""
    model = {"index": model_dir, "days": days_model_dir}[encoding]
    empty = write_frame(tmp_path / f"S2_{DATES[missing_date]}_empty.tif", np.zeros((3, HEIGHT, WIDTH), np.uint16))
    with_empty = [empty if t == missing_date else path for t, path in enumerate(scene_files)]
    without = [path for t, path in enumerate(scene_files) if t != missing_date]
    probabilities = gaps_fill_probabilities(model, with_empty, tmp_path / "with.tif")
    assert (probabilities < 255).all()  # predicted everywhere from the other dates
    np.testing.assert_array_equal(probabilities, gaps_fill_probabilities(model, without, tmp_path / "without.tif"))


def test_gaps_fill_is_refused_for_per_date_outputs(model_dir, scene_files, tmp_path, capsys):
    folder = save_model(tmp_path / "per_date", TiMoForSemanticSegmentation(tiny_segmentation_config(
        temporal_fusion="none")))
    run_expecting_error(predict_args(folder, scene_files, tmp_path / "maps.tif", "--gaps", "fill"), capsys,
                        "--gaps fill", "temporal_fusion='max'")
    embed = ["embed", "--model", str(model_dir), "--inputs", *map(str, scene_files), "--out", str(tmp_path / "f.tif"),
             "--temporal-pooling", "none", "--gaps", "fill", "--quiet"]
    run_expecting_error(embed, capsys, "--gaps fill", "mean or max pooling")


def test_embed_with_gaps_fill_has_features_wherever_a_date_has_the_pixel(model_dir, scene_files, tmp_path):
    out = tmp_path / "features.tif"
    assert main(["embed", "--model", str(model_dir), "--inputs", *map(str, scene_files), "--out", str(out),
                 "--stage", "stage1", "--tile-size", "64", "--overlap", "16", "--gaps", "fill", "--quiet"]) == 0
    with rasterio.open(out) as dataset:
        assert np.isfinite(dataset.read()).all()  # the second date's gap has the other dates' features


def test_the_processors_nodata_value_is_nodata_like_the_nodata_option(tmp_path):
    """Files without a nodata tag, a model whose image processor says nodata_value=0: the zeros are nodata in the
    map, and a date of zeros only is left out of the tiles with --gaps fill."""
    model = save_model(tmp_path / "model", TiMoForSemanticSegmentation(tiny_segmentation_config()), nodata_value=0)
    files = [write_frame(tmp_path / f"S2_{date}.tif", array, nodata=None) for date, array in zip(DATES, scene_arrays())]
    assert main(predict_args(model, files, tmp_path / "map.tif", "--no-quicklook")) == 0
    classes = rasterio.open(tmp_path / "map.tif").read(1)
    missing = np.zeros((HEIGHT, WIDTH), bool)
    missing[NODATA_BOX] = True
    assert (classes[missing] == 255).all() and (classes[~missing] < 3).all()
    zeros = write_frame(tmp_path / f"S2_{DATES[1]}_zeros.tif", np.zeros((3, HEIGHT, WIDTH), np.uint16), nodata=None)
    np.testing.assert_array_equal(gaps_fill_probabilities(model, [files[0], zeros, files[2]], tmp_path / "a.tif"),
                                  gaps_fill_probabilities(model, files[::2], tmp_path / "b.tif"))


def test_a_scene_that_does_not_know_the_processors_nodata_value_is_refused_by_the_library_calls(tmp_path):
    """Called from Python, the scene must be told the processor's nodata value (timo predict tells it): the
    processor would fill those pixels, and the map would show classes there instead of nodata."""
    model = TiMoForSemanticSegmentation(tiny_segmentation_config())
    processor = TiMoImageProcessor(band_names=list(BANDS), image_mean=[1500.0, 1800.0, 2100.0],
                                   image_std=[800.0] * 3, nodata_value=0)
    files = [write_frame(tmp_path / f"S2_{date}.tif", array, nodata=None) for date, array in zip(DATES, scene_arrays())]
    segmenter = TileSegmenter(model, processor, None, torch.device("cpu"))
    with Scene(resolve_inputs([str(f) for f in files]), band_names=list(BANDS), num_channels=3) as scene:
        with pytest.raises(ValueError, match=r"reads 0 as nodata but the scene does not \(its nodata: \[\]\)"):
            predict_scene(scene, segmenter, tmp_path / "map.tif", tile_size=64, overlap=16, progress=False)
    with Scene(resolve_inputs([str(f) for f in files]), band_names=list(BANDS), num_channels=3, nodata=0) as scene:
        predict_scene(scene, segmenter, tmp_path / "map.tif", tile_size=64, overlap=16, progress=False)
    missing = np.zeros((HEIGHT, WIDTH), bool)
    missing[NODATA_BOX] = True
    with rasterio.open(tmp_path / "map.tif") as dataset:
        classes = dataset.read(1)
    assert (classes[missing] == 255).all() and (classes[~missing] < 3).all()


@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "0", "must be at least 1, got 0"),
    ("--batch-size", "-3", "must be at least 1, got -3"),
    ("--tile-size", "0", "must be at least 1, got 0"),
    ("--overlap", "-16", "must be at least 0, got -16"),
    ("--batch-size", "two", "expected an integer, got 'two'"),
])
def test_integer_options_out_of_range_are_usage_errors(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["predict", "--model", "m", "--inputs", "a.tif", "--out", "o.tif", option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err


def test_unknown_or_unavailable_devices_are_clear_errors(model_dir, scene_files, tmp_path, capsys):
    run_expecting_error(predict_args(model_dir, scene_files, tmp_path / "map.tif", "--device", "gpu"), capsys,
                        "--device gpu", "cuda")
    run_expecting_error(predict_args(model_dir, scene_files, tmp_path / "map.tif", "--device", "cuda:63"), capsys,
                        "--device cuda:63")


def test_embed_with_tiles_as_small_as_the_stride_defaults_to_no_overlap(model_dir, scene_files, tmp_path):
    out = tmp_path / "features.tif"
    assert main(["embed", "--model", str(model_dir), "--inputs", *map(str, scene_files), "--out", str(out),
                 "--tile-size", "32", "--quiet"]) == 0
    with rasterio.open(out) as dataset:
        assert (dataset.height, dataset.width) == (-(-HEIGHT // 32), -(-WIDTH // 32))


def test_bad_inputs_give_clear_errors(model_dir, scene_files, tmp_path, capsys):
    out = tmp_path / "map.tif"
    run_expecting_error(predict_args(model_dir, [*scene_files[:2], tmp_path / "S2_2021-12-01.tif"], out), capsys,
                        "not found", "S2_2021-12-01.tif")
    other_crs = write_frame(tmp_path / "S2_2021-12-01_crs.tif", rasterio.open(scene_files[0]).read(), crs="EPSG:32632")
    run_expecting_error(predict_args(model_dir, [*scene_files, other_crs], out), capsys, "CRS", "--align")
    small = write_frame(tmp_path / "S2_2021-12-02.tif", rasterio.open(scene_files[0]).read()[:, :100, :120])
    run_expecting_error(predict_args(model_dir, [*scene_files, small], out), capsys, "size 120x100")
    two_bands = write_frame(tmp_path / "S2_2021-12-03.tif", rasterio.open(scene_files[0]).read()[:2], descriptions=None)
    run_expecting_error(predict_args(model_dir, [*scene_files, two_bands], out), capsys, "has 2 bands", "expects 3")
    run_expecting_error(predict_args(model_dir, scene_files, out, "--bands", "B8,B11,B12"), capsys, "lacks the bands")
    assert not out.exists() and leftovers(tmp_path) == []


def test_model_folder_without_processor_or_of_another_task(scene_files, tmp_path, capsys):
    bare = save_model(tmp_path / "bare", TiMoForSemanticSegmentation(tiny_segmentation_config()), processor=False)
    run_expecting_error(predict_args(bare, scene_files, tmp_path / "map.tif"), capsys, "preprocessor_config.json")
    classifier = save_model(tmp_path / "cls", TiMoForImageClassification(tiny_segmentation_config()))
    run_expecting_error(predict_args(classifier, scene_files, tmp_path / "map.tif"), capsys,
                        "TiMoForImageClassification", "TiMoForSemanticSegmentation")
    run_expecting_error(predict_args(tmp_path / "nowhere", scene_files, tmp_path / "map.tif"), capsys, "not found")


def test_dates_are_required_when_the_processor_encodes_days(days_model_dir, scene_files, tmp_path, capsys):
    undated = [write_frame(tmp_path / f"frame_{i}.tif", rasterio.open(p).read()) for i, p in enumerate(scene_files)]
    run_expecting_error(predict_args(days_model_dir, undated, tmp_path / "map.tif"), capsys, "dates")
    assert main(predict_args(days_model_dir, undated, tmp_path / "map.tif", "--dates", *DATES, "--no-quicklook")) == 0


def test_existing_output_is_refused_unless_overwrite(model_dir, scene_files, tmp_path, capsys):
    out = tmp_path / "map.tif"
    out.write_bytes(b"keep me")
    run_expecting_error(predict_args(model_dir, scene_files, out), capsys, "exists", "--overwrite")
    assert out.read_bytes() == b"keep me"
    assert main(predict_args(model_dir, scene_files, out, "--overwrite", "--no-quicklook")) == 0
    assert rasterio.open(out).count == 1


def test_quiet_shows_no_progress_bar_not_even_the_model_loading_one(model_dir, scene_files, tmp_path, capfd):
    assert main(predict_args(model_dir, scene_files, tmp_path / "map.tif", "--no-quicklook", "--quiet")) == 0
    printed = capfd.readouterr()
    assert "Loading weights" not in printed.err and "%|" not in printed.err
    assert "pixels" in printed.out  # the summary is still printed


def test_a_missing_output_folder_is_created_and_the_rate_stays_readable(model_dir, scene_files, tmp_path, capsys):
    from timo_hf.inference.pipeline import pixel_rate

    out = tmp_path / "new" / "folder" / "map.tif"
    assert main(predict_args(model_dir, scene_files, out, "--no-quicklook")) == 0
    assert rasterio.open(out).count == 1
    assert [pixel_rate(*case) for case in ((10_752, 3.2), (5_000_000, 2.0), (100, 1.0))] == [
        "3.4 kpx/s", "2.50 Mpx/s", "100 px/s"]


def test_an_interrupted_run_leaves_no_output(model_dir, scene_files, tmp_path, capsys, monkeypatch):
    calls = []
    original = TileSegmenter.__call__

    def interrupted(self, tiles):
        calls.append(len(tiles))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, tiles)

    monkeypatch.setattr(TileSegmenter, "__call__", interrupted)
    out = tmp_path / "map.tif"
    assert main(predict_args(model_dir, scene_files, out, "--probabilities", "--batch-size", "2")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ memory
def write_large_scene(folder: Path, size: int) -> list[Path]:
    """3 dates of a smooth 3-band uint16 scene, written block row by block row (never whole in memory)."""
    paths = []
    for t, date in enumerate(DATES):
        path = folder / f"S2_{date}_{size}.tif"
        profile = dict(driver="GTiff", height=size, width=size, count=3, dtype="uint16", crs="EPSG:32631",
                       transform=TRANSFORM, nodata=0, tiled=True, blockxsize=512, blockysize=512, compress="deflate")
        with rasterio.open(path, "w", **profile) as dataset:
            cols = np.arange(size)[None, :]
            for top in range(0, size, 512):
                rows = np.arange(top, top + 512)[:, None]
                band = (1500 + 700 * np.sin(rows / 61.0 + t) * np.cos(cols / 47.0)).astype(np.uint16)
                dataset.write(np.stack([band, band + 200, band + 400]), window=Window(0, top, size, 512))
            dataset.descriptions = BANDS
        paths.append(path)
    return paths


PEAK_RSS_OF_CHILD = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def peak_rss_mb(model_dir: Path, inputs: list[Path], out: Path) -> float:
    command = [sys.executable, "-m", "timo_hf.cli", "predict", "--model", str(model_dir), "--inputs",
               *map(str, inputs), "--out", str(out), "--tile-size", "1056", "--overlap", "32", "--batch-size", "1",
               "--quiet", "--no-quicklook"]
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_OF_CHILD, *command], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return int(line.split()[1]) / 1024


@pytest.mark.slow
def test_peak_memory_follows_the_tile_size_not_the_scene(tmp_path):
    """A 4096 x 4096 x 3-date scene runs within 2x the peak memory of a 1024 x 1024 one (same tiles)."""
    torch.manual_seed(0)
    config = tiny_segmentation_config(hidden_sizes=[8, 8, 8, 8], depths=[0, 0, 0, 0], uper_pool_scales=[1],
                                      num_labels=2, id2label={0: "a", 1: "b"})
    model_dir = save_model(tmp_path / "model", TiMoForSemanticSegmentation(config), size=None)
    small = peak_rss_mb(model_dir, write_large_scene(tmp_path, 1024), tmp_path / "small.tif")
    large = peak_rss_mb(model_dir, write_large_scene(tmp_path, 4096), tmp_path / "large.tif")
    scene_float32_mb = 4096 * 4096 * 3 * 3 * 4 / 2**20
    print(f"peak RSS: 1024^2 scene {small:.0f} MB, 4096^2 scene {large:.0f} MB, ratio {large / small:.2f}")
    assert large <= 2 * small
    assert large - small < scene_float32_mb / 2  # the scene (576 MB as float32) is never held
    with rasterio.open(tmp_path / "large.tif") as dataset:
        assert (dataset.height, dataset.width) == (4096, 4096) and dataset.overviews(1)
        block = dataset.read(1, window=Window(2000, 2000, 300, 300))
    assert (block < 2).all()
