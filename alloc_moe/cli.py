"""`alloc-moe` command line: the parser and error handling. Each subcommand lives next to its implementation in a
module that exposes `register_cli(subparsers)` (listed in `_command_modules`)."""

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


def _command_modules():
    """Subcommands that live next to their implementation (imported lazily: they pull in transformers)."""
    import importlib

    for name in ("plan_cli", "zoo", "synthetic", "train", "tasks.embedded", "profiling", "evaluate", "accuracy",
                 "latency", "load_balance", "regress", "download", "stage"):
        try:
            mod = importlib.import_module(f"alloc_moe.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"alloc_moe.{name}":
                raise
            continue
        yield mod.register_cli


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
