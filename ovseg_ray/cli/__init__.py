"""``ovseg-ray <command>``: every module in this package that defines ``register`` adds a command."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Callable

from pydantic import ValidationError

from ..config import ConfigError, format_validation_error
from ..data import storage
from ..data.storage import StorageUnreachableError

# Errors that are the user's input, not a bug: printed as one clear message, exit status 2.
USER_ERRORS = (ConfigError, FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError, PermissionError,
               StorageUnreachableError)


def _user_message(exc: BaseException) -> str:
    """The message of a user error, also when it comes wrapped in a Ray task error."""
    cause = getattr(exc, "cause", None)
    if type(exc).__name__.startswith("RayTaskError") and isinstance(cause, BaseException):
        return str(cause)
    return str(exc)


def report_errors(run: Callable[[], int | None], verbose: bool = False) -> int:
    """Run a command; a bad input (a config, a file, an unreachable store) becomes one ``error:`` line
    and exit status 2 instead of a traceback. ``jobs/`` entry points share it."""
    try:
        return int(run() or 0)
    except ValidationError as exc:
        print(f"error: {format_validation_error(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        unreachable = storage.unreachable_error(exc)
        if verbose or (unreachable is None and not isinstance(exc, USER_ERRORS)):
            raise
        print(f"error: {unreachable or _user_message(exc)}", file=sys.stderr)
        return 2


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
    return report_errors(lambda: args.func(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
