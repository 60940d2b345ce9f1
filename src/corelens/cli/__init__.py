"""The ``corelens`` command line: one module per command (``add`` its parser, ``run`` it)."""

from __future__ import annotations

import argparse
import os
import sys

from corelens.cli import ablate, accelerate, circuit, demo, families, patch, report, score, zoo

COMMANDS = (demo, report, patch, circuit, accelerate, score, ablate, families, zoo)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="corelens",
                                description="corelens: TransformerLens for multimodal LLMs")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
