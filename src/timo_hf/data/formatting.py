"""Return array columns as numpy arrays in their stored dtype, everything else as plain Python objects.

datasets' "numpy"/"torch" formats up-cast integer arrays to int64 (and floats to float32), which quadruples the
memory of uint16 reflectances and hides the native dtype; its Python format returns nested lists (slow for
multi-MB arrays). :func:`with_native_format` gives arrays in the dtype they were written with (uint16 stays
uint16) and leaves strings, dates, lists and scalars as Python objects.

Map-style datasets use the public API (``with_format("numpy", columns=..., output_all_columns=True,
dtype=None)``). ``IterableDataset.with_format`` takes no formatter arguments, so streaming uses a formatter
registered under the name ``"timo_numpy"`` through datasets' formatter registry (``_register_formatter``, a
private but long-standing function; checked against datasets 5.2).
"""

from __future__ import annotations

import datasets
import numpy as np
from datasets.formatting import PythonFormatter, _register_formatter, get_format_type_from_alias
from datasets.formatting.np_formatter import NumpyFormatter


ARRAY_FEATURES = (datasets.Array2D, datasets.Array3D, datasets.Array4D, datasets.Array5D)
FORMAT_NAME = "timo_numpy"


def array_columns(features: datasets.Features | None) -> list[str]:
    return [name for name, feature in (features or {}).items() if isinstance(feature, ARRAY_FEATURES)]


class NativeNumpyFormatter(NumpyFormatter):
    """numpy arrays (stored dtype) for ``Array2D..5D`` columns, Python objects for the other columns."""

    def __init__(self, features=None, token_per_repo_id=None, **np_array_kwargs):
        np_array_kwargs.setdefault("dtype", None)  # None overrides NumpyFormatter's int64/float32 default
        super().__init__(features=features, token_per_repo_id=token_per_repo_id, **np_array_kwargs)
        self._python = PythonFormatter(features=features, token_per_repo_id=token_per_repo_id)

    def _split(self, pa_table):
        arrays = [name for name in array_columns(self.features) if name in pa_table.column_names]
        others = [name for name in pa_table.column_names if name not in arrays]
        return pa_table.select(arrays), pa_table.select(others)

    def _is_array(self, name, value) -> bool:
        if self.features:
            return name in array_columns(self.features)
        return isinstance(value, np.ndarray) or (isinstance(value, list) and bool(value) and isinstance(value[0], list))

    def recursive_tensorize(self, data_struct):
        # used by streaming from a generator (no Arrow tables): only the array columns become numpy arrays
        if not isinstance(data_struct, dict):
            return super().recursive_tensorize(data_struct)
        return {name: super(NativeNumpyFormatter, self)._recursive_tensorize(value) if self._is_array(name, value)
                else value for name, value in data_struct.items()}

    def format_row(self, pa_table):
        arrays, others = self._split(pa_table)
        return {**self._python.format_row(others), **super().format_row(arrays)}

    def format_batch(self, pa_table):
        arrays, others = self._split(pa_table)
        return {**self._python.format_batch(others), **super().format_batch(arrays)}


if get_format_type_from_alias(FORMAT_NAME) != FORMAT_NAME or FORMAT_NAME not in datasets.formatting._FORMAT_TYPES:
    _register_formatter(NativeNumpyFormatter, FORMAT_NAME)


def with_native_format(dataset):
    """The dataset (or dict of splits) formatted as described in the module docstring."""
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return type(dataset)({split: with_native_format(part) for split, part in dataset.items()})
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.with_format(FORMAT_NAME)
    return dataset.with_format("numpy", columns=array_columns(dataset.features), output_all_columns=True, dtype=None)
