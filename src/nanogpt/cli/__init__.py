"""Console entry points: thin Hydra wrappers that turn a config into a library call."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from nanogpt.errors import NanoGPTError


def report_user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a NanoGPTError into one line on stderr and exit status 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NanoGPTError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
