"""Deterministic train/validation/test assignment of sample groups (tiles, locations, events, sequences).

Every rule here starts from a *sorted* list of group ids, never from filesystem order, and any shuffling uses a
local ``random.Random(seed)``, never the global RNG. Splitting by group (not by sample) keeps all samples of a
tile/location/event in one split.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence


SPLITS = ("train", "validation", "test")


def _counts(num_groups: int, fractions: Sequence[float]) -> list[int]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers (train, validation, test), "
                         f"got {fractions}")
    total = float(sum(fractions))
    n_train = round(num_groups * fractions[0] / total)
    if fractions[2] == 0:
        return [n_train, num_groups - n_train, 0]
    n_val = min(round(num_groups * fractions[1] / total), num_groups - n_train)
    return [n_train, n_val, num_groups - n_train - n_val]


def split_ranked_groups(groups: Iterable[str], fractions: Sequence[float]) -> dict[str, list[str]]:
    """Sort the unique groups and cut them into consecutive blocks of sizes round(n * fraction).

    Train gets round(n * f_train), validation round(n * f_val), test the rest (validation takes the rest when
    f_test is 0). With 14 MultiSenGE tiles and fractions (8, 3, 3) this is exactly tiles [0:8], [8:11], [11:14].
    """
    ordered = sorted(set(groups))
    n_train, n_val, n_test = _counts(len(ordered), fractions)
    return {"train": ordered[:n_train], "validation": ordered[n_train:n_train + n_val],
            "test": ordered[n_train + n_val:n_train + n_val + n_test]}


def split_shuffled_groups(groups: Iterable[str], fractions: Sequence[float], seed: int = 0) -> dict[str, list[str]]:
    """Like :func:`split_ranked_groups`, but the sorted groups are first shuffled with ``random.Random(seed)``.

    Use this where the sorted order is meaningful (e.g. longitude-sorted locations), so that blocks of the sorted
    order would give spatially separated splits by accident.
    """
    ordered = sorted(set(groups))
    random.Random(seed).shuffle(ordered)
    n_train, n_val, n_test = _counts(len(ordered), fractions)
    return {"train": sorted(ordered[:n_train]), "validation": sorted(ordered[n_train:n_train + n_val]),
            "test": sorted(ordered[n_train + n_val:n_train + n_val + n_test])}


def split_by_counts(ordered_groups: Sequence[str], counts: Sequence[int | None]) -> dict[str, list[str]]:
    """Consecutive blocks of an already ordered list; a count of None takes the rest (official-style splits)."""
    out, start = {}, 0
    for name, count in zip(SPLITS, counts):
        stop = len(ordered_groups) if count is None else min(start + count, len(ordered_groups))
        out[name] = list(ordered_groups[start:stop])
        start = stop
    return out
