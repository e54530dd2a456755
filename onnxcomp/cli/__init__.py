"""`onnxcomp <verb>`: each verb lives in its own module with `add_parser(subparsers)` and `run(args)`.

Exit codes: 0 ok, 1 validation failed, 2 bad usage or input, 3 internal error, 130 interrupted
(SIGINT), 143 terminated (SIGTERM); an interrupted run leaves no output or temporary file. Errors are one line
on stderr (set ONNXCOMP_TRACEBACK=1 to see the traceback of an internal error).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from onnxcomp.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, OnnxcompError, first_line

VERBS = ["optimize", "search", "passes", "zoo", "validate", "sensitivity", "bench", "inspect", "profile", "pack",
         "unpack"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 with usage; keep it to one line
        print(f"onnxcomp: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    from onnxcomp import __version__

    parser = _Parser(prog="onnxcomp", description="Compress CNNs at the ONNX level, validated in onnxruntime.")
    parser.add_argument("--version", action="version", version=f"onnxcomp {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for verb in VERBS:
        try:
            mod = importlib.import_module(f"onnxcomp.cli.{verb}_cmd")
        except ModuleNotFoundError as exc:
            if exc.name != f"onnxcomp.cli.{verb}_cmd":
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    previous = _on_sigterm_raise()
    try:
        return int(args.func(args) or 0)
    except Terminated:
        print("onnxcomp: terminated", file=sys.stderr)
        return 143
    except OnnxcompError as exc:
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # always one line
        print(f"onnxcomp: {type(exc).__name__ if exc.exit_code == EXIT_INTERNAL else 'error'}: {text}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxcomp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `onnxcomp passes --json | head`: the reader left; end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except MemoryError:
        print("onnxcomp: internal error: out of memory", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as exc:  # an internal error: one line unless asked for the traceback
        if os.environ.get("ONNXCOMP_TRACEBACK"):
            raise
        print(f"onnxcomp: internal error: {type(exc).__name__}: {first_line(exc, 300)} (ONNXCOMP_TRACEBACK=1 for details)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt, so every `finally` and temp-file cleanup
    runs (outputs are written to a temp file and renamed; an interrupted write leaves nothing)."""


def _on_sigterm_raise():
    """Turn SIGTERM into Terminated in the main thread; returns the previous handler (None when
    signals cannot be set here, e.g. from a worker thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def run() -> None:
    sys.exit(main())
