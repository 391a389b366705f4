"""What every command of the tool shares: its parser and its one error boundary.

    def build_parser() -> argparse.ArgumentParser:
        parser = cli.Parser(prog="predict.py", description=...)
        ...
    def main(argv=None) -> int:
        return cli.main(build_parser, run, argv, prog="predict.py")  # run(args) -> exit code
    if __name__ == "__main__":
        sys.exit(main())

A command's errors reach the user as one line on stderr and an exit code:

- 2: usage (a flag, a flag value or an input the user named is wrong; nothing was written);
- 1: failure (the command started and could not finish: a damaged file, a full disk);
- a command may define its own codes above 2 (predict: some inputs could not be read);
- 130: interrupted (Ctrl-C).

The traceback is printed only with ``--debug`` on the command line or ``CXR_LORA_DEBUG=1``
in the environment.
"""
from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import re
import shlex
import sys
import traceback
from typing import Any, Callable, Sequence

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "CXR_LORA_DEBUG"
# OS errors a user meets (a full disk, a read-only or missing folder, a file in the way):
# one line each, never a traceback.
USER_OS_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                  errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.EDQUOT, errno.ENAMETOOLONG,
                  errno.ELOOP)


class ToolError(Exception):
    """An error the user can act on: printed as one line; ``exit_code`` is the command's exit."""

    exit_code = EXIT_FAILURE


class UsageError(ToolError):
    """A flag, a flag value or a named input that cannot work (exit 2)."""

    exit_code = EXIT_USAGE


class Parser(argparse.ArgumentParser):
    """Whole flag names only (no abbreviations), errors in one line plus a pointer to --help,
    ``--debug`` (the error boundary's, `run`) listed last, and the exit codes as the epilog
    unless the command gives its own."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("epilog", "Exit codes: 0 done; 1 a failure (a damaged input, a full "
                                    "disk), nothing lost; 2 usage error, nothing written; 130 "
                                    "interrupted.")
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        add_debug_flag(self)
        return super().format_help()

    def parse_known_args(self, *args, **kwargs):  # type: ignore[override]
        add_debug_flag(self)
        return super().parse_known_args(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        # "argument --lr: -0.05 is not valid: ..." reads as "--lr -0.05 is not valid: ...".
        # Any other "argument --flag: message" reads as "--flag: message".
        message = re.sub(r"^argument (--\S+?)(?:/\S+)?: (.* is not valid)", r"\1 \2", message)
        message = re.sub(r"^argument (--\S+?)(?:/\S+)?: ", r"\1: ", message)
        if "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("LOCAL_RANK", "0") not in ("", "0"):
            self.exit(EXIT_USAGE)  # under torchrun: the same flags, so each machine's first process says it
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


# -- flag types: a value no run can use is refused while parsing, naming flag and value ----
def number(kind: type, rule: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` number for which ``ok(value)`` holds (NaN and infinity never do)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (isinstance(value, int) or math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"{value!r} is not valid: {rule}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = number(int, "must be positive", lambda v: v > 0)
NON_NEGATIVE_INT = number(int, "must be 0 or positive", lambda v: v >= 0)
POSITIVE = number(float, "must be positive", lambda v: v > 0)
NON_NEGATIVE = number(float, "must be 0 or positive", lambda v: v >= 0)
FRACTION = number(float, "must be in [0, 1)", lambda v: 0 <= v < 1)
PROBABILITY = number(float, "a probability must be in [0, 1]", lambda v: 0 <= v <= 1)
SEED_LIMIT = 2 ** 32  # numpy's seeds; derived per-epoch seeds stay within torch's 64 bits
SEED = number(int, "a seed must be in [0, 2^32)", lambda v: 0 <= v < SEED_LIMIT)


def device_name(text: str) -> str:
    """An argparse type: cpu, or cuda / cuda:N where CUDA is available."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not valid: expected cpu, cuda or cuda:N")
    if text != "cpu":
        import torch  # only for a CUDA device: the other commands start without torch
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available here (use --device cpu)")
    return text


def existing_file(text: str) -> str:
    """An argparse type: the path of a file ('' for none)."""
    if text and os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder: give the file in it (e.g. "
                                         "model.safetensors of a transformers folder)")
    if text and not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return text


def folder_path(text: str) -> str:
    """An argparse type: a folder, existing or to be made (not a file)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return text


def new_folder(text: str) -> str:
    """An argparse type: a folder to make (nothing may be there yet)."""
    if os.path.lexists(text):
        raise argparse.ArgumentTypeError(f"{text} already exists (name a new folder: nothing is "
                                         "written into an existing one)")
    return text


def folder_name(text: str) -> str:
    """An argparse type: one folder name (no path: the folder goes where the command puts it)."""
    if not text or text in (".", "..") or "/" in text or os.sep in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid: a folder name, not a path")
    return text


def describe(err: BaseException) -> str:
    """One line for an error: its message, with the file an OS error names."""
    if isinstance(err, OSError) and isinstance(err, ToolError) and err.strerror:
        return err.strerror  # the project's own line (util.io.OutputError)
    if isinstance(err, OSError) and not isinstance(err, ToolError):
        name = err.filename if err.filename is not None else ""
        what = err.strerror or str(err)
        if err.errno == errno.ENOSPC:
            what = "no space left on device"
        return f"{name}: {what}" if name else what
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split("\n")) if "\n" in text and len(text) < 400 else text


def exit_code_of(err: BaseException) -> int | None:
    """The exit code of an error the boundary reports in one line; None for a bug."""
    code = getattr(err, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(err, OSError) and (err.errno in USER_OS_ERRORS or getattr(err, "one_line", False)):
        return EXIT_FAILURE
    return None


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
        prog: str | None = None, interrupted: Callable[[], str] | None = None) -> int:
    """Call ``main(argv)`` inside the command's error boundary and return its exit code.

    ``interrupted``: called on Ctrl-C for the line that says how to continue (optional).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0]) or "command"
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        code = main([a for a in argv if a != "--debug"])  # the boundary's own switch
        return 0 if code is None else int(code)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        hint = interrupted() if interrupted is not None else ""
        print(f"{prog}: interrupted" + (f": {hint}" if hint else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001  (the boundary: user errors become one line)
        code = exit_code_of(err)
        if code is None:
            raise  # a bug: its traceback is what a report needs
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {describe(err)}", file=sys.stderr)
        summary = logging.getLogger("summary")
        if summary.handlers:  # a run's log file is open: it ends with why
            summary.error("error: %s", describe(err))
        return code


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """List the error boundary's ``--debug`` among the flags (once; `run` reads it)."""
    if "--debug" not in parser._option_string_actions:
        parser.add_argument("--debug", action="store_true",
                            help=f"print the traceback of an error (also {DEBUG_ENV}=1)")


def main(build_parser: Callable[[], argparse.ArgumentParser],
         command: Callable[[argparse.Namespace], int], argv: Sequence[str] | None = None, *,
         prog: str, logs: bool = True,
         check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None) -> int:
    """A command's ``main``: parse ``argv`` with the parser (plus ``--debug``, listed last in
    its --help), ``check(parser, args)`` what the flag types cannot, log to stderr when
    ``logs``, and ``command(args)``, all inside the error boundary (``run``)."""
    def parse_and_run(arguments: list[str]) -> int:
        parser = build_parser()
        add_debug_flag(parser)
        args = parser.parse_args(arguments)
        if check is not None:
            check(parser, args)
        if logs:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return command(args)

    return run(parse_and_run, argv, prog=prog)


def resume_command(prog: str, argv: Sequence[str]) -> str:
    """The command that continues an interrupted run: the same flags with --resume auto."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--resume", "--overwrite") or arg.startswith("--resume="):
            skip = arg == "--resume"
        else:
            kept.append(arg)
    return shlex.join(["python3", prog, *kept, "--resume", "auto"])


# --- a command's flag table ---------------------------------------------------------------
# The role each flag declares once: RUN flags make a run this run (compared by the run-folder
# check, by resume and by util.summarize); EXEC flags say where and how it executes; DERIVED
# flags enter the run's identity through a value derived from them (a file's SHA-256, the
# pixels a cache gives, the global batch, the lr).
RUN, EXEC, DERIVED = "run", "exec", "derived"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default once, and none for on/off switches (their help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or action.default is None or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class FlagTable:
    """Adds the flags of one group, each with its role (RUN unless said)."""

    def __init__(self, parser: argparse.ArgumentParser, title: str, role: str = RUN) -> None:
        self.group, self.role = parser.add_argument_group(title), role

    def one_of(self) -> "FlagTable":
        """The same group's table for flags of which a command gives one at most."""
        table = object.__new__(FlagTable)
        table.group, table.role = self.group.add_mutually_exclusive_group(), self.role
        return table

    def __call__(self, *names: str, role: str | None = None, recipe: bool = False,
                 **kwargs: Any) -> None:
        action = self.group.add_argument(*names, **kwargs)
        action.role = role or self.role  # type: ignore[attr-defined]
        action.recipe = recipe  # type: ignore[attr-defined]  (the method's own tuning)


def flag_roles(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each destination's role (RUN, EXEC or DERIVED), as the flag table declares it."""
    return {a.dest: a.role for a in parser._actions if hasattr(a, "role")}


def recipe_flags(parser: argparse.ArgumentParser) -> list[str]:
    """The flags a method is tuned by (its recipe), not the data or model it is tested on:
    util.summarize sets LoRA against full fine-tuning on runs that differ only in these."""
    return sorted(a.dest for a in parser._actions if getattr(a, "recipe", False))


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations of the flags written on the command line (so presets do not override them)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    return {a.dest for a in parser._actions if given & set(a.option_strings)}
