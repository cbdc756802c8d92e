"""The two-stage pipeline on the real infection subset: train, score each stage, score the whole.

Trains a lung model (``task=lung`` on the infection subset's lung masks) and an infection model
(``task=infection``) on the real Train split in ``../shared/data/covidqu-real``, then scores each
model on its Val split (their ``metrics.json``) and the whole pipeline with
``python -m covidqu.analyze ... split=val`` (the detection threshold tuned on Train, never on
Val), and writes a markdown table with the exact commands into ``experiments/results/``.

    python experiments/study_two_stage.py                 # CPU scale: about 35 min on 2 cores
    python experiments/study_two_stage.py --scale paper   # the paper's set-up, for a GPU

CPU scale trains from random initialisation (no pretrained weights can be downloaded on the
machine it was written on) at 96 px for a few epochs: its figures show the pipeline works on
real data and where it stands at that size, not what the architectures reach. Paper scale is
256 px, U-Net++ / DenseNet-121 for the lungs and FPN / DenseNet-121 for the infection, ImageNet
weights and the experiment configs' full epochs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "covidqu-real"

SCALES: dict[str, dict] = {
    "cpu": {
        "lung": [
            "task=lung",
            "data=infection",
            "data.target=lung",
            "model=unet",
            "encoder=resnet18",
            "encoder.weights=null",
            "data.image_size=96",
            "data.batch_size=16",
            "trainer.max_epochs=2",
        ],
        "infection": [
            "task=infection",
            "model=unet",
            "encoder=resnet18",
            "encoder.weights=null",
            "data.image_size=96",
            "data.batch_size=16",
            "trainer.max_epochs=4",
        ],
        "trainer": ["trainer=cpu", "data.num_workers=2"],
        "expected": "about 35 minutes on 2 CPU cores (16 + 15 + 3 measured)",
    },
    "paper": {
        "lung": ["experiment=lung_unetplusplus_densenet121", "data=infection", "data.target=lung"],
        "infection": ["experiment=infection_fpn_densenet121"],
        "trainer": ["trainer=gpu", "data.num_workers=8"],
        "expected": (
            "not measured yet; an estimate of 2 to 4 hours for both models on one recent "
            "data-centre GPU (60 + 80 epochs of 3,728 images at 256 px)"
        ),
    },
}

LUNG_KEYS = ["val/dice", "val/iou", "val/dice_image", "val/iou_image"]
INFECTION_KEYS = ["val/dice", "val/iou", "val/dice_image", "val/dice_covid", "val/iou_covid"]
DETECT = ["sensitivity", "specificity", "accuracy", "f1", "auroc"]
SEVERITY = ["severity/mae_pct", "severity/pearson", "severity/grade_acc", "severity/grade_kappa"]
STAGES = ["lung/dice_image", "lung/iou_image", "infection/dice_covid", "infection/iou_covid"]


def run(args: list[str]) -> float:
    """Run ``python -m ...`` from the project root; its duration in seconds."""
    started = time.time()
    print("$ python -m " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=True)
    return time.time() - started


def command(args: list[str]) -> str:
    """The command as a user types it from the project root (paths relative to it)."""
    text = "python -m " + " ".join(shlex.quote(a) for a in args)
    return text.replace(f"{DATA}", "../shared/data/covidqu-real").replace(f"{ROOT}/", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--data", type=Path, default=DATA, help="the real infection subset")
    parser.add_argument("--runs", type=Path, default=ROOT / "logs" / "study_two_stage")
    parser.add_argument("--out", type=Path, default=None, help="the results markdown file")
    opts = parser.parse_args()
    scale = SCALES[opts.scale]
    out = opts.out or ROOT / "experiments" / "results" / f"two_stage_{opts.scale}.md"
    runs = opts.runs / opts.scale
    data = opts.data.resolve()

    commands, durations, figures = {}, {}, {}
    for stage in ("lung", "infection"):
        folder = runs / stage
        args = ["covidqu.train", *scale[stage], *scale["trainer"], f"data.root={data}"]
        args.append(f"hydra.run.dir={folder}")
        commands[stage] = command(args)
        durations[stage] = run(args)
        figures[stage] = json.loads((folder / "metrics.json").read_text())

    folder = runs / "analyze"
    args = [
        "covidqu.analyze",
        f"lung_ckpt={runs / 'lung' / 'checkpoints' / 'best.ckpt'}",
        f"infection_ckpt={runs / 'infection' / 'checkpoints' / 'best.ckpt'}",
        f"data.root={data}",
        "split=val",
        f"hydra.run.dir={folder}",
    ]
    commands["analyze"] = command(args)
    durations["analyze"] = run(args)
    figures["analyze"] = json.loads((folder / "metrics.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(opts.scale, scale, commands, durations, figures))
    print(f"written: {out}")


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def report(name: str, scale: dict, commands: dict, durations: dict, figures: dict) -> str:
    lung, infection, pipeline = figures["lung"], figures["infection"], figures["analyze"]
    lines = [
        f"# Two-stage pipeline on the real infection subset ({name} scale)",
        "",
        f"Written by `python experiments/study_two_stage.py --scale {name}` on "
        f"{time.strftime('%Y-%m-%d')}. Trained on the real Train split (3,728 CXRs), scored on "
        "the real Val split (932 CXRs: 466 COVID-19, 233 Non-COVID, 233 Normal); the Test split "
        "is not in `../shared/data`.",
        "",
    ]
    if name == "cpu":
        lines += [
            "**Random initialisation, 96 px, 2 + 4 epochs on 2 CPU cores**: no pretrained "
            "weights could be downloaded where this ran. These figures show the pipeline at work "
            "on real data at that size; they are not the architectures' reach and do not stand "
            "beside the paper's (ImageNet weights, 256 px, full training).",
            "",
        ]
    lines += [
        "| model | figure | Val (%) | the paper (Test, %) |",
        "|---|---|---|---|",
    ]
    paper = {"val/dice_image": "DSC 97.99", "val/iou_image": "IoU 96.11"}
    for key in LUNG_KEYS:
        lines.append(f"| lung | `{key}` | {pct(lung.get(key))} | {paper.get(key, '')} |")
    paper = {"val/dice_covid": "DSC 88.21", "val/iou_covid": "IoU 83.05"}
    for key in INFECTION_KEYS:
        lines.append(f"| infection | `{key}` | {pct(infection.get(key))} | {paper.get(key, '')} |")
    lines += [
        "",
        "The pipeline scores each stage at the images' own size (256 px), from masks resized up "
        "from the models' outputs; training scores them at the models' size. Hence the small "
        "differences between the two tables' lung and infection figures.",
        "",
        "| pipeline | Val | 95 % interval | the paper |",
        "|---|---|---|---|",
    ]
    for key in DETECT:
        value = pipeline.get(f"detect/{key}")
        low, high = pipeline.get(f"detect/{key}_ci_low"), pipeline.get(f"detect/{key}_ci_high")
        ref = "> 99" if key in ("sensitivity", "specificity") else ""
        lines.append(f"| `detect/{key}` (%) | {pct(value)} | {pct(low)} - {pct(high)} | {ref} |")
    lines.append(
        f"| `detect/threshold` | {pipeline['detect/threshold']:.3g} % of the lung, tuned on "
        f"{pipeline['detect/threshold_source']} | | |"
    )
    for key in SEVERITY + STAGES:
        value = pipeline.get(key)
        shown = "n/a" if value is None else f"{value:.4f}"
        lines.append(f"| `{key}` | {shown} | | |")
    lines += ["", "Durations on this machine:", ""]
    lines += [f"- {stage}: {seconds / 60:.1f} min" for stage, seconds in durations.items()]
    lines += [f"- expected for this scale: {scale['expected']}", "", "Commands:", "", "```bash"]
    lines += [commands[stage] for stage in ("lung", "infection", "analyze")]
    lines += ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
