"""K-fold re-splits of Train + Val that keep near-duplicates together (``data.num_folds``).

Train and Val of a subset are pooled and cut into ``num_folds`` folds, stratified by class and
grouped: near-duplicate images (:mod:`covidqu.data.duplicates`), and every image linked to them
through a chain of such pairs, fall into one fold, so a fold never validates on a near-copy of a
training image. Fold ``fold`` is the validation split, the others the training split; Test is
never touched.

The assignment depends only on the sorted image keys, their hashes and ``seed``: every DDP
process, and every job of a sweep over ``data.fold``, computes the same folds on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from covidqu.data.layout import Sample, relative_key
from covidqu.errors import ConfigError


def check_fold_keys(num_folds: int | None, fold: int | None) -> None:
    """Refuse a bad ``data.num_folds`` / ``data.fold`` pair, naming the key and the fix."""
    if num_folds is None:
        if fold is not None:
            raise ConfigError(
                f"data.fold={fold} is set but data.num_folds is null: set data.num_folds=K "
                "(K >= 2) to re-split Train + Val into K folds, or data.fold=null for the "
                "official splits"
            )
        return
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ConfigError(
            f"data.num_folds={num_folds!r} must be an integer >= 2 (e.g. data.num_folds=5), or "
            "null for the official Train / Val splits"
        )
    if fold is None:
        every = ",".join(map(str, range(num_folds)))
        raise ConfigError(
            f"data.num_folds={num_folds} needs data.fold, the fold to validate on: "
            f"data.fold=0 ... {num_folds - 1} (all in a sweep: -m data.fold={every})"
        )
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise ConfigError(
            f"data.fold={fold!r} is out of range for data.num_folds={num_folds}: "
            f"use 0 ... {num_folds - 1}"
        )


def duplicate_groups(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The connected component of each of ``n`` items under the pairs ``(i, j)``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def assign_folds(
    labels: Sequence[int], groups: Sequence[int], num_folds: int, seed: int = 0
) -> np.ndarray:
    """The fold of each item: stratified by ``labels``, every ``groups`` value in one fold.

    scikit-learn's StratifiedGroupKFold does the assignment (its shuffle is seeded by ``seed``;
    the shuffle was fixed in 1.8, see pyproject). A class with fewer groups than folds cannot be
    split and raises a :class:`ConfigError` naming ``data.num_folds``.
    """
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(labels)
    per_class = {c: len(set(np.asarray(groups)[y == c].tolist())) for c in np.unique(y).tolist()}
    if min(per_class.values(), default=0) < num_folds:
        raise ConfigError(
            f"data.num_folds={num_folds}: a class of Train + Val has only "
            f"{min(per_class.values(), default=0)} group(s) of images (near-duplicates count as "
            f"one), too few for {num_folds} folds. Use fewer folds, or more images "
            "(data.limit_per_class caps each fold after the split, not before)"
        )
    folds = np.full(len(y), -1, np.int64)
    splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # the class-size warning: refused above already
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
            folds[held_out] = k
    return folds


def fold_split(
    pool: Sequence[Sample],
    hashes: np.ndarray,
    num_folds: int,
    fold: int,
    seed: int = 0,
    max_distance: int | None = None,
) -> dict[str, list[Sample]]:
    """``{"train": ..., "val": ...}``: fold ``fold`` of ``pool`` (Train + Val, hashes aligned
    with it) for validation, the other folds for training, each in key order."""
    from covidqu.data.duplicates import DEFAULT_MAX_DISTANCE, near_pairs

    order = sorted(range(len(pool)), key=lambda k: relative_key(pool[k]))
    samples = [pool[k] for k in order]
    h = np.asarray(hashes)[order]
    distance = DEFAULT_MAX_DISTANCE if max_distance is None else max_distance
    i, j, _ = near_pairs(h, distance)
    groups = duplicate_groups(len(samples), i, j)
    folds = assign_folds([s.label for s in samples], groups, num_folds, seed)
    return {
        "train": [s for s, f in zip(samples, folds, strict=True) if f != fold],
        "val": [s for s, f in zip(samples, folds, strict=True) if f == fold],
    }
