"""What every command line of the package shares: one-paragraph errors and flag parsing."""

from __future__ import annotations

import sys
from typing import NoReturn

from absl import flags

EXIT_USAGE = 2  # absl's code for a usage error: fix the named flag or file


def fail(message: str, exit_code: int = EXIT_USAGE) -> NoReturn:
    """Prints a one-paragraph error (no traceback) and exits with `exit_code`."""
    sys.stderr.write(f"error: {message}\n")
    sys.exit(exit_code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing for app.run, with a one-paragraph error instead of the usage dump."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e}. Run with --helpshort for the flags.")
