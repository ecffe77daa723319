"""`mammals`: the command line.  A thin map onto the Python API: every subcommand calls one public function.

Subcommands are found through the entry-point group ``mammals.commands`` (see ``pyproject.toml``): each entry
names a :class:`Command`.  So this module, the bottom of the CLI, imports no package above it; `mammals train`
or `mammals dashboard` live with the code they drive and are loaded only when the parser is built.

Conventions: data goes to stdout (``--json`` where it is data), logs and progress to stderr; exit code 0 on
success, 1 when some inputs failed but the command ran, 2 for a usage or input error (one line, no traceback),
130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

from indexer import __version__
from indexer.errors import UsageError

log = logging.getLogger("mammals")

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
ENTRY_POINT_GROUP = "mammals.commands"
# The loggers of our own packages follow -q/-v; libraries (faiss announces its CPU features at INFO) only warn.
OWN_LOGGERS = ("mammals", "indexer", "analysis", "dashboard", "data")


@dataclass(frozen=True)
class Command:
    """One subcommand: its one-line help, a function that adds its options, and the function that runs it."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def commands() -> dict[str, Command]:
    """Every installed subcommand, in the order the entry points list them."""
    found: dict[str, Command] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cmd = ep.load()
        if not isinstance(cmd, Command) or cmd.name != ep.name:
            raise TypeError(f"entry point {ep.name} = {ep.value} is not a Command named {ep.name!r}")
        found.setdefault(ep.name, cmd)  # the first distribution wins (an editable install listed twice)
    return found


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser(cmds: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    cmds = commands() if cmds is None else cmds
    parser = argparse.ArgumentParser(prog="mammals", description="Mammals Space: embeddings and similarity search "
                                     "for cat and dog photos.")
    parser.add_argument("--version", action="version", version=f"mammals-space {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in cmds.items():
        sp = sub.add_parser(name, help=cmd.help, description=cmd.help)
        add_common_options(sp)
        cmd.configure(sp)
    return parser


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="mammals: %(levelname)s: %(message)s",
                        force=True)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that are the user's to fix: printed as one line with exit code 2 (bugs stay tracebacks).

    Each package's errors derive from :class:`UsageError`, or are listed here (imported when a command fails,
    so that `mammals --help` does not import the store or the encoders)."""
    from indexer.encoders import EncoderError
    from indexer.sources import SourceError
    from indexer.store import StoreError

    return UsageError, SourceError, StoreError, EncoderError


def run_main(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
             argv: Sequence[str] | None = None) -> int:
    """The one ``main()`` of every command line here: parse, set up logging, run, and map errors to exit codes.

    ``run`` returns the exit code; user errors print ``PROG: error: …`` (one line, exit 2), Ctrl-C exits 130
    and a closed stdout (``… | head``) is not an error."""
    a = parser.parse_args(argv)
    setup_logging(getattr(a, "quiet", False), getattr(a, "verbose", False))
    where = f"{prog} {a.command}" if getattr(a, "command", None) else prog
    try:
        return run(a)
    except user_errors() as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{where}: interrupted (the store keeps its last commit; run again to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early: point it at devnull so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    cmds = commands()
    return run_main("mammals", build_parser(cmds), lambda a: cmds[a.command].run(a), argv)


if __name__ == "__main__":
    # `python -m indexer.cli`: run the imported module's main, whose Command class is the one the entry points
    # import (this __main__ copy has its own class, and isinstance would refuse every command).
    from indexer.cli import main as _main

    sys.exit(_main())
