"""``lrkern`` command line: one subcommand per method (``lrkern kvlinc calibrate|eval|demo``)."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lrkern", description="lrkern method layers")
    methods = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    from lrkern.kvlinc.cli import add_commands as kvlinc_commands
    kvlinc_commands(methods.add_parser("kvlinc", help="2-bit KV cache with linear correction (KVLinC)"))
    args = parser.parse_args(argv)
    return args.run(args) or 0
