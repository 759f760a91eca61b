"""Command line: ``python -m pymem info | demo | inspect | convert``."""

from __future__ import annotations

import argparse
import sys

import pymem
from pymem.runtime.convert import add_convert_parser
from pymem.runtime.demo import add_demo_parser
from pymem.runtime.inspect import add_inspect_parser


def _info(_: argparse.Namespace) -> int:
    info = pymem.ggml_info()
    print(f"pymem {pymem.__version__}")
    print(f"ggml {info.version} ({info.commit}) bound from {info.source}: {info.path}")
    print(f"backends: {', '.join(info.backends)}")
    for dev in pymem.devices():
        free, total = dev.memory()
        print(
            f"device {dev.name:8s} {dev.kind:5s} {dev.description} "
            f"({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pymem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which ggml pymem bound and which devices it sees").set_defaults(
        func=_info
    )
    add_demo_parser(sub)
    add_inspect_parser(sub)
    add_convert_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
