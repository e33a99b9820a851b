"""``ovseg-ray <command>``: every module in this package that defines ``register`` adds a command."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from pydantic import ValidationError

from ..config import ConfigError, format_validation_error

# Errors that are the user's input, not a bug: printed as one clear message, exit status 2.
USER_ERRORS = (ConfigError, FileNotFoundError, IsADirectoryError, ValueError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ovseg-ray",
        description="Open-vocabulary semantic segmentation with mask-adapted CLIP (OVSeg), on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        if hasattr(module, "register"):
            module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ovseg_ray").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        result = args.func(args)
    except ValidationError as exc:
        print(f"error: {format_validation_error(exc)}", file=sys.stderr)
        return 2
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
