"""The ``sdxl-control`` command: one module per subcommand, each translating its flags into the one request path
(:mod:`sdxl_control.jobs.spec`) and running it. The model policy (what jobs name, or the tiny stand-ins of ``--tiny``)
is chosen here once per process and handed to the subcommand.

Example:
    >>> from sdxl_control.cli import main
    >>> main(["generate", "a red fox", "--tiny", "--size", "64x64", "--steps", "2", "-o", "fox.png"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

# Only light modules at the top: an argument error or --help answers before torch and diffusers load (seconds).
from ..base.errors import EXIT_INTERRUPTED, DeviceError, SdxlControlError
from ..jobs.resolvers import Resolver, resolver_for
from ..weights.model_folders import ModelFolders
from . import batch, generate, models, preprocess, presets, score, serve, ui
from .options import check_inputs

__all__ = ["main", "build_parser"]

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it

_COMMANDS: dict[str, Callable[[argparse.Namespace, Resolver], int]] = {
    "generate": generate.run,
    "preprocess": preprocess.run,
    "score": score.run,
    "presets": presets.run,
    "models": models.run,
    "serve": serve.run,
    "ui": ui.run,
    "batch": batch.run,
}


class _Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for a mistyped flag or choice, which Python 3.11's argparse does not give (3.14
    adds it); its subcommands' parsers are of this class too (``add_subparsers`` makes them of the parser's class)."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # argparse reports these from the top parser, which knows none of the subcommand's flags
            command = self._command_parser(parsed)
            hints = [h for h in (_nearest(e.split("=")[0], _flags(command)) for e in extras if e.startswith("--")) if h]
            (command or self).error(
                f"unrecognized arguments: {' '.join(extras)}{f' (did you mean {hints[0]}?)' if hints else ''}"
            )
        return parsed

    def error(self, message: str) -> NoReturn:
        choice = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice is not None and (hint := _nearest(choice[2], re.findall(r"'([^']*)'", choice[3]))):
            message = f"{message} (did you mean {hint!r}?)"
        super().error(message)

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser | None:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                found = action.choices.get(str(getattr(parsed, action.dest, "")))
                return found if isinstance(found, argparse.ArgumentParser) else None
        return None


def _flags(parser: argparse.ArgumentParser | None) -> list[str]:
    return [f for a in (parser._actions if parser else []) for f in a.option_strings if f.startswith("--")]


def _nearest(word: str, candidates: list[str]) -> str | None:
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error, not only its message",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the libraries' own progress bars and notes while models load",
    )
    common.add_argument(
        "--models-dir",
        action="append",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="a ComfyUI or A1111 install (or its models folder, or a folder with extra_model_paths.yaml) whose models "
        "are found by name: --base juggernautXL_v9, --lora add-detail-xl (repeatable; also SDXL_CONTROL_MODELS_DIR)",
    )
    parser = _Parser(
        prog="sdxl-control",
        description="Controllable SDXL generation.",
        epilog="exit codes: 0 done, 1 unexpected failure (a bug: --debug shows it), 2 bad option or request, "
        "3 unreadable or missing input file, 4 model missing or unusable, 5 no usable face in a photo, "
        "6 output cannot be written, 7 device unavailable or out of memory, 130 interrupted",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (generate, preprocess, ui, serve, batch, presets, models, score):
        module.add_parser(sub, common)
    return parser


def _out_of_memory(exc: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError, and the CPU allocator's RuntimeError, without importing torch to ask.
    return (
        isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(exc)
    )


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    sys.stderr.write(f"sdxl-control: error: {message}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sdxl-control`` command; returns its exit code (see ``sdxl-control --help``)."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_inputs(args)
        folders = ModelFolders.of(getattr(args, "models_dir", []))
        return _COMMANDS[args.command](args, resolver_for(getattr(args, "tiny", False), folders))
    except KeyboardInterrupt:
        main_thread = threading.current_thread() is threading.main_thread()
        # A second Ctrl-C changes nothing: the process ends with 130 (an in-process caller, who passed argv, gets its
        # handler back).
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
        try:
            return _fail("interrupted (images not finished were not written)", EXIT_INTERRUPTED, debug)
        finally:
            if previous is not None and argv is not None:
                signal.signal(signal.SIGINT, previous)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python would report the failed flush at exit otherwise
        return EXIT_BROKEN_PIPE
    except SdxlControlError as exc:
        return _fail(str(exc), exc.exit_code, debug)
    except Exception as exc:
        if _out_of_memory(exc):
            hint = "try a smaller --size, fewer --num-images, --offload or --vae-tiling"
            what = (str(exc) or type(exc).__name__).splitlines()[0][:200]
            return _fail(f"out of memory ({what}): {hint}", DeviceError.exit_code, debug)
        if debug:
            raise
        return _fail(
            f"unexpected {type(exc).__name__}: {exc}. This is a bug in sdxl-control or a library it uses: run again "
            "with --debug for the traceback, and report it",
            1,
            debug,
        )
