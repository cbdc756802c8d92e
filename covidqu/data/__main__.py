"""``python -m covidqu.data {synth,inspect,pack,duplicates}``: make a synthetic tree, check a real
one, pack one into memory-mapped arrays for fast loading (``data.cache=packed``), or list its
near-duplicate images split by split."""

from __future__ import annotations

import argparse
import sys

from covidqu.data import duplicates, inspection, packed, synth

#: Each command: the module that adds its options and runs it, its one-line help, and what its
#: ``--help`` says (with the exit codes).
COMMANDS = {
    "synth": (
        synth,
        "write a COVID-QU-Ex shaped tree of synthetic CXRs",
        "Write both subsets, all splits and classes, of synthetic, learnable CXRs.",
    ),
    "inspect": (
        inspection,
        "count (and with --verify, check) a COVID-QU-Ex tree",
        "Counts per subset / split / class beside the official counts. Exit 0: no problem; 1: "
        "problems (each bad file named); 2: not a COVID-QU-Ex tree.",
    ),
    "pack": (
        packed,
        "decode and resize a tree once into the packed cache (data.cache=packed)",
        "Decode and resize every split of each subset once into memory-mapped arrays under the "
        "cache folder, as data.cache=packed reads them. Exit 0: packed (or already up to date); "
        "1: files that could not be packed (each named); 2: not a COVID-QU-Ex tree.",
    ),
    "duplicates": (
        duplicates,
        "list near-duplicate images (perceptual hash) split by split",
        "Hash every image of both subsets (cached under the cache folder) and list the pairs "
        "within --max-distance bits: within a split, across splits, across subsets. Exit 0: no "
        "pair straddles Train (or Val) and Test; 1: some do (each named); 2: not a COVID-QU-Ex "
        "tree, an unreadable file, or a bad option.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m covidqu.data", description="COVID-QU-Ex data tools."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, summary, description) in COMMANDS.items():
        command = sub.add_parser(name, help=summary, description=description)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
