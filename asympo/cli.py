"""Command line: `asympo train|sft|eval|study|serve|bench [--config FILE] [key=value ...]`.

Bad input of any kind (config, data, files) ends with one line on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import asympo.config
from asympo.commands import COMMANDS
from asympo.config import build_config
from asympo.config.reference import settings_help
from asympo.errors import UserError
from asympo.faults import Interrupted, RunAborted
from asympo.heap import keep_freed_memory
from asympo.lifetime import exit_with_launcher


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="asympo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (config_name, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=settings_help(getattr(asympo.config, config_name)),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", "-c", help="YAML config file, or a preset's name (asympo/configs/)")
        p.add_argument(
            "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4"
        )
    return parser.parse_args(argv)


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """Build the command's config, then hand it to its module (imported now: torch loads only here)."""
    config_class = getattr(asympo.config, COMMANDS[args.command][0])
    cfg = build_config(config_class, args.config, args.overrides)
    command = importlib.import_module(f"asympo.commands.{args.command}")
    if args.command == "train":
        command.run(cfg, argv[1:])  # the torchrun ranks are started with the same arguments
    elif args.command == "eval":
        print(json.dumps(command.run(cfg), indent=2))
    else:
        command.run(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    keep_freed_memory()
    exit_with_launcher()  # a process asympo started (a torchrun rank, a bench run) ends with its launcher
    try:
        run(args, argv)
    except UserError as e:
        print(f"asympo: error: {e}", file=sys.stderr)
        return 2
    except RunAborted as e:
        print(f"asympo: run stopped: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"asympo: interrupted by {e}", file=sys.stderr)
        return 143 if e.signal_name == "SIGTERM" else 130
    except KeyboardInterrupt:
        print("asympo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
