"""TiMoImageProcessor: random draws in DataLoader workers, and refusal of statistics that would make NaN inputs."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from timo_hf.data import compute_band_statistics
from timo_hf.image_processing_timo import TiMoImageProcessor


NUM_DATES, SIDE, CROP = 10, 8, 4
# value = 1000 * frame + 10 * row + column: the first pixel of an output frame tells which frame and crop were drawn
SERIES = (1000 * np.arange(NUM_DATES)[:, None, None, None] + 10 * np.arange(SIDE)[:, None] + np.arange(SIDE)
          ).astype(np.float32) * np.ones((NUM_DATES, 1, SIDE, SIDE), np.float32)


def first_pixels(processor: TiMoImageProcessor, **kwargs) -> list[int]:
    out = processor(SERIES, return_tensors="np", **kwargs)["pixel_values"]
    return out[0, :, 0, 0, 0].astype(int).tolist()


class Draws(Dataset):
    """Each item: the processor's draw without a seed, and with the call seed 5."""

    def __init__(self, processor: TiMoImageProcessor):
        self.processor = processor

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return first_pixels(self.processor), first_pixels(self.processor, seed=5)


def run_epochs(processor: TiMoImageProcessor, torch_seed: int) -> list[list]:
    torch.manual_seed(torch_seed)
    loader = DataLoader(Draws(processor), batch_size=None, num_workers=2)
    return [list(loader) for _ in range(2)]


@pytest.mark.parametrize("seed", [None, 7], ids=["no-seed", "processor-seed"])
def test_random_draws_differ_between_workers_and_epochs_and_follow_torch_manual_seed(seed):
    processor = TiMoImageProcessor(num_frames=3, temporal_sampling="random", crop_size=CROP, random_crop=True,
                                   size_divisor=None, seed=seed)
    epochs = run_epochs(processor, torch_seed=0)
    for epoch in epochs:
        unseeded = [draw for draw, _ in epoch]
        # item i comes from worker i % 2
        assert unseeded[0::2] != unseeded[1::2], "the two workers drew the same frames and crops"
        assert len({tuple(draw) for draw in unseeded}) > len(unseeded) // 2
        assert all(seeded == first_pixels(processor, seed=5) for _, seeded in epoch), "a call seed must fix the draw"
    assert epochs[0] != epochs[1], "every epoch repeats the same draws"
    assert run_epochs(processor, torch_seed=0) == epochs, "torch.manual_seed does not make the run reproducible"
    assert run_epochs(processor, torch_seed=1) != epochs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(band_names=["B4", "QA60"], image_mean=[0, 0], image_std=[1, 0]), "image_std .* QA60: 0.0"),
        (dict(image_mean=[0, 0], image_std=[1, float("nan")]), "image_std .* band 1: nan"),
        (dict(image_std=-2.0), "image_std .* every band: -2.0"),
        (dict(image_mean=[0, float("inf")], image_std=[1, 1]), "image_mean must be a finite number .* band 1: inf"),
    ],
    ids=["zero-std", "nan-std", "negative-scalar-std", "infinite-mean"],
)
def test_statistics_that_would_make_nan_inputs_are_refused_naming_the_band(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TiMoImageProcessor(**kwargs)


def test_a_constant_band_warns_in_statistics_and_can_be_left_out():
    rng = np.random.default_rng(0)
    examples = [{"pixel_values": np.concatenate([rng.integers(1, 3000, (3, 2, 8, 8)), np.zeros((3, 1, 8, 8))], 1),
                 "band_names": ["B4", "B3", "QA60"]} for _ in range(3)]
    with pytest.warns(UserWarning, match=r"\['QA60'\] are constant"):
        stats = compute_band_statistics(examples)
    with pytest.raises(ValueError, match="QA60: 0.0"):
        TiMoImageProcessor.from_statistics(stats)
    processor = TiMoImageProcessor.from_statistics(stats, band_names=["B03", "B4"], size_divisor=None)
    assert processor.image_std == [stats["image_std"][1], stats["image_std"][0]]
    out = processor(examples, return_tensors="np")["pixel_values"]
    assert out.shape == (3, 3, 2, 8, 8) and np.isfinite(out).all()
    with pytest.warns(UserWarning, match=r"\['QA60'\] have no valid pixels"):
        compute_band_statistics(examples, nodata=0)


def test_statistics_of_unnamed_bands_make_a_processor_that_takes_the_bands_in_order():
    """Bare arrays (pre-training on a folder of .npy series) have no band names: statistics without names keep
    every band, in order."""
    stats = {**compute_band_statistics([{"pixel_values": np.arange(96).reshape(2, 3, 4, 4)}]), "band_names": None}
    processor = TiMoImageProcessor.from_statistics(stats, size_divisor=None)
    assert processor.band_names is None and processor.image_mean == stats["image_mean"]
    with pytest.raises(ValueError, match="these statistics name none"):
        TiMoImageProcessor.from_statistics(stats, band_names=["B4"])


@pytest.mark.parametrize("length", [3, 1, 2])
def test_per_band_values_must_match_the_image_band_count(length):
    image = np.ones((2, 4, 8, 8), np.uint16)
    processor = TiMoImageProcessor(image_mean=[0.0] * length, image_std=[1.0] * length)
    with pytest.raises(ValueError, match=f"image_mean has {length} values but the image has 4 bands"):
        processor(image)
    assert processor(image[:, :length], return_tensors="np")["pixel_values"].shape[2] == length
    assert TiMoImageProcessor(image_mean=1.0, image_std=2.0)(image, return_tensors="np")["pixel_values"].max() == 0.0
