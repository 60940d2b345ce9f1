"""``corelens families``: the supported model families and their HF classes."""

from __future__ import annotations

import argparse

from corelens.families import FAMILIES


def add(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("families", help="list supported model families").set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name, fam in sorted(FAMILIES.items()):
        print(f"{name:20s} {', '.join(fam.hf_architectures)}")
    return 0
