"""Start-up of the commands against the bare import of torch and Lightning, side by side.

Each command is run in a fresh process, the commands in turn (``--repeats`` rounds, so a busy
machine slows all of them alike), and the median wall time of each is set beside that of
``python -c "import torch, pytorch_lightning"``. The aim: every command at most 1.2x the bare
import (``--help`` and ``inspect`` import no torch at all, see tests/test_startup.py).

    python experiments/bench_startup.py [--root TREE] [--repeats 7]

``--root`` is the tree ``inspect`` counts (default: the real sample tree beside the project,
else a small synthetic one written to a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = PROJECT_ROOT.parent / "shared" / "data" / "covidqu-sample"


def commands(root: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "import torch, pytorch_lightning": [py, "-c", "import torch, pytorch_lightning"],
        "covidqu.train --help": [py, "-m", "covidqu.train", "--help"],
        "covidqu.eval --help": [py, "-m", "covidqu.eval", "--help"],
        "covidqu.predict --help": [py, "-m", "covidqu.predict", "--help"],
        "covidqu.analyze --help": [py, "-m", "covidqu.analyze", "--help"],
        "covidqu.report --help": [py, "-m", "covidqu.report", "--help"],
        "covidqu.data inspect": [py, "-m", "covidqu.data", "inspect", str(root)],
    }


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT)
    elapsed = time.perf_counter() - t0
    if proc.returncode not in (0, 1):  # inspect exits 1 for a tree with problems
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="the tree inspect counts")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            if SAMPLE.is_dir():
                root = SAMPLE
            else:
                from covidqu.data.synth import generate

                root = generate(Path(tmp) / "synth", per_class=2, size=32, seed=0)
        cmds = commands(root)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for cmd in cmds.values():  # a first round to warm the file cache, not counted
            timed(cmd)
        for _ in range(args.repeats):
            for name, cmd in cmds.items():
                times[name].append(timed(cmd))
    base = statistics.median(times["import torch, pytorch_lightning"])
    print(f"start-up, median of {args.repeats} alternating runs (inspect: {root})")
    print(f"  {'command':34s} {'median':>8s} {'min':>8s} {'ratio':>7s}")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:34s} {med:7.2f}s {min(t):7.2f}s {med / base:6.2f}x")
    print(f"  (python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
