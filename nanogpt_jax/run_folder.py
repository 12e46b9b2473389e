"""A run's folder (out_dir): may this run use it, and can it write there.

A folder holds a run when it has checkpoints/ or any of RUN_FILES. A new run (init_from scratch or
GPT-2 weights) goes only into a folder that holds none, so nothing of another run is mixed in or
overwritten; init_from=resume needs a complete checkpoint there. Everything here reads before the
run writes anything: `check` and `check_writable` create nothing, `prepare` creates the folder once
the first step has run. The trainer (nanogpt_jax/train.py) holds the folder's lock (`runlock`) around
them and checks again under the lock.
"""

from __future__ import annotations

import os
from pathlib import Path

from nanogpt_jax import loggers, storage
from nanogpt_jax.checkpoint import Checkpointer, checkpoint_dir
from nanogpt_jax.errors import CheckpointError, UserError


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(out_dir: str | os.PathLike) -> None:
    """Raise UserError unless out_dir exists as a writable folder or could be created (a URL: its bucket
    exists and this machine's credentials can list it); creates nothing."""
    if storage.is_url(out_dir):
        storage.check_bucket(out_dir, "out_dir")
        return
    path = Path(out_dir).absolute()
    base = _nearest_existing(path)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        why = "is not a folder" if not base.is_dir() else "is not writable"
        raise UserError(f"out_dir={str(out_dir)!r} is not writable ({base} {why}); choose another --config.out_dir")


def prepare(out_dir: str | os.PathLike) -> Path:
    """Create out_dir (on process 0) and check it is writable; called once the first step has run."""
    path = storage.path(out_dir)
    if storage.is_url(out_dir):  # a bucket has no folders to create: a probe object shows we can write
        probe = path / f".write-test-{os.getpid()}"
        try:
            probe.write_text("")
            probe.unlink()
        except Exception as e:  # noqa: BLE001 - gcsfs / google-auth errors
            raise storage.explain(e, out_dir, "write to") from None
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"out_dir={str(path)!r} is not writable ({e.strerror}); choose another "
                        "--config.out_dir") from None
    return path


# What a run leaves in out_dir besides checkpoints/: a folder holding any of them holds a run.
RUN_FILES = (loggers.CSV_NAME, loggers.TB_DIR, "summary.json", "loss.png")


def check(out_dir: str, init_from: str, max_iters: int, eval_only: bool = False) -> int | None:
    """Decide, before anything is written, whether a run may use out_dir (init_from, train.max_iters and
    train.eval_only as in the config).

    Returns the step to resume from (init_from=resume) or None (a new run into an empty or new
    folder). Reads only: no folder or file is created.

    Raises:
        CheckpointError: init_from=resume and out_dir has no checkpoint.
        UserError: a gs:// out_dir whose bucket does not exist or cannot be read (credentials);
            a new run (init_from scratch or pretrained weights) into a folder that holds a
            run (checkpoints or logs): its files would be mixed with or replaced by the new run's;
            or a folder with the logs of a run that never saved a checkpoint (killed early).
        NothingToTrain: init_from=resume and the latest checkpoint is at or past train.max_iters
            (and train.eval_only is off).
    """
    if storage.is_url(out_dir):  # no bucket or no credentials: said first, in one line
        storage.check_bucket(out_dir, "out_dir")
    out = storage.path(out_dir)
    ckpt_dir = checkpoint_dir(out)
    steps = saved_steps(ckpt_dir)
    logs = [name for name in RUN_FILES if (out / name).exists()]
    if logs and not steps:  # a run stopped (killed) before its first checkpoint: nothing to resume, logs to keep
        raise UserError(
            f"out_dir {str(out)!r} holds the logs of a run that saved no checkpoint ({', '.join(logs)}); "
            f"it cannot be resumed: delete the folder (rm -r {out}) to start it again, or choose a new "
            "--config.out_dir")
    if init_from == "resume":
        if not steps:
            raise CheckpointError(f"init_from=resume: no checkpoint in {ckpt_dir}; train first or set "
                                  "--config.init_from=scratch")
        if steps[-1] >= max_iters and not eval_only:
            raise NothingToTrain(out, steps[-1], max_iters)
        return steps[-1]
    held = [f"checkpoint step {steps[-1]}"] if steps else []
    held += logs
    if held:
        raise UserError(
            f"out_dir {str(out)!r} already holds a run ({', '.join(held)}); continue it with "
            "--config.init_from=resume, or start a new run with a new --config.out_dir")
    return None


def saved_steps(ckpt_dir: storage.AnyPath) -> list[int]:
    """The complete checkpoints' steps, as orbax finds them: on a bucket a step folder exists while it is
    being written (objects cannot be renamed into place), so the folder names alone are not enough."""
    if not ckpt_dir.is_dir():
        return []
    with Checkpointer(ckpt_dir, read_only=True) as ckpt:
        return ckpt.all_steps()


class NothingToTrain(Exception):
    """init_from=resume found a checkpoint at or past max_iters: nothing to do, nothing to write."""

    def __init__(self, out_dir: storage.AnyPath, step: int, max_iters: int):
        super().__init__(f"nothing left to train: {out_dir} is at step {step} (train.max_iters={max_iters})")
        self.out_dir, self.step, self.max_iters = out_dir, step, max_iters
