"""``python -m covidqu.data {synth,inspect,pack,duplicates}``: make a synthetic tree, check a real
one, pack one into memory-mapped arrays for fast loading (``data.cache=packed``), or list its
near-duplicate images split by split."""

from __future__ import annotations

import argparse
import sys

from covidqu.data import duplicates, inspection, packed, synth


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m covidqu.data", description="COVID-QU-Ex data tools."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "synth",
        help="write a COVID-QU-Ex shaped tree of synthetic CXRs",
        description="Write both subsets, all splits and classes, of synthetic, learnable CXRs.",
    )
    synth.add_arguments(p)
    p.set_defaults(func=synth.run)
    p = sub.add_parser(
        "inspect",
        help="count (and with --verify, check) a COVID-QU-Ex tree",
        description="Counts per subset / split / class beside the official counts. Exit 0: no "
        "problem; 1: problems (each bad file named); 2: not a COVID-QU-Ex tree.",
    )
    inspection.add_arguments(p)
    p.set_defaults(func=inspection.run)
    p = sub.add_parser(
        "pack",
        help="decode and resize a tree once into the packed cache (data.cache=packed)",
        description="Decode and resize every split of each subset once into memory-mapped arrays "
        "under the cache folder, as data.cache=packed reads them. Exit 0: packed (or already "
        "up to date); 1: files that could not be packed (each named); 2: not a COVID-QU-Ex tree.",
    )
    packed.add_arguments(p)
    p.set_defaults(func=packed.run)
    p = sub.add_parser(
        "duplicates",
        help="list near-duplicate images (perceptual hash) split by split",
        description="Hash every image of both subsets (cached under the cache folder) and list "
        "the pairs within --max-distance bits: within a split, across splits, across subsets. "
        "Exit 0: no pair straddles Train (or Val) and Test; 1: some do (each named); 2: not a "
        "COVID-QU-Ex tree, an unreadable file, or a bad option.",
    )
    duplicates.add_arguments(p)
    p.set_defaults(func=duplicates.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
