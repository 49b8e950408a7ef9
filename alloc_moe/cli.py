"""`alloc-moe` command line: the parser and error handling. Each subcommand lives next to its implementation in a
module that exposes `register_cli(subparsers)` (listed in `COMMAND_MODULES`)."""

import argparse
import sys

from .errors import AllocMoeError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (what is wrong, where to look) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = OneLineParser(prog="alloc-moe", description="Budget-aware expert activation allocation for MoE inference.")
    parser.add_argument("--version", action="version", version=f"alloc-moe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for register in _command_modules():
        register(sub)
    return parser


# The modules that define subcommands (`register_cli(subparsers)`), imported when the parser is built. Adding a
# subcommand is one entry here. A module that fails to import is an error, never a silently missing command.
COMMAND_MODULES = ("stages.plan", "data.zoo", "data.twin", "data.synthetic", "data.train", "data.tasks.embedded", "stages.profile",
                   "stages.ppl", "stages.routing_scores", "stages.accuracy", "stages.latency", "stages.load_balance",
                   "harness.regress", "data.download", "data.stage")


def _command_modules():
    """Subcommands that live next to their implementation (imported here, lazily: they pull in transformers)."""
    import importlib

    for name in COMMAND_MODULES:
        yield importlib.import_module(f"alloc_moe.{name}").register_cli


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args) or 0
    except AllocMoeError as e:
        print(f"alloc-moe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alloc-moe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
