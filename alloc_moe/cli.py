"""`alloc-moe` command line: the parser and error handling. Each subcommand lives next to its implementation in a
module that exposes `register_cli(subparsers)` (listed in `COMMANDS`)."""

import argparse
import sys

from .errors import AllocMoeError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (what is wrong, where to look) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `command` (a key of `COMMANDS`) only that subcommand's module imported and registered:
    a workflow job runs one subcommand, and the other modules' imports (torch for most) would cost it about a second."""
    from . import __version__

    parser = OneLineParser(prog="alloc-moe", description="Budget-aware expert activation allocation for MoE inference.")
    parser.add_argument("--version", action="version", version=f"alloc-moe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for register in _command_modules([COMMANDS[command]] if command in COMMANDS else None):
        register(sub)
    return parser


# Every subcommand and the module that defines it (`register_cli(subparsers)`, next to its implementation). Adding a
# subcommand is one entry here (tests/core/test_plan_cli.py checks the table against what the modules register). A
# module that fails to import is an error, never a silently missing command.
COMMANDS = {
    "plan": "stages.plan", "show": "stages.plan", "make-model": "data.zoo", "make-twin": "data.twin",
    "make-corpus": "data.synthetic", "train": "data.train", "make-tasks": "data.tasks.embedded",
    "profile": "stages.profile", "ppl": "stages.ppl", "routing": "stages.routing_scores", "eval": "stages.accuracy",
    "latency": "stages.latency", "load-balance": "stages.load_balance", "regress": "harness.regress",
    "download": "data.download", "stage": "data.stage",
}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))  # each module once, in the order of `COMMANDS`


def _command_modules(names=None):
    """`register_cli` of the named command modules (all by default), imported here, lazily: most pull in torch."""
    import importlib

    for name in names or COMMAND_MODULES:
        yield importlib.import_module(f"alloc_moe.{name}").register_cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)  # a known command first: only its module is imported
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
