"""The ``perco`` command: ``perco <subcommand> ...`` (also ``python -m perco``).

Every subcommand is a module with ``add_arguments(parser)`` and ``run(args)``; ``main``
takes an argument list so tests call it directly. Bad input ends with a one-line error
and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import compress, decompress, demo, fit_prior, import_checkpoint

SUBCOMMANDS = {
    "compress": compress,
    "decompress": decompress,
    "demo": demo,
    "fit-prior": fit_prior,
    "import-checkpoint": import_checkpoint,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perco", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        return SUBCOMMANDS[args.command].run(args) or 0
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"perco {args.command}: error: {e}", file=sys.stderr)
        return 2
