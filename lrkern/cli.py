"""``lrkern`` command line: one subcommand per method (``lrkern kvlinc calibrate|eval|demo``,
``lrkern lance demo|calibrate``, ``lrkern video demo|data|train``)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lrkern", description="lrkern method layers")
    methods = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    from lrkern.kvlinc.cli import add_commands as kvlinc_commands
    kvlinc_commands(methods.add_parser("kvlinc", help="2-bit KV cache with linear correction (KVLinC)"))
    from lrkern.lance.cli import add_commands as lance_commands
    lance_commands(methods.add_parser("lance", help="low-rank activation compression for fine-tuning (LANCE)"))
    from lrkern.spiking.cli import add_commands as video_commands
    video_commands(methods.add_parser("video", help="compressed-domain video recognition with spiking temporal "
                                                    "modulators (STM)"))
    args = parser.parse_args(argv)
    args.cli_argv = list(argv) if argv is not None else sys.argv[1:]  # recorded in artefacts (how they were made)
    return args.run(args) or 0
