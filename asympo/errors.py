"""One exception type for bad user input, so the CLI can turn it into a one-line error with exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad config, data, files or network: the message names the problem; no traceback is shown."""
