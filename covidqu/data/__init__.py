"""COVID-QU-Ex data: layout discovery and index, readers, datasets, DataModules, synthetic trees.

The layout and index import without torch (``python -m covidqu.data inspect`` stays quick); the
DataModules and datasets load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from covidqu.data.layout import (
    OFFICIAL_COUNTS,
    DataError,
    Index,
    NotADatasetError,
    Problem,
    Sample,
    resolve_root,
    scan,
)

_LAZY = {
    "CXRDataset": "covidqu.data.datasets",
    "COVIDQUDataModule": "covidqu.data.datamodule",
    "LungDataModule": "covidqu.data.datamodule",
    "InfectionDataModule": "covidqu.data.datamodule",
    "build_transform": "covidqu.data.transforms",
    "PngReader": "covidqu.data.readers",
    "SampleReader": "covidqu.data.readers",
}

__all__ = [
    "OFFICIAL_COUNTS",
    "DataError",
    "Index",
    "NotADatasetError",
    "Problem",
    "Sample",
    "resolve_root",
    "scan",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'covidqu.data' has no attribute {name!r}")
