"""Streamed pre-training data (training/pretrain_data.py): per-rank sharding, block shuffle, checkpointable position.

Real Parquet shards written by `timo_hf.data.export_to_parquet`, streamed with `datasets` (`load_timo_dataset`);
two ranks are simulated in one process (each rank's stream is built with `split_dataset_by_node`).
"""

import json
import logging
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from timo_hf.data import load_timo_dataset
from timo_hf.data.parquet import export_to_parquet


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))

import pretrain  # noqa: E402
import pretrain_data  # noqa: E402
from pretrain_data import (  # noqa: E402
    StreamingBatches,
    build_batches,
    load_data_state,
    make_processor,
    read_data_states,
    save_data_state,
)


NUM_SERIES = 22
SHAPE = (4, 2, 32, 32)  # [T, C, H, W]


def data_settings(shuffle_buffer: int = 5, stream_resume: str = "exact") -> dict:
    """`data` settings of training/pretrain.py for these tests (its defaults, then the tests' choices)."""
    return {
        **pretrain.DEFAULTS["data"], "num_frames": 2, "temporal_order": "sorted", "short_series": "error",
        "image_size": None, "processor": None, "normalization": "none", "normalization_samples": 4,
        "shuffle_buffer": shuffle_buffer, "num_workers": 0, "stream_resume": stream_resume,
    }


def export(folder: Path, num_shards: int) -> Path:
    """NUM_SERIES uint16 series, value = series index * 1000 + position (so a tensor tells where it came from),
    in `num_shards` Parquet files of several row groups each."""
    features = datasets.Features({"pixel_values": datasets.Array4D(SHAPE, "uint16"), "sample_id": datasets.Value("string")})
    base = np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE) % 997
    table = {"pixel_values": [base + 1000 * i for i in range(NUM_SERIES)],
             "sample_id": [f"s{i:03d}" for i in range(NUM_SERIES)]}
    dataset = datasets.Dataset.from_dict(table, features=features)
    size = dataset.data.nbytes
    export_to_parquet(dataset, folder, max_shard_size=size // num_shards + 1, row_group_bytes=3 * np.prod(SHAPE) * 2)
    assert len(list((folder / "data").glob("*.parquet"))) == num_shards
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {count: export(root / f"shards{count}", count) for count in (1, 3, 4)}


def open_stream(folder: Path):
    return load_timo_dataset(str(folder), split="train", streaming=True)


def make_batches(folder, *, rank=0, world_size=1, batch_size=1, shuffle_buffer=5, seed=0, mode="exact",
                 start_micro_batch=0) -> StreamingBatches:
    data = data_settings(shuffle_buffer, mode)
    source = open_stream(folder)
    batches, per_epoch = build_batches(data, make_processor(data, source), source, batch_size, world_size, rank,
                                       seed, start_micro_batch)
    assert per_epoch is None and isinstance(batches, StreamingBatches)
    return batches


def read_samples(batches: StreamingBatches, count: int) -> list[tuple[int, str, torch.Tensor]]:
    """(epoch, sample_id, tensor) of the next `count` samples of a batch-size-1 iterator."""
    out = []
    for _ in range(count):
        tensor = next(batches)
        out.append((batches.epoch, batches.last_sample_ids[0], tensor[0]))
    return out


def ids_by_epoch(samples) -> dict[int, list[str]]:
    result: dict[int, list[str]] = {}
    for epoch, sample_id, _ in samples:
        result.setdefault(epoch, []).append(sample_id)
    return result


ALL_IDS = {f"s{i:03d}" for i in range(NUM_SERIES)}


# ---------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("num_shards", [4, 3], ids=["shards_divisible_by_2", "shards_not_divisible_by_2"])
def test_two_ranks_read_disjoint_samples_that_cover_each_epoch(shards, num_shards):
    per_rank = {}
    for rank in (0, 1):
        batches = make_batches(shards[num_shards], rank=rank, world_size=2, shuffle_buffer=4)
        per_rank[rank] = ids_by_epoch(read_samples(batches, 2 * NUM_SERIES + 2))  # > 2 epochs of this rank
    for epoch in (0, 1):
        first, second = per_rank[0][epoch], per_rank[1][epoch]
        assert len(set(first)) == len(first) and len(set(second)) == len(second), "a sample repeated in an epoch"
        assert not set(first) & set(second), f"epoch {epoch}: ranks share {set(first) & set(second)}"
        assert set(first) | set(second) == ALL_IDS
        assert first and second
    if num_shards == 3:  # split by example: every rank keeps 1 example in 2
        assert len(per_rank[0][0]) == len(per_rank[1][0]) == NUM_SERIES // 2


def test_pixels_belong_to_the_sample_id_and_frames_follow_the_sample_number(shards):
    """Sample n of rank r draws its frames with derive_seed(seed, r, n), whatever the series."""
    from common import derive_seed

    frame_offsets = [(t * 2 * 32 * 32) % 997 for t in range(SHAPE[0])]  # first value of frame t
    batches = make_batches(shards[3], rank=1, world_size=2, batch_size=2, shuffle_buffer=4, seed=3)
    number = 0
    for _ in range(NUM_SERIES):  # two epochs of the rank
        tensor = next(batches)
        assert tensor.shape == (2, 2, 2, 32, 32) and tensor.dtype == torch.float32
        for sample_id, series in zip(batches.last_sample_ids, tensor):
            values = series.numpy().astype(np.int64) - 1000 * int(sample_id[1:])
            assert ((values >= 0) & (values < 997)).all(), sample_id  # the pixels are this series'
            frames = [frame_offsets.index(int(v[0, 0, 0])) for v in values]
            expected = np.sort(np.random.default_rng(derive_seed(3, 1, number)).choice(SHAPE[0], 2, replace=False))
            assert frames == expected.tolist(), (sample_id, number)
            number += 1


# ---------------------------------------------------------------------------------------------- shuffling
def test_block_shuffle_is_seeded_and_reshuffles_every_epoch(shards):
    def epochs(seed, shuffle_buffer=8, folder=shards[1]):
        return ids_by_epoch(read_samples(make_batches(folder, shuffle_buffer=shuffle_buffer, seed=seed),
                                         2 * NUM_SERIES))

    file_order = sorted(ALL_IDS)
    first, again, other = epochs(0), epochs(0), epochs(1)
    assert sorted(first[0]) == file_order and sorted(first[1]) == file_order  # each epoch: every sample once
    assert first[0] != file_order, "not shuffled"
    assert first == again, "same seed, different order"
    assert first[0] != other[0], "the seed does not change the order"
    assert first[1] != first[0], "epochs are not reshuffled"
    # a block shuffle mixes within shuffle_buffer examples: far more local than a full permutation
    positions = [abs(first[0].index(s) - int(s[1:])) for s in file_order]
    assert max(positions) < 16
    # no buffer: file order in epoch 0 (one shard: the same in every epoch)
    assert epochs(0, shuffle_buffer=0)[0] == file_order
    # several shards: the shard order changes with the seed
    three = {seed: epochs(seed, 1, shards[3])[0] for seed in (0, 1, 2, 3)}
    assert len({tuple(order) for order in three.values()}) > 1


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("world_size,num_shards", [(1, 3), (2, 3), (2, 4)])
def test_exact_resume_gives_bit_identical_batches(shards, world_size, num_shards):
    batch_size, total = 3, 12  # 36 samples per rank: > 3 epochs of a rank's 11
    folder = shards[num_shards]
    for rank in range(world_size):
        whole = make_batches(folder, rank=rank, world_size=world_size, batch_size=batch_size)
        reference = [(next(whole), list(whole.last_sample_ids)) for _ in range(total)]
        offsets = set()
        for k in range(total - 2):
            part = make_batches(folder, rank=rank, world_size=world_size, batch_size=batch_size)
            for _ in range(k):
                next(part)
            state = json.loads(json.dumps(part.state_dict()))  # what a checkpoint stores
            offsets.add(state["block_offset"])
            resumed = make_batches(folder, rank=rank, world_size=world_size, batch_size=batch_size)
            resumed.load_state_dict(state)
            for j in range(k, min(k + 3, total)):
                tensor = next(resumed)
                assert resumed.last_sample_ids == reference[j][1], (rank, k, j)
                assert torch.equal(tensor, reference[j][0]), (rank, k, j)
            # a resumed run's state resumes again (datasets' nested state of a resumed stream is stale in parts:
            # compare what it reads, not the dicts)
            again = make_batches(folder, rank=rank, world_size=world_size, batch_size=batch_size)
            again.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
            for j in range(min(k + 3, total), total):
                assert torch.equal(next(again), reference[j][0]), (rank, k, j)
        assert offsets - {0}, "no resume fell inside a shuffle block: the test would not exercise the re-read"


def test_exact_resume_rereads_at_most_one_block(shards, monkeypatch):
    """Resuming deep into the stream must not replay it: at most one shuffle block is read again."""
    batches = make_batches(shards[3], shuffle_buffer=5, batch_size=2)
    for _ in range(15):  # 30 samples: epoch 1, mid-block
        next(batches)
    state = batches.state_dict()
    assert state["epoch"] == 1 and state["block_offset"] > 0
    reads = []
    original = StreamingBatches._fill_block

    def counting(self):
        filled = original(self)
        reads.append(len(self._block) if filled else 0)
        return filled

    monkeypatch.setattr(StreamingBatches, "_fill_block", counting)
    resumed = make_batches(shards[3], shuffle_buffer=5, batch_size=2)
    resumed.load_state_dict(state)
    next(resumed)
    assert sum(reads) <= 5 + 2, reads  # the re-read block, plus at most one more for the batch's second sample


def test_fast_resume_skips_only_the_rest_of_the_block(shards):
    buffer, folder = 6, shards[3]
    whole = make_batches(folder, shuffle_buffer=buffer)
    reference = read_samples(whole, 3 * NUM_SERIES)
    skipped_somewhere = False
    for k in range(1, 2 * NUM_SERIES, 3):
        part = make_batches(folder, shuffle_buffer=buffer)
        before = read_samples(part, k)
        state = json.loads(json.dumps(part.state_dict()))
        resumed = make_batches(folder, shuffle_buffer=buffer, mode="fast")
        resumed.load_state_dict(state)
        after = read_samples(resumed, 8)
        skip = state["block_length"] - state["block_offset"] if state["block_offset"] else 0
        skipped_somewhere |= skip > 0
        assert skip < buffer
        # documented guarantee: the uninterrupted sequence without the rest of the current block, same frames
        for (epoch, sample_id, tensor), (ref_epoch, ref_id, ref_tensor) in zip(after, reference[k + skip:]):
            assert (epoch, sample_id) == (ref_epoch, ref_id), k
            assert torch.equal(tensor, ref_tensor), k
        # no sample repeats within the epoch of the resume
        epoch = state["epoch"]
        seen = [s for e, s, _ in before + after if e == epoch]
        assert len(seen) == len(set(seen)), k
    assert skipped_somewhere


def test_fast_and_exact_agree_at_a_block_boundary(shards):
    whole = make_batches(shards[1], shuffle_buffer=1, batch_size=2)  # blocks of 1: every position is a boundary
    reference = [next(whole) for _ in range(6)]
    part = make_batches(shards[1], shuffle_buffer=1, batch_size=2)
    next(part), next(part)
    state = part.state_dict()
    assert state["block_offset"] == 0
    for mode in ("exact", "fast"):
        resumed = make_batches(shards[1], shuffle_buffer=1, batch_size=2, mode=mode)
        resumed.load_state_dict(state)
        assert all(torch.equal(next(resumed), ref) for ref in reference[2:])


def test_legacy_checkpoint_without_data_state_replays(shards, tmp_path):
    whole = make_batches(shards[3], batch_size=2)
    reference = [next(whole) for _ in range(8)]
    resumed = make_batches(shards[3], batch_size=2, start_micro_batch=5)
    assert load_data_state(resumed, tmp_path) == "replay"  # an empty checkpoint folder
    assert all(torch.equal(next(resumed), ref) for ref in reference[5:])


def test_data_state_files_round_trip_through_a_checkpoint_folder(shards, tmp_path):
    world = 2
    wholes = [make_batches(shards[4], rank=r, world_size=world, batch_size=2) for r in range(world)]
    references = [[next(b) for _ in range(7)] for b in wholes]
    for rank in range(world):
        part = make_batches(shards[4], rank=rank, world_size=world, batch_size=2)
        for _ in range(4):
            next(part)
        assert save_data_state(part, tmp_path, rank).name == f"data_state_rank{rank}.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_state_rank0.json", "data_state_rank1.json"]
    assert set(read_data_states(tmp_path)) == {0, 1}
    for rank in range(world):
        resumed = make_batches(shards[4], rank=rank, world_size=world, batch_size=2)
        assert load_data_state(resumed, tmp_path) == "resumed"
        assert all(torch.equal(next(resumed), ref) for ref in references[rank][4:])
    # map-style data has no stream state: nothing written, nothing loaded
    assert save_data_state(iter([]), tmp_path / "none", 0) is None
    assert load_data_state(iter([]), tmp_path) is None


# ---------------------------------------------------------------------------------------------- world size
@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_with_another_world_size_starts_the_next_epoch(shards, tmp_path, caplog, new_world):
    for rank in range(2):
        part = make_batches(shards[4], rank=rank, world_size=2, batch_size=3)
        for _ in range(5):  # 15 samples of a rank's ~11 per epoch: mid epoch 1
            next(part)
        save_data_state(part, tmp_path, rank)
    states = read_data_states(tmp_path)
    assert {s["epoch"] for s in states.values()} == {1}
    consumed = max(s["samples_consumed"] for s in states.values())

    with pytest.raises(ValueError, match="world_size"):  # never another world size's state as is
        make_batches(shards[4], rank=0, world_size=new_world).load_state_dict(states[0])

    per_rank = {}
    for rank in range(new_world):
        batches = make_batches(shards[4], rank=rank, world_size=new_world, shuffle_buffer=5)
        with caplog.at_level(logging.WARNING, logger="timo_hf.pretrain"):
            caplog.clear()
            assert load_data_state(batches, tmp_path) == "next_epoch"
        assert "do not carry over" in caplog.text and "next epoch" in caplog.text
        state = batches.state_dict()
        assert state["epoch"] == 2 and state["samples_consumed"] == consumed and state["block_index"] == 0
        samples = read_samples(batches, NUM_SERIES // new_world + 3)
        per_rank[rank] = [s for e, s, _ in samples if e == 2]
        # exactly what this rank reads in epoch 2 of a fresh run with the new world size
        fresh = make_batches(shards[4], rank=rank, world_size=new_world, shuffle_buffer=5)
        fresh_ids = [s for e, s, _ in read_samples(fresh, 2 * NUM_SERIES + 3 * NUM_SERIES // new_world) if e == 2]
        assert per_rank[rank] == fresh_ids
    union = [s for ids in per_rank.values() for s in ids]
    assert sorted(union) == sorted(ALL_IDS)  # the new ranks cover the epoch once, disjointly


def test_invalid_states_and_modes_are_refused(shards):
    batches = make_batches(shards[3], world_size=2, rank=1)
    state = batches.state_dict()
    with pytest.raises(ValueError, match="rank"):
        make_batches(shards[3], world_size=2, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        make_batches(shards[3], world_size=2, rank=1, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="num_shards"):
        make_batches(shards[4], world_size=2, rank=1).load_state_dict(state)
    with pytest.raises(ValueError, match="stream_resume"):
        make_batches(shards[3], mode="approximate")
    next(batches)
    with pytest.raises(RuntimeError, match="before the first batch"):
        batches.load_state_dict(state)
    assert pretrain_data.STREAM_RESUME_MODES == ("exact", "fast")
