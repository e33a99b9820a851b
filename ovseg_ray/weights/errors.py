"""Errors of reading and loading checkpoints; messages name the file and the keys."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says which keys."""


class CheckpointMismatchError(CheckpointError):
    def __init__(self, source: str, missing: list[str], unexpected: list[str], mismatched: list[str],
                 hint: str = ""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched

        def show(title: str, keys: list[str]) -> str:
            head = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
            return f"\n  {title} ({len(keys)}): {head}" if keys else ""

        super().__init__(
            f"checkpoint {source} does not fit the model:"
            + show("missing keys", missing)
            + show("unexpected keys", unexpected)
            + show("shape mismatches", mismatched)
            + (f"\n  {hint}" if hint else "")
        )
