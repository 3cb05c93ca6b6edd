"""The `splitserve` command line. Each subcommand lives in its own module under
``app/commands/`` exposing ``register(subparsers)``; this file only wires them up."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, imported lazily so `splitserve --help` stays fast and torch-free.
COMMANDS = {
    "make-model": "app.commands.make_model",
    "generate-offline": "app.commands.generate_offline",
    "simulate": "app.commands.simulate",
    "serve": "app.commands.serve",
    "demo": "app.commands.demo",
    "generate": "app.commands.generate",
    "bench": "app.commands.bench",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitserve", description="Disaggregated LLM serving: prefill and decode pools."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, module_name in COMMANDS.items():
        if wanted is not None and wanted != name:
            subparsers.add_parser(name)  # listed in help; only the chosen one is imported
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # command not built yet in this checkout
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.error(f"command {args.command!r} is not available in this build")
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: the command has stopped what it started
        print(f"splitserve {args.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it


if __name__ == "__main__":
    sys.exit(main())
