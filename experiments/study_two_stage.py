"""The two-stage pipeline step by step: each method's share of the figures, on real data.

Trains on the real Train split of the infection subset (``../shared/data/covidqu-real``) and
scores every step of the pipeline on its Val split with ``python -m covidqu.analyze ...
split=val``, then writes one table, a row per step, with each row's wall time and commands,
into ``experiments/results/two_stage_<scale>.md`` and each row's plots beside it.

    python experiments/study_two_stage.py --scale cpu        # 2 CPU cores: about 90 minutes
    python experiments/study_two_stage.py --scale gpu --weights densenet121_imagenet.pth
    python experiments/study_two_stage.py --scale gpu --weights ... --short   # the whole path, fast

The steps (each row adds one to the row above, except the multitask rows):

1. the recipe's models, raw weights (the infection run's weights before averaging), no
   post-processing; the infection model not started from the lung model (random
   initialisation at cpu scale, ImageNet weights at gpu scale);
2. + post-processing (the steps ``postprocess=auto`` chose on Val during training);
3. + the moving average of the weights (the same run's averaged weights: same data order,
   same epochs, so the difference is the average alone);
4. + transfer: the infection model starts from the lung model's encoder, and its decoder
   where the architectures are the same (cpu scale);
5. the multitask model (also started from the lung model), COVID-19 called from its classifier
   (``detect.score=classifier``), then from the mean of that and the infected share (``mean``).

Which split chose what: the best epoch (``val/dice``) and the post-processing steps are chosen
on Val, the detection threshold on Train (never on the split scored); every figure is on Val.
Val is therefore not untouched for rows 2 to 5: their figures are for comparing the steps, not
estimates for unseen images (the Test split is not in ``../shared/data``).

``--scale cpu`` uses ``experiment=cpu_lung|cpu_infection|cpu_multitask`` (random initialisation,
128 px); ``--scale gpu`` uses ``experiment=paper_lung|paper_infection`` (256 px, ImageNet weights
from ``--weights``, bf16) with the multitask model built on ``paper_infection``, and reports each
run's time per epoch and samples per second. ``--short`` trains one epoch on a few images per
class, to check the whole path (for a GPU node: a few minutes) before the long run.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from covidqu.files import atomic_path, write_atomic

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "covidqu-real"
#: Train / Val images of the infection subset (see ../shared/data/README.md).
TRAIN_IMAGES = 3728

SCALES: dict[str, dict] = {
    "cpu": {
        "lung": ["experiment=cpu_lung", "data=infection"],
        "infection": ["experiment=cpu_infection"],
        "multitask": ["experiment=cpu_multitask"],
        "load_decoder": True,  # one architecture for both: the lung's decoder fits
        "expected": "about 90 minutes on 2 CPU cores (4 trainings of 16-21 min, 6 analyses of 3)",
        "setting": (
            "**Random initialisation, 128 px, 4 epochs a model on 2 CPU cores**: no pretrained "
            "weights could be downloaded where this ran. These figures compare the methods at "
            "that size; they are not the architectures' reach and do not stand beside the "
            "paper's (ImageNet weights, 256 px, full training)."
        ),
    },
    "gpu": {
        "lung": ["experiment=paper_lung", "data=infection", "data.target=lung"],
        "infection": ["experiment=paper_infection"],
        "multitask": ["experiment=paper_infection", "task=multitask"],
        "load_decoder": False,  # FPN's decoder is not U-Net++'s: the lung's encoder alone
        "expected": "not measured yet: this table's durations are the first measurement",
        "setting": (
            "**The paper's setting** (256 px, DenseNet-121 encoders from ImageNet weights, bf16 "
            "on one GPU), trained on the Train split of the infection subset. Transfer (step 4, "
            "5) takes the lung model's encoder alone: FPN's decoder is not U-Net++'s."
        ),
    },
}

#: --short: the whole path on a few images, one epoch each (a check, not a result).
SHORT = [
    "trainer.max_epochs=1",
    "data.limit_per_class={train:24,val:12,test:12}",
    "test=false",
]
SHORT_ANALYZE = ["data.limit_per_class=12"]
SHORT_IMAGES = 3 * 24

#: The paper's figures (Tahir et al. 2021, on their Test split), beside ours.
PAPER = {"lung": 97.99, "infection": 88.21, "sensitivity": "> 99", "specificity": "> 99"}
#: This study's targets at CPU scale.
TARGETS = {"lung": 96.5, "infection": 72.0, "sensitivity": 92.0, "specificity": 92.0, "mae": 8.0}

#: The earlier study's figures (the same Val split, 96 px, 2 + 4 epochs, no post-processing, no
#: average, no transfer), as recorded in experiments/results/two_stage_cpu_2026-11-29.md,
#: quoted as the starting point rather than trained again (31 minutes of training).
BASELINE = {
    "name": "0. earlier baseline (two_stage_cpu_2026-11-29.md: 96 px, 2 + 4 epochs)",
    "lung": 94.59,
    "infection": 59.41,
    "sensitivity": 83.91,
    "specificity": 88.41,
    "auroc": 90.02,
    "mae": 11.97,
    "train_min": 16.2 + 15.2,
    "analyze_min": 2.7,
}


def run(args: list[str]) -> float:
    """Run ``python -m ...`` from the project root; its duration in seconds."""
    started = time.time()
    print("$ python -m " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=True)
    return time.time() - started


def shown(args: list[str], data: Path, runs: Path) -> str:
    """The command as a user types it from the project root (paths relative to it)."""
    text = "python -m " + " ".join(shlex.quote(a) for a in args)
    text = text.replace(str(data), "../shared/data/covidqu-real")
    return text.replace(f"{runs}/", "RUNS/").replace(f"{ROOT}/", "")


def raw_weights(ckpt: Path) -> Path:
    """A copy of an ``ema=true`` checkpoint holding the raw weights instead of their average
    (Lightning's weight averaging keeps them under ``current_model_state``)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if "current_model_state" not in state:
        raise SystemExit(f"{ckpt} holds no raw weights (current_model_state): train with ema=true")
    state["state_dict"] = state.pop("current_model_state")
    state.pop("averaging_state", None)
    out = ckpt.with_name("raw.ckpt")
    with atomic_path(out) as partial:  # complete or absent, never half-written
        torch.save(state, partial)
    return out


def epoch_times(folder: Path, seconds: float, images: int) -> dict[str, float]:
    """Epochs run (the run's metrics.csv: a row an epoch with the epoch's training loss),
    seconds an epoch and training samples a second, from the run's wall time (start-up,
    validation and the post-processing trials included)."""
    header, *rows = (folder / "csv" / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("train/loss_epoch")
    epochs = max(1, sum(1 for r in rows if r.split(",")[column]))
    return {
        "epochs": epochs,
        "s_per_epoch": seconds / epochs,
        "samples_s": images * epochs / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--data", type=Path, default=DATA, help="the real infection subset")
    parser.add_argument("--weights", type=Path, default=None, help="--scale gpu: ImageNet file")
    parser.add_argument("--short", action="store_true", help="one epoch on a few images")
    parser.add_argument("--runs", type=Path, default=ROOT / "logs" / "study_two_stage")
    parser.add_argument("--out", type=Path, default=None, help="the results markdown file")
    parser.add_argument(
        "overrides", nargs="*", help="more overrides for every training, e.g. trainer=cpu"
    )
    parser.add_argument("--raw", type=Path, default=None, help="only write CKPT's raw weights")
    opts = parser.parse_args()
    if opts.raw:
        print(f"written: {raw_weights(opts.raw)}")
        return
    scale = SCALES[opts.scale]
    name = opts.scale + ("_short" if opts.short else "")
    out = opts.out or ROOT / "experiments" / "results" / f"two_stage_{name}.md"
    runs = (opts.runs / name).resolve()
    data = opts.data.resolve()
    if not data.is_dir():
        raise SystemExit(f"--data {data}: no such folder (the infection subset of COVID-QU-Ex)")
    extra = [f"data.root={data}", *(SHORT if opts.short else []), *opts.overrides]
    weights = []
    if opts.scale == "gpu":
        if opts.weights is None or not opts.weights.is_file():
            raise SystemExit("--scale gpu needs --weights FILE: a DenseNet-121 ImageNet state dict")
        weights = [f"encoder.weights={opts.weights.resolve()}"]

    trained: dict[str, dict] = {}
    # Each finished step's wall time, so that a study cut short goes on where it stopped: a step
    # whose folder holds its metrics.json and whose time is recorded here is not run again.
    record = runs / "study.json"
    done = json.loads(record.read_text()) if record.is_file() else {}

    def timed(key: str, args: list[str]) -> float:
        if key in done and (runs / key / "metrics.json").is_file():
            print(f"done before: {key} ({done[key] / 60:.1f} min)", flush=True)
            return done[key]
        done[key] = run(args)
        runs.mkdir(parents=True, exist_ok=True)
        write_atomic(record, json.dumps(done, indent=1))
        return done[key]

    def train(key: str, args: list[str]) -> Path:
        folder = runs / key
        full = ["covidqu.train", *args, *extra, f"hydra.run.dir={folder}"]
        seconds = timed(key, full)
        trained[key] = {"command": shown(full, data, runs), "seconds": seconds}
        trained[key] |= epoch_times(folder, seconds, SHORT_IMAGES if opts.short else TRAIN_IMAGES)
        return folder / "checkpoints" / "best.ckpt"

    lung = train("lung", scale["lung"] + weights)
    transfer = [
        f"encoder.weights={lung}",
        f"encoder.load_decoder={str(scale['load_decoder']).lower()}",
    ]
    scratch = weights or ["encoder.weights=null"]
    infection = train("infection", scale["infection"] + scratch + ["encoder.load_decoder=false"])
    raw = raw_weights(infection)
    transferred = train("infection_transfer", scale["infection"] + transfer)
    multitask = train("multitask", scale["multitask"] + transfer)

    steps = [
        (
            "1. recipe, raw weights, no post-processing",
            raw,
            ["postprocess=none"],
            ["lung", "infection"],
        ),
        ("2. + post-processing (chosen on Val)", raw, [], ["lung", "infection"]),
        ("3. + moving average of the weights", infection, [], ["lung", "infection"]),
        ("4. + transfer from the lung model", transferred, [], ["lung", "infection_transfer"]),
        (
            "5a. multitask, detect.score=classifier",
            multitask,
            ["detect.score=classifier"],
            ["lung", "multitask"],
        ),
        (
            "5b. multitask, detect.score=mean",
            multitask,
            ["detect.score=mean"],
            ["lung", "multitask"],
        ),
    ]
    rows = []
    for index, (label, ckpt, options, models) in enumerate(steps, start=1):
        folder = runs / f"analyze_{index}"
        args = [
            "covidqu.analyze",
            f"lung_ckpt={lung}",
            f"infection_ckpt={ckpt}",
            f"data.root={data}",
            "split=val",
            *options,
            *(SHORT_ANALYZE if opts.short else []),
            f"hydra.run.dir={folder}",
        ]
        seconds = timed(folder.name, args)
        figures = json.loads((folder / "metrics.json").read_text())
        rows.append(
            {
                "name": label,
                "lung": 100 * figures["lung/dice_image"],
                "infection": 100 * figures["infection/dice_covid"],
                "sensitivity": 100 * figures["detect/sensitivity"],
                "specificity": 100 * figures["detect/specificity"],
                "auroc": 100 * figures["detect/auroc"],
                "mae": figures["severity/mae_pct"],
                "train_min": sum(trained[m]["seconds"] for m in models) / 60,
                "analyze_min": seconds / 60,
                "analyze": shown(args, data, runs),
                "folder": folder,
            }
        )
    plots = out.with_suffix("")
    if plots.exists():
        shutil.rmtree(plots)
    plots.mkdir(parents=True)
    for index, row in enumerate(rows, start=1):
        for png in PLOTS:
            if (row["folder"] / png).is_file():
                shutil.copyfile(row["folder"] / png, plots / f"step{index}_{png}")
    notes = ""
    if out.is_file():  # what was written by hand below the marker is kept
        _, marker, kept = out.read_text().partition(NOTES)
        notes = marker + kept if marker else ""
    write_atomic(out, report(opts, name, scale, trained, rows, plots) + (notes or NOTES + "\n"))
    print(f"written: {out}")


#: The plots of each analyze run copied beside the table (not its per-image overlays).
PLOTS = ("roc.png", "severity.png", "reliability.png", "grade_confusion.png")
NOTES = "<!-- notes: written by hand, kept when the study is run again -->"


def report(opts, name: str, scale: dict, trained: dict, rows: list[dict], plots: Path) -> str:
    cmd = f"python experiments/study_two_stage.py --scale {opts.scale}"
    if opts.scale == "gpu":
        cmd += " --weights DENSENET121_IMAGENET.pth"
    if opts.short:
        cmd += " --short"
    lines = [
        f"# The two-stage pipeline step by step ({name} scale)",
        "",
        f"Written by `{cmd}` on {time.strftime('%Y-%m-%d')}. Trained on the real Train split of "
        "the infection subset (3,728 CXRs), scored on its Val split (932 CXRs: 466 COVID-19, "
        "233 Non-COVID, 233 Normal); the Test split is not in `../shared/data`.",
        "",
        scale["setting"],
        "",
        "Which split chose what: the best epoch of each run (`val/dice`) and the post-processing "
        "steps (`postprocess=auto`) were chosen on Val; the detection threshold on Train. Every "
        "figure below is on Val, so Val is not untouched from step 2 on: read the rows against "
        "each other, not as estimates for unseen images.",
        "",
    ]
    if opts.short:
        lines += ["**--short: one epoch on a few images per class. A check of the path only.**", ""]
    lines += [
        "| step | lung Dice | infection Dice (COVID-19) | sensitivity | specificity | AUROC "
        "| severity MAE (points) | training (min) | analyze (min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    everything = ([BASELINE] if opts.scale == "cpu" and not opts.short else []) + rows
    for row in everything:
        lines.append(
            f"| {row['name']} | {row['lung']:.2f} | {row['infection']:.2f} | "
            f"{row['sensitivity']:.2f} | {row['specificity']:.2f} | {row['auroc']:.2f} | "
            f"{row['mae']:.2f} | {row['train_min']:.1f} | {row['analyze_min']:.1f} |"
        )
    lines.append(
        f"| the paper (Tahir et al. 2021, its Test split) | {PAPER['lung']} | "
        f"{PAPER['infection']} | {PAPER['sensitivity']} | {PAPER['specificity']} | | | | |"
    )
    lines += [
        "",
        "Dice is per image in percent at the images' own size (256 px), the infection Dice over "
        "COVID-19 images; training minutes are those of the two models a row uses (the lung "
        "model and its infection or multitask model). Steps 1-3 use one infection run: its raw "
        "weights (1, 2) and their moving average (3).",
        "",
    ]
    if opts.scale == "cpu" and not opts.short:
        best = {
            key: max(r[key] for r in rows)
            for key in ("lung", "infection", "sensitivity", "specificity")
        }
        best["mae"] = min(r["mae"] for r in rows)
        lines += ["Targets at this scale, against the best row:", ""]
        for key, target in TARGETS.items():
            better = best[key] <= target if key == "mae" else best[key] >= target
            gap = abs(best[key] - target)
            verdict = "met" if better else f"missed by {gap:.2f}"
            sign = "<=" if key == "mae" else ">="
            lines.append(f"- {key}: {best[key]:.2f} (target {sign} {target:g}): {verdict}")
        lines.append("")
    lines += [
        "Runs:",
        "",
        "| run | epochs | wall (min) | s / epoch | samples / s |",
        "|---|---|---|---|---|",
    ]
    for key, info in trained.items():
        lines.append(
            f"| {key} | {info['epochs']} | {info['seconds'] / 60:.1f} | "
            f"{info['s_per_epoch']:.0f} | {info['samples_s']:.1f} |"
        )
    lines += [
        "",
        "Seconds an epoch and samples a second come from each run's wall time (start-up, "
        "validation and the post-processing trials included) over its epochs.",
        "",
        f"Expected for this scale: {scale['expected']}.",
        "",
        "Commands (RUNS is the study's run folder; `--runs` sets it):",
        "",
        "```bash",
    ]
    if opts.scale == "cpu" and not opts.short:
        lines.append("# step 0: the commands in experiments/results/two_stage_cpu_2026-11-29.md")
    lines += [info["command"] for info in trained.values()]
    # steps 1-2: the raw weights of the infection run's best.ckpt, as RUNS/infection/.../raw.ckpt
    lines.append("python experiments/study_two_stage.py --raw RUNS/infection/checkpoints/best.ckpt")
    lines += [row["analyze"] for row in rows]
    lines += ["```", ""]
    rel = plots.relative_to(ROOT) if plots.is_relative_to(ROOT) else plots
    lines += [
        f"Plots of each step (ROC, severity, reliability, grade confusion): `{rel}/stepN_*.png`, "
        "N counting the rows above from 1 (5a is 5, 5b is 6).",
        "",
    ]
    return "\n".join(re.sub(r"[ \t]+$", "", line) for line in lines) + "\n"


if __name__ == "__main__":
    main()
