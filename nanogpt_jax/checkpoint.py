"""Checkpoints of a training run: a thin wrapper over orbax's `CheckpointManager`.

Layout (one folder per step, written by orbax):

    <directory>/<step>/state/     the train state PyTree (OCDBT + zarr arrays, sharded on write)
    <directory>/<step>/record/    a JSON record: step, val_loss, best_val_loss + what the caller
                                  passes (the trainer: config, model, data_dir, ...)
    <directory>/<step>/metrics/   {"val_loss": ...}, orbax's own copy, used to keep the best step

What orbax gives us and we rely on:
- Atomic saves: a step is written under a temporary name and renamed when complete, so a run
  killed mid-save leaves only a `<step>.orbax-checkpoint-tmp-*` folder that `latest_step()` never
  sees (and the next writer removes).
- Async saves: `save()` returns once the arrays are copied to host memory (so the caller may
  donate or overwrite its buffers), files are written by a background thread.
- Retention: `AnyPreservationPolicy(LatestN(keep), BestN(1))` keeps the latest `keep` steps plus
  the step with the lowest val loss; a step saved without a val loss never counts as "best".
- Collective multi-host saves: every process calls `save()`/`restore()`; process 0 writes the JSON
  items and the commit rename, each process writes its own shards. The wrapper itself writes only
  on process 0 (the write probe at start-up).
- Restore against abstract arrays (`jax.ShapeDtypeStruct` with `sharding=`): the state is read
  straight into the *current* mesh's shardings, whatever the device count at save time.

What the wrapper adds: one-line `CheckpointError`s (no checkpoint, damaged checkpoint, a state
that does not match, an unwritable folder, a failed background save), the best-val-loss
bookkeeping in the record, and a params-only restore for sampling and evaluation. How each
failure is noticed (orbax's background-save log records, the write probe, a damaged metrics file)
lives in nanogpt_jax.checkpoint_faults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from nanogpt_jax import checkpoint_faults as faults
from nanogpt_jax import storage
from nanogpt_jax.errors import CheckpointError
from nanogpt_jax.model import GPTConfig

PyTree = Any
STATE, RECORD = "state", "record"  # orbax item names: the sub-folders of each step folder


def checkpoint_dir(out_dir: str | os.PathLike) -> storage.AnyPath:
    """A run's checkpoint folder: out_dir/checkpoints (a local Path, or an epath.Path for a gs:// out_dir)."""
    return storage.path(out_dir) / "checkpoints"


def _val_loss(metrics: Mapping[str, float | None]) -> float:
    """Orbax's ranking of a step (lower is better); a step saved without a val loss ranks last."""
    loss = metrics.get("val_loss")
    return math.inf if loss is None else loss


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """PyTree handler for the state (its restore supports `partial_restore`), JSON for the record."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE, ocp.args.PyTreeSave, ocp.PyTreeCheckpointHandler)
    registry.add(STATE, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
    registry.add(RECORD, ocp.args.JsonSave, ocp.handlers.JsonCheckpointHandler)
    registry.add(RECORD, ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler)
    return registry


def _key_name(path: tuple) -> str:
    """A leaf's key path as orbax names it on disk: `opt_state.1.0.mu.wte.embedding`."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _stored_shape(x: Any) -> tuple[int, ...]:
    """The shape orbax stores for a leaf: a typed PRNG key is stored as its key data (..., 2)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, x).shape)
    return tuple(x.shape)


def _replicated() -> jax.sharding.Sharding:
    """A sharding for abstract leaves that carry none: a full copy on every device."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _as_abstract(x: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None) or _replicated()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _restore_args(target: PyTree, partial: bool = False) -> ocp.args.Composite:
    """Restore the state into `target`'s structure, shapes, dtypes and shardings, plus the record."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)  # carries each leaf's sharding
    state = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=partial)
    return ocp.args.Composite(**{STATE: state, RECORD: ocp.args.JsonRestore()})


class Checkpointer:
    """Save and restore a training run's state and record; keep the latest `keep` and the best.

    Every process of a multi-host run must construct it and call `save`, `wait`, `restore*` and
    `close` together (orbax synchronises the processes inside those calls).

        ckpt = Checkpointer("out/checkpoints", keep=2)
        state, record = ckpt.restore(abstract_state)               # resume ("latest")
        ckpt.save(step, state, record={"config": ..., "model": ..., "data_dir": ...}, val_loss=2.9)
        ckpt.close()                                               # waits for the pending save

    Args:
        directory: folder of the step folders (local path or any `etils.epath` URL, e.g. gs://).
        keep: how many of the most recent checkpoints to keep (>= 1); the best by val loss is
            kept as well, so at most keep + 1 step folders exist.
        async_save: write files in a background thread (`save` returns after the device-to-host
            copy); False makes `save` block until the checkpoint is on disk.
        read_only: only restore (sampling, evaluation): no folder is created, nothing is written
            or deleted, the write check is skipped.

    Raises:
        CheckpointError: `directory` cannot be written (checked here, before any training), its
            checkpoints cannot be listed, or `keep` < 1.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True,
                 read_only: bool = False):
        if not isinstance(keep, int) or keep < 1:
            raise CheckpointError(f"keep={keep!r}: keep at least 1 checkpoint (train.keep_checkpoints >= 1)")
        self.directory = str(directory)  # as the user wrote it, for messages
        path = epath.Path(directory)
        if "://" not in self.directory:
            path = epath.Path(os.path.abspath(self.directory))
        if not read_only:
            faults.check_writable(path, self.directory)
        preservation = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep),
            # reverse=True sorts by descending loss, so the lowest loss is "best" (kept last)
            ocp.checkpoint_managers.BestN(get_metric_fn=_val_loss, reverse=True, n=1,
                                          keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            best_fn=_val_loss,  # makes orbax write the metrics item and answer best_step()
            best_mode="min",
            enable_async_checkpointing=async_save,
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,  # what read_only implies; orbax warns otherwise
            create=not read_only,
            cleanup_tmp_directories=not read_only,  # leftovers of a save that was killed
        )
        try:
            self._manager = ocp.CheckpointManager(path, options=options, handler_registry=_handler_registry())
        except Exception as e:  # e.g. a step's metrics file cut short by a full disk
            bad = faults.unreadable_metrics(path)
            folder = os.path.join(self.directory, bad) if bad else "the damaged step folder"
            raise CheckpointError(
                f"cannot read the checkpoints in {self.directory} ({faults.first_line(e)}); delete {folder} "
                "or choose a new out_dir") from e
        self._read_only = read_only
        self._path = path
        self._key = str(path).rstrip("/")  # how orbax names the folder in its messages
        faults.BackgroundSaveFailures.install()
        self._pending_step: int | None = None  # the step whose save may still be running
        self._failure_raised = False  # a failed save was reported: orbax may still echo it later
        self._closed = False
        self._best_val_loss = self._best_val_loss_on_disk()

    # ---- saving ---------------------------------------------------------------------------------

    def save(self, step: int, state: PyTree, *, record: Mapping[str, Any], val_loss: float | None = None) -> None:
        """Start saving `state` and a JSON record as checkpoint `step`; returns before the files are written.

        Args:
            step: the optimizer step the state is at (an int >= 0, newer than every saved step;
                saving the latest step again is skipped: the state of a step is the same).
            state: a PyTree of `jax.Array`s (e.g. the trainer's TrainState: step, params,
                opt_state, rng; typed PRNG keys are fine). Its buffers may be donated or deleted
                as soon as `save` returns.
            record: JSON-serialisable facts about the run (the trainer passes `config` (the resolved
                config as a dict), `model` (`dataclasses.asdict(GPTConfig)`), `data_dir`, ...).
                `step`, `val_loss` and `best_val_loss` are added (and win over the caller's).
                With several processes, process 0's record is the one written.
            val_loss: the validation loss (nats/token) at this step, or None when not evaluated.
                A None or non-finite loss never makes this step the best one.

        Raises:
            CheckpointError: the previous save failed, the step is older than the latest saved
                one, or the save could not start (e.g. the folder became unwritable).
            TypeError: `record` is not JSON-serialisable (checked here, not in the background).
        """
        if self._read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; open it with read_only=False to save")
        if self._pending_step is not None and self._manager.is_saving_in_progress():
            # the previous save is still writing: if the folder is gone (a bucket that stopped answering,
            # a lost mount) its writes retry for a long time, and waiting for them would hang the run here
            problem = faults.write_problem(self._path)
            if problem:
                raise self._save_failed(problem)
        # orbax waits for the previous save inside save(); waiting here first reports its failure as its own
        self.wait()
        step = int(step)
        latest = self._manager.latest_step()
        if latest is not None and step == latest:
            logging.info("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
            return
        if latest is not None and step < latest:
            raise CheckpointError(
                f"cannot save step {step}: {self.directory} already has the newer step {latest}; resume from "
                f"step {latest} (init_from=resume) or use a new out_dir")
        # A folder that stopped taking writes (permissions, a read-only remount) fails here, in the caller,
        # on every process: inside orbax's background save it would leave threads waiting forever.
        problem = faults.write_problem(self._path)
        if problem:
            self._pending_step = step
            raise self._save_failed(problem)
        finite = val_loss is not None and math.isfinite(float(val_loss))
        best = self._best_val_loss
        if finite and (best is None or float(val_loss) < best):
            best = float(val_loss)
        full_record = {**record, "step": step, "val_loss": float(val_loss) if finite else None, "best_val_loss": best}
        json.dumps(full_record)  # a bad record fails here, in the caller, not later in a background thread
        args = ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(state), RECORD: ocp.args.JsonSave(full_record)})
        self._pending_step = step
        try:
            # force: we decided to save; orbax's save-interval policy would silently skip some steps
            # metrics for every step (None ranks last): orbax warns on each save without metrics
            self._manager.save(step, args=args, metrics={"val_loss": full_record["val_loss"]}, force=True)
        except Exception as e:
            raise self._save_failed(e) from e
        self._best_val_loss = best

    def wait(self) -> None:
        """Block until every pending save is on disk (committed, old steps deleted).

        Raises:
            CheckpointError: a pending save failed; the checkpoints saved before it are intact.
        """
        failed = faults.BackgroundSaveFailures.take(self._key)
        if self._pending_step is None and self._failure_raised:
            # nothing in flight since the failure we raised: orbax's late report of it (its background
            # thread logs after the caller saw the error) is not a second failure, and must not replace it
            if failed is not None:
                logging.debug("orbax's late report of the failed save already raised: %s", failed)
            return
        if failed is not None:  # do not wait: with several processes that save would never finish
            raise self._save_failed(failed)
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(e) from e
        self._pending_step = None

    def check(self) -> None:
        """Without blocking: raise now if the pending background save has ended in failure.

        Call it often (the trainer does at every step): a save that failed is then reported
        within a step, not at the next save an eval_interval later.

        Raises:
            CheckpointError: as `wait`.
        """
        if self._pending_step is not None and (faults.BackgroundSaveFailures.pending(self._key)
                                               or not self._manager.is_saving_in_progress()):
            self.wait()  # finished or failed: returns at once, raising the save's error if it failed

    def close(self) -> None:
        """Wait for pending saves (see `wait`) and release orbax's threads. Safe to call twice.
        A checkpoint folder this checkpointer created and never saved into is removed."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        except CheckpointError:
            self._close_manager_after_failure()
            raise
        if self._failure_raised:
            self._close_manager_after_failure()
        else:
            self._manager.close()
        self._remove_if_empty()

    def _close_manager_after_failure(self) -> None:
        # orbax's close() waits for a save still writing (into a folder that is gone: retrying for long), and
        # re-raises the background save's own error: neither, as our error, which names the fix, is on its way
        if self._manager.is_saving_in_progress():
            logging.debug("not waiting for orbax's unfinished save into %s", self.directory)
            return
        try:
            self._manager.close()
        except Exception as e:  # noqa: BLE001
            logging.debug("orbax's close after a failed save: %s", e)

    def _remove_if_empty(self) -> None:
        """A run that failed before its first save leaves no empty checkpoints/ folder behind."""
        if self._read_only or jax.process_index() != 0:
            return
        try:
            if self._path.is_dir() and not any(self._path.iterdir()):
                self._path.rmdir()
        except OSError:  # e.g. another writer just created something in it: keep it
            pass

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:  # an exception is already on its way: report a failed save, but do not mask it
            self.close()
        except CheckpointError as e:
            logging.error("%s", e)

    def _save_failed(self, e: BaseException | str) -> CheckpointError:
        """The error for a failed save; re-reads the folder, since orbax's list may have dropped steps."""
        step = self._pending_step
        self._pending_step = None
        self._failure_raised = True
        faults.BackgroundSaveFailures.take(self._key)  # reported now, by whichever way it came: not twice
        try:
            self._manager.reload()
            self._best_val_loss = self._best_val_loss_on_disk()
        except Exception:  # the folder itself may be gone; the error below says so
            pass
        what = f"saving checkpoint step {step}" if step is not None else "saving a checkpoint"
        why = e if isinstance(e, str) else faults.first_line(e)
        try:
            kept = [s for s in self._manager.all_steps() if s != step]
        except Exception:  # noqa: BLE001
            kept = None
        if "://" in self.directory:
            check = ("check the bucket and this machine's credentials (the service account needs "
                     "roles/storage.objectAdmin on it)")
        else:
            check = "check the disk (space, permissions)"
        intact = ("no checkpoint was committed before it" if kept == [] else
                  f"the committed checkpoints ({', '.join(map(str, sorted(kept)))}) are intact" if kept else
                  "earlier checkpoints are intact")
        return CheckpointError(f"{what} to {self.directory} failed ({why}); {check}; {intact}")

    # ---- finding steps --------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (unfinished or interrupted saves never count), or None."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the lowest val loss among the kept checkpoints, or None if none has one."""
        if self._best_val_loss is None:  # orbax would name the newest step, ranked by an infinite loss
            return None
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        """Every complete checkpoint's step, ascending."""
        return sorted(self._manager.all_steps())

    def _resolve(self, step: int | str) -> int:
        """'latest' | 'best' | an int -> an existing step, or a CheckpointError saying what to do."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}; train first or set init_from=scratch")
        if step == "latest":
            return steps[-1]
        if step == "best":
            best = self.best_step()
            if best is None:
                raise CheckpointError(
                    f"no checkpoint in {self.directory} has a val loss to pick the best by; use the latest instead")
            return best
        if isinstance(step, str | int | np.integer) and str(step).isdigit():
            if int(step) in steps:
                return int(step)
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; it has steps "
                                  f"{', '.join(map(str, steps))}")
        raise CheckpointError(f"checkpoint step {step!r} must be 'latest', 'best' or a step number")

    # ---- restoring ------------------------------------------------------------------------------

    def restore(self, abstract_state: PyTree, step: int | str = "latest") -> tuple[PyTree, dict]:
        """Read a checkpoint into the structure and shardings of `abstract_state`.

        Args:
            abstract_state: the state a fresh run would have, as `jax.ShapeDtypeStruct`s carrying
                the current mesh's shardings (e.g. `jax.eval_shape` of the init + the state
                shardings), or real arrays (their shape, dtype and sharding are used). Leaves
                without a sharding are replicated on every device. The result has exactly this
                tree structure (dataclasses, optax namedtuples) and these shardings, whatever the
                device count when the checkpoint was saved; dtypes are cast to the target's.
            step: "latest", "best" (lowest val loss) or a step number.

        Returns:
            (state, record): the restored state (jax Arrays) and the checkpoint's JSON record.

        Raises:
            CheckpointError: no checkpoint; no such step; the state does not match the checkpoint
                (naming the first differing key); a damaged checkpoint (a missing or truncated file).
        """
        step = self._resolve(step)
        target = jax.tree.map(_as_abstract, abstract_state)
        self._check_matches(step, target)
        restored = self._read(step, _restore_args(target))
        state = restored[STATE]
        if jax.tree.structure(state) != jax.tree.structure(target):  # orbax restores into `item`; make sure
            raise CheckpointError(f"checkpoint step {step} in {self.directory} restored with a different structure "
                                  "than the state asked for; this is a bug, please report it")
        return state, dict(restored[RECORD])

    def restore_params(self, abstract_params: PyTree, step: int | str = "latest") -> tuple[PyTree, dict]:
        """Read only `state.params` (no optimizer state is read) into `abstract_params`' shardings.

        For sampling and evaluation: a gpt2-xl run's checkpoint is ~3x its params in size; this
        reads the params alone. Args, returns and errors as `restore`, with `abstract_params` the
        params tree (e.g. `jax.eval_shape(init_params, ...)` with shardings).
        """
        step = self._resolve(step)
        target = {"params": jax.tree.map(_as_abstract, abstract_params)}
        self._check_matches(step, target, partial=True)
        restored = self._read(step, _restore_args(target, partial=True))
        return restored[STATE]["params"], dict(restored[RECORD])

    def record(self, step: int | str = "latest") -> dict:
        """The JSON record of a checkpoint ("latest", "best" or a step), without reading any array."""
        step = self._resolve(step)
        return dict(self._read(step, ocp.args.Composite(**{RECORD: ocp.args.JsonRestore()}))[RECORD])

    def _damaged(self, step: int, e: BaseException) -> CheckpointError:
        older = [s for s in self.all_steps() if s < step]
        fallback = f" to fall back to step {older[-1]}" if older else ""
        return CheckpointError(
            f"checkpoint step {step} in {self.directory} is damaged or incomplete ({faults.first_line(e)}); delete "
            f"{os.path.join(self.directory, str(step))}{fallback}, or set init_from=scratch")

    def _read(self, step: int, args: ocp.args.Composite) -> Any:
        try:
            return self._manager.restore(step, args=args)
        except Exception as e:  # tensorstore / JSON / missing-file errors: the files are not what orbax wrote
            logging.vlog(1, "restoring step %d failed", step, exc_info=True)  # the whole story, with -v 1
            error = self._damaged(step, e)
        # not `from e`: its frames would keep orbax's abandoned read tasks alive until exit (see
        # checkpoint_faults.collect_abandoned_reads)
        faults.collect_abandoned_reads()
        raise error

    def _check_matches(self, step: int, target: PyTree, partial: bool = False) -> None:
        """Compare the target's leaves (names, shapes) with the checkpoint's metadata, before reading.

        Orbax would fail too, but with a page of tree dump; this names the first differing key.
        With `partial`, checkpoint leaves outside the target's top-level keys are ignored.
        """
        try:
            tree = self._manager.item_metadata(step)[STATE].tree
            saved = {m.name: tuple(m.shape) for m in jax.tree.leaves(tree) if hasattr(m, "name")}
        except Exception as e:
            raise self._damaged(step, e) from e
        wanted = {_key_name(p): _stored_shape(x) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
        if partial:
            prefixes = tuple(f"{k}." for k in target)
            saved = {k: v for k, v in saved.items() if k.startswith(prefixes)}
        fix = "build the model with the checkpoint's settings (its record's 'model') or use another out_dir"
        for key, shape in wanted.items():
            if key not in saved:
                raise CheckpointError(f"checkpoint step {step} in {self.directory} has no {key} (this model has it, "
                                      f"shape {shape}); {fix}")
            if saved[key] != shape:
                raise CheckpointError(f"checkpoint step {step} in {self.directory} has {key} of shape {saved[key]}, "
                                      f"this model {shape}; {fix}")
        # keys only the checkpoint has: report in the order of the target's fields (params before opt_state)
        fields = {top: i for i, top in enumerate(dict.fromkeys(k.split(".")[0] for k in wanted))}
        for key in sorted(saved, key=lambda k: fields.get(k.split(".")[0], len(fields))):
            if key not in wanted:
                raise CheckpointError(f"checkpoint step {step} in {self.directory} has {key}, which this model "
                                      f"lacks; {fix}")

    def _best_val_loss_on_disk(self) -> float | None:
        best = self._manager.best_step()
        metrics = self._manager.metrics(best) if best is not None else None
        return None if not metrics or metrics.get("val_loss") is None else float(metrics["val_loss"])


def model_config(record: Mapping[str, Any]) -> GPTConfig:
    """Rebuild the `GPTConfig` a checkpoint was trained with from its record's "model" entry.

    Raises:
        CheckpointError: the record has no model config, or one this version cannot build.
    """
    fields = record.get("model")
    if not isinstance(fields, Mapping):
        raise CheckpointError("the checkpoint's record has no 'model' entry; it was not written by "
                              "nanogpt_jax's trainer, so pass the model settings in the config")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"the checkpoint's model config has unknown fields {', '.join(unknown)}; it was "
                              "written by a newer nanogpt_jax, update this one")
    try:
        return GPTConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's model config is invalid ({e}); the record is damaged") from e
