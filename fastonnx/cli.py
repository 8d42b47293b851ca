"""The ``fastonnx`` command line: one sub-command per module in ``fastonnx.commands``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
import traceback

# Sub-command name -> module (each exposes ``add_parser(subparsers)``, which sets ``func``).
_COMMANDS = {
    "info": "fastonnx.commands.info",
    "optimize": "fastonnx.commands.optimize",
    "bench": "fastonnx.commands.bench",
    "compress": "fastonnx.commands.compress",
    "package": "fastonnx.commands.package",
    "serve": "fastonnx.commands.serve",
    "triton-repo": "fastonnx.commands.triton_repo",
    "loadtest": "fastonnx.commands.loadtest",
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


# Exit statuses shared by every sub-command: 0 done, 2 bad input or options (one line on
# stderr), 3 an internal error (a traceback); 1 and others are each command's own.
EXIT_INTERNAL_ERROR = 3


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so every ``finally`` (temporary files) runs."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_unwinds():
    # Python's default SIGTERM ends the process at once, skipping clean-up; only the main thread
    # may install a handler (main() called from a worker thread keeps the default).
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _sigterm_unwinds():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception:  # noqa: BLE001 - a bug, not bad input: keep exit 1 and 2 meaningful
        traceback.print_exc()
        print(
            f"fastonnx {args.command}: internal error (a bug in fastonnx; please report it "
            "with the traceback above)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
