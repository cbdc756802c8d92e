"""The packed cache: same batches as the PNG path, shared maps, rebuilt when the tree changes,
built once under concurrency, bad files named, and the ``pack`` command."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from covidqu.data import pack_workers, packed
from covidqu.data.layout import DataError, scan
from covidqu.data.packed import PackedReader, PackError, ensure_packed
from covidqu.data.readers import read_image

SIZE = 32


def packed_dirs(cache: Path) -> list[Path]:
    """Every folder under ``cache/packed`` (the lock files aside)."""
    return sorted(p for p in (cache / "packed").rglob("*") if p.is_dir())


def whole(dm, split: str) -> dict:
    """The whole split in one batch, in index order."""
    import torch

    dm.setup({"train": "fit", "val": "validate", "test": "test"}[split])
    ds = dm.datasets[split]
    return next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))


def assert_same_batches(png, pck, splits=("train", "val", "test")) -> None:
    """The packed DataModule's batches, made float on the "device" where they leave its loader
    as uint8 (data.normalise=auto with the cache), equal the PNG DataModule's float batches."""
    import torch

    for split in splits:
        a, b = whole(png, split), whole(pck, split)
        if pck.normalise == "device":
            assert b["image"].dtype == torch.uint8  # a quarter of the bytes leave the loader
            b = pck.on_after_batch_transfer(b, 0)
        assert a.keys() == b.keys()
        for key in a:
            if torch.is_tensor(a[key]):
                assert a[key].dtype == b[key].dtype, (split, key)
                assert torch.equal(a[key], b[key]), (split, key)
            else:
                assert a[key] == b[key], (split, key)


@pytest.mark.parametrize(
    ("subset", "target", "tree"),
    [
        ("lung", "lung", "synth"),
        ("infection", "infection", "synth"),
        ("infection", "infection_multiclass", "sample"),
        ("lung", "lung", "sample"),
    ],
)
def test_packed_batches_equal_png_batches(request, tmp_path, subset, target, tree):
    """Images, masks, lung masks, labels and ids, every split; the resize is done once, at
    packing, and left out of the datasets' transforms."""
    from covidqu.data.datamodule import InfectionDataModule, LungDataModule

    root = request.getfixturevalue("synth_root" if tree == "synth" else "sample_root")
    size = SIZE if tree == "synth" else 64  # both resize: synth is 48 px, the sample 256
    cls = LungDataModule if subset == "lung" else InfectionDataModule
    kw = dict(root=root, target=target, image_size=size, num_workers=0)
    png = cls(**kw)
    pck = cls(**kw, cache="packed", cache_dir=tmp_path)
    pck.prepare_data()
    assert (pck.cache, pck.normalise) == ("packed", "device")  # the defaults with the cache
    assert_same_batches(png, pck)
    assert (png.cache, png.normalise) == ("none", "loader")  # on a CPU, without a Trainer
    assert isinstance(pck.reader, PackedReader)
    assert all(ds.transform is None for ds in pck.datasets.values())


def test_augmented_batches_equal_and_the_pool_builds_the_same_arrays(
    synth_root, tmp_path, monkeypatch
):
    """Augmentation stays on the packed path (same draws, same batches as the PNG path); the
    process pool that packs big trees writes the same arrays as packing in-process."""
    import albumentations as A

    from covidqu.data.datamodule import LungDataModule

    def augment():
        return [A.HorizontalFlip(p=0.5), A.Affine(rotate=(-15, 15), p=0.7)]

    kw = dict(root=synth_root, image_size=SIZE, num_workers=0)
    png = LungDataModule(**kw, augment=augment())
    pck = LungDataModule(**kw, augment=augment(), cache="packed", cache_dir=tmp_path / "a")
    assert_same_batches(png, pck, splits=("train",))
    assert pck.datasets["train"].transform is not None  # augmentation kept, resize dropped
    assert not any(isinstance(t, A.Resize) for t in pck.datasets["train"].transform.transforms)

    monkeypatch.setattr(pack_workers, "INLINE_BELOW", 0)
    index = scan(synth_root, subsets=["lung"])
    pool = ensure_packed(index, "lung", SIZE, tmp_path / "b", workers=2)
    inline = pck.reader.folder
    for name in ("train.images.npy", "train.lung.npy", "test.images.npy", "val.lung.npy"):
        assert np.array_equal(np.load(pool.folder / name), np.load(inline / name)), name


def test_reader_pickles_without_pixels_and_maps_the_same_files(synth_root, tmp_path):
    index = scan(synth_root, subsets=["infection"])
    reader = PackedReader(ensure_packed(index, "infection", 48, tmp_path).folder)
    blob = pickle.dumps(reader)
    pixels = sum(a.nbytes for arrays in reader.arrays.values() for a in arrays.values())
    assert len(blob) < 1000 < pixels / 20  # the folder's name, not the arrays
    copy = pickle.loads(blob)
    for split, arrays in reader.arrays.items():
        for name, arr in arrays.items():
            mapped = copy.arrays[split][name]
            assert isinstance(mapped, np.memmap) and mapped.mode == "r"
            assert Path(mapped.filename) == Path(arr.filename)
    sample = index.select(subset="infection", split="val")[4]
    assert np.array_equal(copy.image(sample), reader.image(sample))
    assert np.array_equal(copy.mask(sample, "infection"), reader.mask(sample, "infection"))


def test_a_changed_tree_is_packed_again_and_an_unchanged_one_is_not(synth_copy, tmp_path):
    from covidqu.data.readers import read_image

    cache = tmp_path / "cache"

    def pack():
        index = scan(synth_copy, subsets=["lung"])
        result = ensure_packed(index, "lung", 48, cache)
        return result, index, PackedReader(result.folder)

    first, index, _ = pack()
    assert first.built
    again, _, _ = pack()
    assert not again.built and again.folder == first.folder  # unchanged: read, not rebuilt

    # touched: the same bytes, a new modification time
    a, b = index.select(split="train")[:2]
    st = os.stat(a.lung_mask)
    os.utime(a.lung_mask, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    touched, _, _ = pack()
    assert touched.built and touched.folder != first.folder
    assert packed_dirs(cache) == [touched.folder.parent, touched.folder]  # the stale one is gone

    # new pixels under the same name
    shutil.copyfile(b.image, a.image)
    replaced, _, reader = pack()
    assert replaced.built and np.array_equal(reader.image(a), read_image(b.image))

    # a file added (an image with its mask), then one removed
    extra = a.image.with_name("covid_999.png")
    shutil.copyfile(b.image, extra)
    shutil.copyfile(b.lung_mask, a.lung_mask.with_name("covid_999.png"))
    added, index, reader = pack()
    assert added.built and added.counts["train"] == touched.counts["train"] + 1
    new = next(s for s in index.samples if s.id == "covid_999")
    assert np.array_equal(reader.image(new), read_image(b.image))
    for path in (extra, a.lung_mask.with_name("covid_999.png"), b.image, b.lung_mask):
        path.unlink()
    removed, index, reader = pack()
    assert removed.built and removed.counts["train"] == touched.counts["train"] - 1
    with pytest.raises(DataError, match="not in the packed cache"):
        reader.image(b)


def test_two_sizes_of_one_tree_are_packed_apart_and_each_read_at_its_own_size(synth_root, tmp_path):
    """A second size gets its own folder and fingerprint beside the first, which stays as it
    was; each is read back at its own height x width, whichever was packed last."""
    from covidqu.data.readers import read_image

    index = scan(synth_root, subsets=["lung"])
    sample = index.select(split="val")[2]
    a = ensure_packed(index, "lung", SIZE, tmp_path)
    manifest_a = (a.folder / packed.MANIFEST).read_text()
    b = ensure_packed(index, "lung", (40, 24), tmp_path)  # not square: height and width apart
    assert a.built and b.built
    assert a.folder.parent != b.folder.parent and b.folder.parent.name.startswith("lung-40x24-")
    assert packed_dirs(tmp_path) == sorted([a.folder.parent, a.folder, b.folder.parent, b.folder])
    assert (a.folder / packed.MANIFEST).read_text() == manifest_a  # not rebuilt, not overwritten
    manifests = [json.loads((p / packed.MANIFEST).read_text()) for p in (a.folder, b.folder)]
    assert manifests[0]["fingerprint"] != manifests[1]["fingerprint"]
    assert [m["size"] for m in manifests] == [[SIZE, SIZE], [40, 24]]
    assert np.load(b.folder / "train.images.npy").shape == (9, 40, 24)
    assert np.load(b.folder / "val.lung.npy").shape == (9, 40, 24)

    again = ensure_packed(index, "lung", SIZE, tmp_path)  # size A after packing size B
    assert not again.built and again.folder == a.folder
    for size, folder in ((SIZE, a.folder), ((40, 24), b.folder)):
        reader = PackedReader(folder)
        hw = packed._hw(size)
        expected = pack_workers._resize(hw)(image=read_image(sample.image))["image"]
        assert reader.size == hw
        assert np.array_equal(reader.image(sample), expected), size
        assert reader.mask(sample, "lung").shape == hw


def _pack_slowly(root: str, cache: str, barrier, results) -> None:
    """One of two processes racing for the same cache; the build is slowed so that they meet."""
    import time

    build = packed.build_arrays

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return build(*args, **kwargs)

    packed.build_arrays = slow
    index = scan(root, subsets=["lung"])
    barrier.wait()
    result = ensure_packed(index, "lung", SIZE, cache, workers=1)
    reader = PackedReader(result.folder)
    image = reader.image(index.select(split="val")[2])
    results.put((result.built, str(result.folder), image.tobytes()))


def test_two_processes_starting_together_pack_once(synth_root, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_pack_slowly, args=(str(synth_root), str(tmp_path), barrier, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(built for built, _, _ in got) == [False, True]  # one built, one waited
    assert got[0][1] == got[1][1]
    index = scan(synth_root, subsets=["lung"])
    expected = pack_workers._resize((SIZE, SIZE))(
        image=read_image(index.select(split="val")[2].image)
    )["image"]
    assert got[0][2] == got[1][2] == expected.tobytes()


def break_files(root: Path) -> tuple[Path, Path]:
    """Corrupt one image and empty one mask of ``root``'s lung subset; their paths."""
    index = scan(root, subsets=["lung"])
    bad_image, bad_mask = (
        index.select(split="val")[1].image,
        index.select(split="test")[5].lung_mask,
    )
    bad_image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    bad_mask.write_bytes(b"")
    return bad_image, bad_mask


def test_bad_files_are_all_named_and_nothing_is_left_in_the_cache(synth_copy, tmp_path):
    from covidqu.data.datamodule import LungDataModule

    bad_image, bad_mask = break_files(synth_copy)
    dm = LungDataModule(root=synth_copy, image_size=SIZE, cache="packed", cache_dir=tmp_path)
    with pytest.raises(PackError) as caught:
        dm.prepare_data()
    message = str(caught.value)
    assert "2 file(s) of the lung subset" in message
    for path in (bad_image, bad_mask):
        assert path.relative_to(scan(synth_copy).subset_dirs["lung"]).as_posix() in message
    assert "unreadable image" in message and "empty file (0 bytes)" in message
    assert {p.path for p in caught.value.problems} == {bad_image, bad_mask}
    assert packed_dirs(tmp_path) == [] and not list(tmp_path.rglob("*.npy"))


def test_unknown_cache_value_is_a_config_error(synth_root):
    from covidqu.data.datamodule import LungDataModule
    from covidqu.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.cache='memory' is not one of none\|packed\|auto"):
        LungDataModule(root=synth_root, cache="memory")

    class Reader:  # a SampleReader of a user's own
        def image(self, sample): ...

        def mask(self, sample, kind): ...

    with pytest.raises(ConfigError, match=r"replaces a data\.reader of your own"):
        LungDataModule(root=synth_root, cache="packed", reader=Reader())


def test_pack_command(synth_copy, tmp_path):
    from covidqu.data.datamodule import LungDataModule

    from pipeline_helpers import run_module

    args = ["pack", str(synth_copy), "--size", "32", "--cache-dir", str(tmp_path), "--workers", "1"]
    done = run_module("covidqu.data", args)
    assert done.returncode == 0, done.stderr
    assert "packed: 27 images of the lung subset (train 9, val 9, test 9) at 32x32" in done.stdout
    assert "packed: 27 images of the infection subset" in done.stdout
    manifests = sorted(tmp_path.rglob("manifest.json"))
    assert len(manifests) == 2
    builds = [json.loads(m.read_text())["build"] for m in manifests]

    # a run with the same tree and size reads what the command packed
    dm = LungDataModule(root=synth_copy, image_size=SIZE, cache="packed", cache_dir=tmp_path)
    dm.prepare_data()
    dm.setup("validate")
    assert [json.loads(m.read_text())["build"] for m in manifests] == builds
    assert str(dm.reader.folder) in done.stdout

    not_a_tree = run_module(
        "covidqu.data", ["pack", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path)]
    )
    assert not_a_tree.returncode == 2 and "does not exist" in not_a_tree.stderr

    bad_image, bad_mask = break_files(synth_copy)
    failed = run_module("covidqu.data", [*args, "--subset", "lung"])
    assert failed.returncode == 1
    assert bad_image.name in failed.stderr and bad_mask.name in failed.stderr
    assert "Traceback" not in failed.stderr


def test_training_and_evaluation_read_the_packed_cache(synth_root, tmp_path, monkeypatch):
    """A run with data.cache=packed packs once (prepare_data) and trains on it; eval with the
    same cache reads the same arrays and scores the test split as training did."""
    from covidqu.eval.run import evaluate
    from covidqu.train.run import train

    from pipeline_helpers import TINY, compose_config, read_metrics

    cache = tmp_path / "cache"
    packing = ["data.cache=packed", f"data.cache_dir={cache}"]
    run = tmp_path / "run"
    overrides = [*TINY, f"data.root={synth_root}", *packing, "trainer.max_epochs=1"]
    train(compose_config("train", overrides, run))
    trained = read_metrics(run)
    (manifest,) = cache.rglob("manifest.json")
    built = json.loads(manifest.read_text())
    assert built["size"] == [SIZE, SIZE] and built["counts"] == {"train": 9, "val": 9, "test": 9}

    ckpt = run / "checkpoints" / "best.ckpt"
    evaluated = [f"ckpt_path={ckpt}", f"data.root={synth_root}", *packing, "num_overlays=0"]
    cfg = compose_config(
        "eval", [*evaluated, "data.num_workers=0", "trainer.accelerator=cpu"], tmp_path / "eval"
    )
    read = []
    image = PackedReader.image
    monkeypatch.setattr(PackedReader, "image", lambda self, s: read.append(s.id) or image(self, s))
    metrics = evaluate(cfg)
    assert len(read) == 9  # every test image came from the cache
    assert metrics["test/dice"] == pytest.approx(trained["test/dice"], abs=1e-5)
    assert json.loads(manifest.read_text())["build"] == built["build"]  # read, not rebuilt

    # The default with the cache is the fast path: packed arrays sent as uint8 and made float
    # on the device (data.normalise=auto). It trains and scores exactly as float batches made
    # in the loader do (data.normalise=loader), on the same seed: every figure equal.
    run2 = tmp_path / "run_loader"
    train(compose_config("train", [*overrides, "data.normalise=loader"], run2))
    figures = {k: v for k, v in trained.items() if k.startswith(("val/", "test/", "train/"))}
    assert figures and "val/loss" in figures and "test/dice" in figures
    assert {k: read_metrics(run2)[k] for k in figures} == figures
    cfg = compose_config(
        "eval",
        [*evaluated, "data.num_workers=0", "trainer.accelerator=cpu", "data.normalise=loader"],
        tmp_path / "eval_loader",
    )
    assert evaluate(cfg)["test/dice"] == metrics["test/dice"]
