"""The ``fastonnx`` command line: one sub-command per module in ``fastonnx.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command name -> module (each exposes ``add_parser(subparsers)``, which sets ``func``).
_COMMANDS = {
    "info": "fastonnx.commands.info",
    "optimize": "fastonnx.commands.optimize",
    "bench": "fastonnx.commands.bench",
    "compress": "fastonnx.commands.compress",
}


def build_parser() -> argparse.ArgumentParser:
    from fastonnx import __version__

    parser = argparse.ArgumentParser(
        prog="fastonnx",
        description="Make transformer encoders exported to ONNX run fast on CPUs, in ONNX Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"fastonnx {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a sub-command not built yet
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
