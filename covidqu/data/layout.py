"""Where COVID-QU-Ex keeps its files, and an index of every sample in a tree.

The Kaggle archive repeats each subset folder inside itself::

    <root>/Lung Segmentation Data/Lung Segmentation Data/<split>/<class>/{images,lung masks}/
    <root>/Infection Segmentation Data/Infection Segmentation Data/<split>/<class>/
        {images,lung masks,infection masks}/

:func:`resolve_root` accepts the extracted archive, one subset folder or the repeated inner
folder. :func:`scan` lists every image and pairs it with its masks by file name, taking the class
from the folder (never from the file name: some Non-COVID files are named ``Non_COVID (n).png``).
Scanning only lists directories, so it is cheap enough to run in every process of a DDP job.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from covidqu.constants import CLASSES, SPLITS, SUBSETS
from covidqu.errors import DataError

#: Folder name of each subset inside the archive (and repeated inside itself).
SUBSET_DIRS: dict[str, str] = {
    "lung": "Lung Segmentation Data",
    "infection": "Infection Segmentation Data",
}
#: Folder name of each split.
SPLIT_DIRS: dict[str, str] = {"train": "Train", "val": "Val", "test": "Test"}
IMAGES_DIR = "images"
LUNG_MASKS_DIR = "lung masks"
INFECTION_MASKS_DIR = "infection masks"
#: Mask folders each subset carries beside ``images``.
MASK_DIRS: dict[str, tuple[str, ...]] = {
    "lung": (LUNG_MASKS_DIR,),
    "infection": (LUNG_MASKS_DIR, INFECTION_MASKS_DIR),
}
IMAGE_SUFFIXES = (".png",)

#: Official counts of the Kaggle release (version 7), keyed ``(subset, split, class)``.
OFFICIAL_COUNTS: dict[tuple[str, str, str], int] = {
    ("lung", "train", "COVID-19"): 7658,
    ("lung", "train", "Non-COVID"): 7208,
    ("lung", "train", "Normal"): 6849,
    ("lung", "val", "COVID-19"): 1903,
    ("lung", "val", "Non-COVID"): 1802,
    ("lung", "val", "Normal"): 1712,
    ("lung", "test", "COVID-19"): 2395,
    ("lung", "test", "Non-COVID"): 2253,
    ("lung", "test", "Normal"): 2140,
    ("infection", "train", "COVID-19"): 1864,
    ("infection", "train", "Non-COVID"): 932,
    ("infection", "train", "Normal"): 932,
    ("infection", "val", "COVID-19"): 466,
    ("infection", "val", "Non-COVID"): 233,
    ("infection", "val", "Normal"): 233,
    ("infection", "test", "COVID-19"): 583,
    ("infection", "test", "Non-COVID"): 292,
    ("infection", "test", "Normal"): 291,
}


class NotADatasetError(DataError):
    """The given root is not a COVID-QU-Ex tree at all."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One image of the index and the paths of its masks.

    ``id`` is the file name without its extension; it is unique within a subset and split.
    ``infection_mask`` is ``None`` in the lung subset.
    """

    subset: str
    split: str
    cls: str
    id: str
    image: Path
    lung_mask: Path
    infection_mask: Path | None = None

    @property
    def label(self) -> int:
        """Class index in :data:`covidqu.constants.CLASSES` order."""
        return CLASSES.index(self.cls)

    def mask(self, kind: str) -> Path | None:
        """The path of its ``lung`` or ``infection`` mask (``None`` where the subset has none)."""
        return {"lung": self.lung_mask, "infection": self.infection_mask}[kind]

    def key(self) -> str:
        """``"<subset>/<split>/<class>"``, the key used in counts."""
        return f"{self.subset}/{self.split}/{self.cls}"


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong with one file of the tree."""

    path: Path
    problem: str

    def relative_to(self, root: Path) -> dict[str, str]:
        try:
            rel = self.path.relative_to(root)
        except ValueError:
            rel = self.path
        return {"path": rel.as_posix(), "problem": self.problem}


@dataclass
class Index:
    """Every sample found under a root, and the structural problems met while scanning."""

    root: Path
    subset_dirs: dict[str, Path]
    samples: list[Sample] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def select(
        self,
        subset: str | None = None,
        split: str | None = None,
        cls: str | Iterable[str] | None = None,
    ) -> list[Sample]:
        """The samples of one subset / split / class (``None`` means any), in index order."""
        classes = {cls} if isinstance(cls, str) else set(cls) if cls is not None else None
        return [
            s
            for s in self.samples
            if (subset is None or s.subset == subset)
            and (split is None or s.split == split)
            and (classes is None or s.cls in classes)
        ]

    def counts(self) -> dict[str, int]:
        """``{"<subset>/<split>/<class>": n}`` for every cell of the subsets present, zeros too."""
        found = Counter(s.key() for s in self.samples)
        return {
            f"{subset}/{split}/{cls}": found.get(f"{subset}/{split}/{cls}", 0)
            for subset in self.subset_dirs
            for split in SPLITS
            for cls in CLASSES
        }

    def raise_on_problems(self, subset: str | None = None) -> None:
        """Raise :class:`DataError` listing every structural problem (of one subset if given)."""
        probs = self.problems
        if subset is not None:
            base = self.subset_dirs.get(subset)
            probs = [p for p in probs if base is None or _is_within(p.path, base)]
        if probs:
            raise DataError(_problem_report(self.root, probs))


def _is_within(path: Path, base: Path) -> bool:
    try:
        path.relative_to(base)
    except ValueError:
        return False
    return True


def _problem_report(root: Path, problems: list[Problem], limit: int = 50) -> str:
    lines = [f"{len(problems)} problem(s) in the COVID-QU-Ex tree at {root}:"]
    lines += [f"  {p.path}: {p.problem}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    lines.append(
        f"Run `python -m covidqu.data inspect '{root}' --verify` for the full list; "
        "fix or remove the files named."
    )
    return "\n".join(lines)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _has_splits(path: Path) -> bool:
    return any(_is_dir(path / d) for d in SPLIT_DIRS.values())


def _subset_of_inner(path: Path) -> str:
    """Guess the subset of a folder that holds the splits directly: by name, else by content."""
    for subset, name in SUBSET_DIRS.items():
        if path.name == name:
            return subset
    for split_dir in SPLIT_DIRS.values():
        for cls in CLASSES:
            if _is_dir(path / split_dir / cls / INFECTION_MASKS_DIR):
                return "infection"
    return "lung"


def _inner_of_subset_folder(path: Path) -> Path | None:
    """The folder holding the splits for a subset folder: the repeated inner one, or itself."""
    inner = path / path.name
    if _is_dir(inner) and _has_splits(inner):
        return inner
    if _has_splits(path):
        return path
    return None


def resolve_root(root: str | os.PathLike[str]) -> dict[str, Path]:
    """Map each subset found under ``root`` to the folder that holds its split folders.

    ``root`` may be the extracted archive (holding one or both subset folders), a subset folder,
    or the repeated inner folder. Raises :class:`NotADatasetError`, saying what was expected and
    what was found, when it is none of these.
    """
    path = Path(root).expanduser()
    if not path.exists():
        raise NotADatasetError(
            f"data root {path} does not exist. Set data.root (or the COVIDQU_ROOT environment "
            "variable) to the extracted COVID-QU-Ex archive, or create a synthetic tree with "
            "`python -m covidqu.data synth OUT`."
        )
    if not _is_dir(path):
        raise NotADatasetError(f"data root {path} is a file, not a folder of COVID-QU-Ex data.")

    found: dict[str, Path] = {}
    for subset, name in SUBSET_DIRS.items():
        candidate = path / name
        if _is_dir(candidate):
            inner = _inner_of_subset_folder(candidate)
            if inner is not None:
                found[subset] = inner
    if found:
        return found
    if path.name in SUBSET_DIRS.values():
        inner = _inner_of_subset_folder(path)
        if inner is not None:
            return {_subset_of_inner(inner): inner}
    if _has_splits(path):
        return {_subset_of_inner(path): path}

    try:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError as err:
        entries = [f"<unreadable: {err}>"]
    shown = ", ".join(entries[:12]) + (" ..." if len(entries) > 12 else "") or "nothing"
    raise NotADatasetError(
        f"{path} is not a COVID-QU-Ex tree. Expected the extracted archive (holding "
        f"'{SUBSET_DIRS['lung']}' and/or '{SUBSET_DIRS['infection']}'), one of those subset "
        f"folders, or the folder holding {'/'.join(SPLIT_DIRS.values())}; found: {shown}."
    )


def _list_pngs(folder: Path, problems: list[Problem]) -> dict[str, Path]:
    """File stem -> path of the PNGs in ``folder`` (empty when the folder is missing).

    Anything else that is not hidden (another file type, a sub-folder) is a problem: the
    archive holds PNG files only, and a stray file usually means a broken extraction.
    """
    out: dict[str, Path] = {}
    try:
        with os.scandir(folder) as it:
            for entry in it:
                name = entry.name
                if name.startswith("."):
                    continue
                stem, ext = os.path.splitext(name)
                if entry.is_file() and ext.lower() in IMAGE_SUFFIXES:
                    out[stem] = folder / name
                else:
                    kind = "folder" if entry.is_dir() else "file"
                    problems.append(
                        Problem(folder / name, f"unexpected {kind} (only .png files belong here)")
                    )
    except FileNotFoundError:
        pass
    return out


def _unexpected_dirs(folder: Path, expected: Iterable[str], what: str) -> list[Problem]:
    """Problems for the visible sub-folders of ``folder`` whose names are not ``expected``."""
    allowed = set(expected)
    try:
        names = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    except OSError:
        return []
    return [
        Problem(
            folder / name,
            f"unexpected folder '{name}' (a {what} folder is one of {', '.join(sorted(allowed))};"
            " names are case-sensitive)",
        )
        for name in names
        if name not in allowed and not name.startswith(".")
    ]


def _natural_key(stem: str) -> tuple:
    """Sort ``covid_2`` before ``covid_10``."""
    digits = "".join(ch if ch.isdigit() else " " for ch in stem).split()
    return (int(digits[-1]) if digits else -1, stem)


def scan(root: str | os.PathLike[str], subsets: Iterable[str] | None = None) -> Index:
    """List every sample under ``root`` (all subsets found, or only ``subsets``).

    Structural problems (a missing class, images or mask folder, an unexpected folder or file,
    an image without its mask, a mask without its image) are collected in
    :attr:`Index.problems`, not raised; unpaired files are left out of :attr:`Index.samples`.
    Call :meth:`Index.raise_on_problems` to refuse them.
    """
    subset_dirs = resolve_root(root)
    if subsets is not None:
        wanted = list(subsets)
        for s in wanted:
            if s not in SUBSETS:
                raise ValueError(f"unknown subset {s!r}; expected one of {SUBSETS}")
        missing = [s for s in wanted if s not in subset_dirs]
        if missing:
            have = ", ".join(f"{k} ({v})" for k, v in subset_dirs.items())
            raise DataError(
                f"no '{SUBSET_DIRS[missing[0]]}' under data root {Path(root)} (found: {have}). "
                f"Point data.root at the extracted archive that holds '{SUBSET_DIRS[missing[0]]}'."
            )
        subset_dirs = {s: subset_dirs[s] for s in wanted}

    index = Index(root=Path(root), subset_dirs=subset_dirs)
    for subset, base in subset_dirs.items():
        # A split may be absent as a whole (copies without Test exist); a class may not.
        index.problems += _unexpected_dirs(base, SPLIT_DIRS.values(), "split")
        for split, split_dir in SPLIT_DIRS.items():
            if not _is_dir(base / split_dir):
                continue
            index.problems += _unexpected_dirs(base / split_dir, CLASSES, "class")
            for cls in CLASSES:
                _scan_class(index, subset, split, cls, base / split_dir / cls)
    return index


def _scan_class(index: Index, subset: str, split: str, cls: str, folder: Path) -> None:
    if not _is_dir(folder):
        index.problems.append(Problem(folder, "missing class folder"))
        return
    index.problems += _unexpected_dirs(folder, (IMAGES_DIR, *MASK_DIRS[subset]), "data")
    if not _is_dir(folder / IMAGES_DIR):
        index.problems.append(Problem(folder / IMAGES_DIR, "missing images folder"))
    images = _list_pngs(folder / IMAGES_DIR, index.problems)
    masks: dict[str, dict[str, Path]] = {}
    for mask_dir in MASK_DIRS[subset]:
        if not _is_dir(folder / mask_dir):
            index.problems.append(Problem(folder / mask_dir, "missing mask folder"))
        masks[mask_dir] = _list_pngs(folder / mask_dir, index.problems)

    for stem in sorted(images, key=_natural_key):
        paths = {d: masks[d].get(stem) for d in masks}
        lacking = [d for d, p in paths.items() if p is None]
        for d in lacking:
            if _is_dir(folder / d):
                index.problems.append(
                    Problem(
                        images[stem],
                        f"image has no mask in '{d}' ({folder / d / images[stem].name})",
                    )
                )
        if lacking:
            continue
        index.samples.append(
            Sample(
                subset=subset,
                split=split,
                cls=cls,
                id=stem,
                image=images[stem],
                lung_mask=paths[LUNG_MASKS_DIR],
                infection_mask=paths.get(INFECTION_MASKS_DIR),
            )
        )
    for by_stem in masks.values():
        for stem in sorted(set(by_stem) - set(images), key=_natural_key):
            index.problems.append(
                Problem(
                    by_stem[stem], f"mask has no image in '{IMAGES_DIR}' ({folder / IMAGES_DIR})"
                )
            )


def relative_key(sample: Sample) -> str:
    """A sample's image path relative to its subset folder (``Train/<class>/images/x.png``):
    its row's key, the same whichever form of the root the tree was reached by."""
    return f"{SPLIT_DIRS[sample.split]}/{sample.cls}/{IMAGES_DIR}/{sample.image.name}"


ENV_ROOT = "COVIDQU_ROOT"


def resolve_data_root(root: str | os.PathLike[str] | None) -> Path:
    """``root`` if given, else ``$COVIDQU_ROOT``; a clear error when neither is set."""
    if root in (None, ""):
        root = os.environ.get(ENV_ROOT) or None
    if root is None:
        raise DataError(
            "no dataset configured: set data.root=/path/to/COVID-QU-Ex (the extracted archive, a "
            f"subset folder or its inner folder) or the {ENV_ROOT} environment variable. For a "
            "synthetic tree: `python -m covidqu.data synth OUT`."
        )
    return Path(root).expanduser()


def cap_per_class(
    samples: Sequence[Sample], limit: int | None, seed: int = 0, tag: str = ""
) -> list[Sample]:
    """At most ``limit`` samples of each class, drawn reproducibly (order kept)."""
    if limit is None:
        return list(samples)
    if limit < 1:
        raise ValueError(f"data.limit_per_class must be >= 1 or null, got {limit}")
    by_class: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.cls, []).append(i)
    keep: set[int] = set()
    for cls, idx in by_class.items():
        if len(idx) > limit:
            idx = random.Random(f"{seed}/{tag}/{cls}").sample(idx, limit)
        keep.update(idx)
    return [s for i, s in enumerate(samples) if i in keep]
