"""What the entry points share: flag parsing helpers and the one-line error contract.

Bad input (a missing file, an unknown config key, a wrong resolution, ...) gets one clear line
on stderr and a non-zero exit, never a bare traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from microforge_jax.config import ConfigError


class UserError(Exception):
    """An error caused by the user's input; its message is one line meant for them."""


USER_ERRORS = (UserError, ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError)


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Runs `main(argv)`; user errors become `error: ...` on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        import absl.logging  # noqa: PLC0415 (Orbax logs routine warnings through absl)

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
