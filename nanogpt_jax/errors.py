"""The exception users see as a one-line message.

Library code raises `UserError` (or a subclass) for problems the user can fix: a bad config value,
a missing file, a checkpoint that does not fit. The `run_*.py` entry points print its message on
one line and exit with status 1, without a traceback (see `nanogpt_jax.cli`). Anything else is a
bug and keeps its traceback.

Every `UserError` is also a `ValueError` (a bad value was passed in), so a program that calls the
library catches them the usual way: `except ValueError` catches an unknown character in a prompt
(`DataError`) as it catches a bad config value (`ConfigError`).
"""

import contextlib
from collections.abc import Iterator
from typing import NoReturn


class UserError(ValueError):
    """A problem with the user's input; the message names the problem and the fix."""


class ConfigError(UserError):
    """An unknown, mistyped or impossible config value; the message starts with the key."""


class DataError(UserError):
    """A missing, damaged or mismatched dataset file."""


class CheckpointError(UserError):
    """A missing, truncated or incompatible checkpoint or weights file."""


class OutOfMemoryError(UserError):
    """XLA ran out of device memory (RESOURCE_EXHAUSTED) compiling or running a step."""


@contextlib.contextmanager
def out_of_memory_is_a_user_error(advice: str) -> Iterator[None]:
    """Turn XLA's RESOURCE_EXHAUSTED (a TPU at compile time, a GPU or CPU at the first step) into
    `OutOfMemoryError("out of device memory (<XLA's first line>); <advice>")`: a shape too large for
    the device is bad input, not a bug. Other runtime errors pass through unchanged."""
    import jax

    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        first = " ".join(str(e).split("\n", 1)[0].split())[:200]
        raise OutOfMemoryError(f"out of device memory ({first}); {advice}") from None


def fail(message: str) -> NoReturn:
    """Print `error: message` on one line to stderr and exit with status 1 (no traceback)."""
    import sys

    sys.stderr.write("error: " + " ".join(str(message).split()) + "\n")
    sys.stderr.flush()
    raise SystemExit(1)
