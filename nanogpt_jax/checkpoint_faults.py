"""How checkpoints fail, noticed early and said in one line: the faults `checkpoint.Checkpointer` handles.

- `first_line`: an orbax / tensorstore error (pages long, wrapped) as `TypeName: first line` of its root cause.
- `BackgroundSaveFailures`: orbax reports a save that failed in its background thread only in a log
  record; this filter on absl's logger notes it per folder, for `Checkpointer.check` to raise.
- `write_problem` / `check_writable`: the write probe (process 0 writes a file, the verdict is
  broadcast), so an unwritable folder fails at start-up or before a save, not inside orbax's thread.
- `unreadable_metrics`: the step folder whose metrics file a full disk cut short (named in the error).
- `collect_abandoned_reads`: quiets the read tasks orbax abandons when a restore fails, which would
  otherwise print tracebacks under our one-line error.

Nothing here knows the checkpointer or orbax's API: checkpoint.py imports this module, never the reverse.
"""

from __future__ import annotations

import gc
import json
import logging as pylogging
import os
import re
import sys
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from nanogpt_jax.errors import CheckpointError


def first_line(e: BaseException, limit: int = 160) -> str:
    """`TypeName: first line of the message` of the root cause, shortened: orbax errors run to pages."""
    while e.__cause__ is not None:  # orbax wraps tensorstore's precise error in a vaguer one
        e = e.__cause__
    text = " ".join(str(e).split("\n", 1)[0].split(" See full TensorStore details")[0].split()) or type(e).__name__
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}"


class BackgroundSaveFailures(pylogging.Filter):
    """orbax reports a save that failed in its background thread (a rename refused, a full disk, a
    bucket error) only by logging it with its traceback; with several processes the save then never
    finishes, and waiting for it blocks every process. This filter, on absl's logger, notes the
    failure for the checkpointer of that folder (`Checkpointer.check` raises it in the training loop
    at the next step) and turns orbax's error records that carry a traceback into debug ones: the
    traceback is in the debug log (--verbosity=1), not on the console, where our one line says what
    happened."""

    failures: dict[str, str] = {}  # the folder orbax names (a step's) -> the first failure's line

    def filter(self, record: pylogging.LogRecord) -> bool:
        if "/orbax/" in record.pathname and record.levelno >= pylogging.ERROR and record.exc_info:
            message = str(record.getMessage())
            if "background" in message:
                folder = re.search(r"directory: (\S+)", message)
                error = record.exc_info[1]
                self.failures.setdefault(folder.group(1).rstrip("/") if folder else "",
                                         first_line(error) if error is not None else message[:160])
            record.levelno, record.levelname = pylogging.DEBUG, "DEBUG"
        return True

    @classmethod
    def install(cls) -> None:
        logger = pylogging.getLogger("absl")
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())

    @classmethod
    def _keys(cls, folder: str) -> list[str]:
        return [k for k in cls.failures if k in ("", folder) or k.startswith(folder + "/")]

    @classmethod
    def pending(cls, folder: str) -> bool:
        return bool(cls._keys(folder))

    @classmethod
    def take(cls, folder: str) -> str | None:
        """The failure noted for a save into `folder` (a checkpoints folder), or None; forgets it."""
        found = [cls.failures.pop(k) for k in cls._keys(folder)]
        return found[0] if found else None


def collect_abandoned_reads() -> None:
    """Quiet the read tasks orbax leaves behind when one array of a restore fails.

    Otherwise each prints a traceback ("Task exception was never retrieved", "Exception ignored
    in <coroutine ...>") whenever it is garbage-collected, typically at exit under our one-line
    error; reads still in flight in tensorstore's threads later find orbax's event loop closed
    and print "RuntimeError: Event loop is closed". Only those three are silenced (kept at -v 1).
    """
    asyncio_logger = pylogging.getLogger("asyncio")
    disabled, hook = asyncio_logger.disabled, sys.unraisablehook
    asyncio_logger.disabled = True
    sys.unraisablehook = _quiet_unraisable
    try:
        gc.collect()
    finally:
        asyncio_logger.disabled = disabled
        sys.unraisablehook = hook
    if not getattr(sys.unraisablehook, "_drops_closed_loop", False):
        sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


def _quiet_unraisable(unraisable: Any) -> None:
    logging.vlog(1, "after a failed restore: %r", unraisable.exc_value)


def _drop_closed_loop_callbacks(previous: Any) -> Any:
    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            _quiet_unraisable(unraisable)
        else:
            previous(unraisable)

    hook._drops_closed_loop = True
    return hook


def unreadable_metrics(path: epath.Path) -> str | None:
    """The name of the first step folder whose orbax metrics file is not valid JSON (for the error)."""
    try:
        for step_dir in sorted((p for p in path.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
            metrics = step_dir / "metrics" / "metrics"
            if metrics.exists():
                try:
                    json.loads(metrics.read_text())
                except ValueError:
                    return step_dir.name
    except OSError:
        pass
    return None


def write_problem(path: epath.Path) -> str | None:
    """Why `path` cannot take files now (None: it can), as process 0 finds it; with several
    processes its verdict is broadcast, so every process gets the same answer.

    Process 0 creates the folder and a probe file (the only file the checkpointer writes outside orbax).
    """
    problem = None
    if jax.process_index() == 0:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write_probe.{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except Exception as e:  # OSError locally; gcsfs / epath raise their own types
            problem = first_line(e)
    if jax.process_count() > 1:
        ok = multihost_utils.broadcast_one_to_all(np.int32(problem is None))
        problem = problem or (None if int(ok) else "process 0 could not write there")
    return problem


def check_writable(path: epath.Path, shown: str) -> None:
    """Fail now, not at the first save hours in, if `path` cannot hold checkpoints."""
    problem = write_problem(path)
    if problem:
        raise CheckpointError(f"cannot write checkpoints to {shown} ({problem}); set out_dir to a writable folder")
