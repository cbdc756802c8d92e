"""Post-processing of predicted masks: the steps themselves, the choice on the validation split
(kept only where the Dice rises), and the same steps in training, eval, predict, analyze and
export."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from covidqu.analyze import stages as stages_module
from covidqu.errors import ConfigError
from covidqu.eval.run import evaluate
from covidqu.export.run import metadata
from covidqu.models.checkpoint import load_module, read_checkpoint
from covidqu.models.postprocess import PostProcess, apply_config, choose, trials
from covidqu.train.postprocess import CHOICE_FILE

from pipeline_helpers import TINY, compose_config, read_csv, read_metrics

ALL = PostProcess(lung_components=2, fill_holes=True, inside_lung=True, min_infection_area=0.01)


def lungs_with_an_island_and_a_hole() -> tuple[np.ndarray, np.ndarray]:
    """A 20 x 20 mask: two lungs (one with a hole), an island, and what cleaning leaves."""
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[2:16, 2:8] = 1  # left lung, 84 px
    mask[2:16, 11:17] = 1  # right lung
    mask[6:8, 4:6] = 0  # a hole in the left lung
    mask[18, 0] = mask[19, 1] = 1  # an island of 2 px, touching at a corner only
    clean = mask.copy()
    clean[6:8, 4:6] = 1
    clean[18, 0] = clean[19, 1] = 0
    return mask, clean


def test_the_lung_keeps_its_two_largest_components_without_holes():
    mask, clean = lungs_with_an_island_and_a_hole()
    assert (ALL.clean(mask, ("lung",)) == clean).all()
    only_two = PostProcess(lung_components=2).clean(mask, ("lung",))
    assert only_two[6:8, 4:6].sum() == 0 and only_two[18:, :2].sum() == 0  # hole kept
    assert (PostProcess(lung_components=3).clean(mask, ("lung",)) == mask).all()
    assert (PostProcess().clean(mask, ("lung",)) == mask).all()  # nothing on: unchanged


def test_the_infection_stays_inside_the_lung_and_loses_its_specks():
    lung = np.zeros((20, 20), dtype=bool)
    lung[:, :10] = True
    infection = np.zeros((20, 20), dtype=np.uint8)
    infection[2:8, 2:8] = 1  # 36 px inside the lung
    infection[12, 3] = infection[13, 4] = 1  # 2 px, one component (8-connected): a speck
    infection[2:8, 12:18] = 1  # outside the lung
    steps = PostProcess(inside_lung=True, min_infection_area=3 / 400)  # 3 px of 400
    out = steps.clean(infection, ("infection",), lung)
    expected = np.zeros_like(infection)
    expected[2:8, 2:8] = 1
    assert (out == expected).all()
    # the two pixels touching at a corner are one component of 2 px (8-connectivity)
    pair = PostProcess(min_infection_area=2 / 400).clean(infection, ("infection",), lung)
    assert pair[12, 3] == pair[13, 4] == 1
    # no lung known (predict with a binary infection model): only the area step applies
    alone = steps.clean(infection, ("infection",), None)
    assert alone[2:8, 12:18].all() and alone[12:14].sum() == 0


def test_a_multiclass_mask_is_cleaned_class_by_class():
    mask, clean = lungs_with_an_island_and_a_hole()
    labels = mask.astype(np.int64)  # 0 background, 1 lung, 2 infection
    labels[3:6, 3:6] = 2  # infection inside the left lung
    labels[18, 0] = 2  # infection on the island, outside the lungs kept
    out = ALL.clean(labels, ("background", "lung", "infection"))
    assert (out[3:6, 3:6] == 2).all()
    assert out[18, 0] == 0 and out[19, 1] == 0  # the island went, its infection with it
    assert ((out > 0) == clean.astype(bool)).all()


def test_a_step_is_kept_only_where_it_raises_the_validation_dice():
    classes = ("background", "lung", "infection")
    keys = trials(classes, ALL)
    assert len(keys) == 16 and "" in keys  # every combination of the four steps
    assert sorted(trials(("lung",), ALL)) == ["", "fill_holes", "lung_components",
                                              "lung_components+fill_holes"]  # fmt: skip
    # lung_components helps (+0.1), fill_holes lowers it (-0.05), each wherever it is added
    help_ = {"lung_components": 0.1, "fill_holes": -0.05}
    rows = [
        {key: 0.5 + sum(help_[s] for s in key.split("+") if s) for key in trials(("lung",), ALL)}
        for _ in range(4)
    ]
    choice = choose(("lung",), ALL, rows)
    assert choice.chosen == PostProcess(lung_components=2)
    assert choice.raw == pytest.approx(0.5) and choice.post == pytest.approx(0.6)
    assert [(t["step"], t["kept"]) for t in choice.tried] == [
        ("lung_components", True),
        ("fill_holes", False),
    ]
    # a step that changes nothing is not kept either
    flat = [{key: 0.5 for key in trials(("lung",), ALL)}]
    assert not choose(("lung",), ALL, flat).chosen.active


@pytest.mark.parametrize("kind", ["lung", "infection", "infection_multiclass"])
def test_training_chooses_on_val_and_records_the_choice_where_commands_find_it(kind, trained_run):
    run = trained_run(kind)
    record = json.loads((run / CHOICE_FILE).read_text())
    metrics = read_metrics(run)
    chosen = PostProcess.from_config(record["chosen"])
    # the checkpoint carries the choice, the commands' default applies it
    best = run / metrics["best_checkpoint"]
    assert read_checkpoint(best)["covidqu"]["postprocess"] == chosen.as_dict()
    assert load_module(best).postprocess == chosen
    assert metrics["postprocess"] == chosen.describe()
    # "without" is the network's own per-image figure, and "with" never lower
    assert metrics["val/dice_image_raw"] == pytest.approx(metrics["val/dice_image"], abs=1e-4)
    assert metrics["val/dice_image_post"] >= metrics["val/dice_image_raw"]
    assert record["dice_raw"] == pytest.approx(metrics["val/dice_image_raw"])
    steps = {"lung": 2, "infection": 2, "infection_multiclass": 4}[kind]
    assert [t["step"] for t in record["tried"]] == trials_of(kind)[:steps]
    for t in record["tried"]:
        assert t["kept"] == (t["with"] > t["without"])
    assert "test/dice_image_post" in metrics


def trials_of(kind: str) -> list[str]:
    lung, infection = ["lung_components", "fill_holes"], ["inside_lung", "min_infection_area"]
    return {"lung": lung, "infection": infection, "infection_multiclass": lung + infection}[kind]


def with_island() -> Callable[[torch.Tensor], torch.Tensor]:
    """A network whose every mask is :func:`lungs_with_an_island_and_a_hole` at 20 x 20."""
    mask, _ = lungs_with_an_island_and_a_hole()
    logits = torch.from_numpy(mask.astype(np.float32) * 20 - 10)[None, None]
    return lambda image: logits.expand(image.shape[0], 1, 20, 20).clone()


def test_the_test_rows_score_the_post_processed_masks(trained_run):
    module = load_module(trained_run("lung") / "checkpoints" / "best.ckpt")
    mask, clean = lungs_with_an_island_and_a_hole()
    logits = torch.from_numpy(mask.astype(np.float32) * 20 - 10)[None, None]
    batch = {
        "image": torch.zeros(1, 1, 20, 20),
        "mask": torch.from_numpy(clean.astype(np.float32))[None, None],
        "label": torch.tensor([2]),
        "id": ["a"],
    }
    module.postprocess = PostProcess()
    module.record_test_batch(batch, logits)
    module.postprocess = ALL
    module.record_test_batch(batch, logits)
    raw, post = module.test_records
    assert raw["dice"] < 1.0 and post["dice"] == pytest.approx(1.0)
    # the overlay shows the cleaned mask too
    (item,) = module.overlay_items(batch, logits, [0])
    assert (item["prediction"].numpy() == clean).all()


def test_validation_scores_every_combination_per_image(trained_run):
    module = load_module(trained_run("lung") / "checkpoints" / "best.ckpt")
    module.forward = with_island()
    module.trials = trials(("lung",), ALL)
    _, clean = lungs_with_an_island_and_a_hole()
    batch = {
        "image": torch.zeros(3, 1, 20, 20),
        "mask": torch.from_numpy(clean.astype(np.float32))[None, None].expand(3, 1, 20, 20),
        "label": torch.tensor([0, 1, 2]),
        "id": ["a", "b", "c"],
    }
    module.on_validation_epoch_start()
    module.validation_step(batch, 0)
    rows = module.trial_rows
    assert len(rows) == 3
    assert rows[0]["lung_components+fill_holes"] == pytest.approx(1.0)
    assert rows[0][""] < rows[0]["fill_holes"] < 1.0 and rows[0][""] < rows[0]["lung_components"]
    choice = choose(("lung",), ALL, rows)
    assert choice.chosen == PostProcess(lung_components=2, fill_holes=True)


def test_predict_and_export_apply_and_state_the_steps(trained_run):
    module = load_module(trained_run("lung") / "checkpoints" / "best.ckpt")
    mask, clean = lungs_with_an_island_and_a_hole()
    probabilities = mask.astype(np.float32)[None]
    image = np.zeros((20, 20), dtype=np.uint8)
    apply_config(module, {"mode": "fixed", **ALL.as_dict()})
    _, pictures = module.predict_outputs(image, probabilities)
    assert ((pictures["mask"] > 0) == clean.astype(bool)).all()
    assert metadata(module)["postprocess"] == ALL.as_dict()
    apply_config(module, {"mode": "fixed", **PostProcess().as_dict()})
    _, pictures = module.predict_outputs(image, probabilities)
    assert ((pictures["mask"] > 0) == mask.astype(bool)).all()
    with pytest.raises(ConfigError, match="postprocess=auto is chosen on the validation split"):
        apply_config(module, {"mode": "auto"})


def test_analyze_cleans_each_stage_with_its_own_steps(trained_run, monkeypatch):
    lung_module = load_module(trained_run("lung") / "checkpoints" / "best.ckpt")
    infection_module = load_module(trained_run("infection") / "checkpoints" / "best.ckpt")
    mask, clean = lungs_with_an_island_and_a_hole()
    speck = np.zeros((20, 20), dtype=np.float32)
    speck[3:6, 3:6] = 1  # inside the left lung
    speck[18, 0] = 1  # on the island

    def probabilities(module, images, device):
        one = mask.astype(np.float32)[None] if module is lung_module else speck[None]
        return np.stack([one] * len(images))

    monkeypatch.setattr(stages_module, "probabilities", probabilities)
    lung_module.postprocess = PostProcess(lung_components=2, fill_holes=True)
    infection_module.postprocess = PostProcess()
    found = stages_module.segment(
        stages_module.Stages(lung_module, infection_module), [np.zeros((20, 20))], "cpu"
    )
    lung, infection = found[0]
    assert (lung == clean.astype(bool)).all()
    assert infection.sum() == 9  # the island's speck went with the island


def test_eval_reports_the_figures_with_and_without(trained_run, synth_root, tmp_path):
    best = trained_run("infection") / "checkpoints" / "best.ckpt"
    base = [f"ckpt_path={best}", f"data.root={synth_root}", "data.num_workers=0"]
    figures = {}
    for choice in ("none", "all", "checkpoint"):
        out = tmp_path / choice
        evaluate(compose_config("eval", [*base, f"postprocess={choice}"], out))
        figures[choice] = read_metrics(out)
        rows = read_csv(out / "per_image.csv")
        dice = np.mean([float(r["dice"]) for r in rows])
        assert figures[choice]["test/dice_image_post"] == pytest.approx(dice, abs=1e-6)
    none, all_, recorded = figures["none"], figures["all"], figures["checkpoint"]
    assert none["postprocess"] == "none"
    assert none["test/dice_image_post"] == pytest.approx(none["test/dice_image"], abs=1e-4)
    assert (
        all_["postprocess"]
        == PostProcess.from_config(
            compose_config("eval", [*base, "postprocess=all"], tmp_path / "x").postprocess
        ).describe()
    )
    assert recorded["postprocess"] == load_module(best).postprocess.describe()
    # the network's own figures do not depend on the post-processing
    assert all_["test/dice"] == pytest.approx(none["test/dice"])


def test_a_bad_step_value_is_refused_up_front(synth_root, tmp_path):
    from covidqu.runtime.checks import check_values

    cfg = compose_config(
        "train", [*TINY, f"data.root={synth_root}", "postprocess.lung_components=-1"], tmp_path
    )
    with pytest.raises(ConfigError, match=r"postprocess\.lung_components=-1"):
        check_values(cfg, "train")
    cfg = compose_config("eval", ["ckpt_path=x", "postprocess=auto"], tmp_path)
    with pytest.raises(ConfigError, match=r"postprocess\.mode"):
        check_values(cfg, "eval")


def test_none_of_it_touches_a_classifier(trained_run):
    module = load_module(trained_run("classify") / "checkpoints" / "best.ckpt")
    apply_config(module, {"mode": "fixed", **ALL.as_dict()})  # no masks: nothing to set
    assert not hasattr(module, "postprocess")
    assert "postprocess" not in read_metrics(Path(trained_run("classify")))
