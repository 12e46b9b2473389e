"""Sharded checkpoints of FSDP runs, and their conversion to the single-file format.

Where a DDP run writes `ckpt.pt` (and `best.pt`), an FSDP run writes the folder `ckpt.dcp/`
(and `best.dcp/`):

    .metadata, __<rank>_0.distcp   torch.distributed.checkpoint (DCP): every rank writes its own
                                   shards of the weights and the AdamW state. Loading reshards
                                   them, so a checkpoint saved on N ranks resumes on M.
    trainer.pt                     the rest of a single-file checkpoint: model_config, iteration,
                                   sampler, every rank's RNG, best val loss, config, data meta.
                                   Plain values and tensors, loaded with weights_only=True.

Saving writes into `.ckpt.dcp.tmp/` (trainer.pt last) and rank 0 renames it into place after
every rank has written; a crash at any point leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from nanogpt import distributed as D
from nanogpt.checkpoint import LATEST, config_from_payload, model_payload, save_checkpoint
from nanogpt.config import OptimConfig
from nanogpt.errors import CheckpointError
from nanogpt.model import GPT
from nanogpt.optim import build_optimizer

log = logging.getLogger(__name__)

FORMAT = "nanogpt-sharded/1"
RUN_STATE = "trainer.pt"  # inside the checkpoint folder; written last, so it marks a complete one


def sharded_path(path: str | Path) -> Path:
    """out/ckpt.pt -> out/ckpt.dcp (the folder an FSDP run writes instead of the file)."""
    return Path(path).with_suffix(".dcp")


def save_sharded(model: GPT, optimizer: torch.optim.Optimizer, run_state: dict[str, Any], path: str | Path,
                 info: D.DistInfo) -> Path:
    """Every rank writes its shards of model and optimizer; rank 0 adds trainer.pt and renames
    the finished folder into place. Collective: all ranks call it."""
    path = sharded_path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while saving
        tmp.mkdir(parents=True)
    D.barrier(info)
    # before the first step AdamW has no state, and asking DCP for it would create some
    has_optimizer = bool(optimizer.state)
    state = {"model": get_model_state_dict(model)}
    if has_optimizer:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=tmp)  # returns once every rank's files are written (and fsynced)
    if info.is_main:
        meta = {"format": FORMAT, "model_config": asdict(model.config), "has_optimizer": has_optimizer}
        save_checkpoint({**meta, **run_state}, tmp / RUN_STATE)
        _swap_into_place(tmp, path)
    D.barrier(info)
    return path


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename tmp to path. Folders cannot be swapped in one rename: the old one is first moved
    aside to `.<name>.old`, which find_sharded falls back to if we crash in between."""
    old = path.with_name(f".{path.name}.old")
    _fsync(tmp)
    if path.exists():  # else an .old left by a crash is the only complete checkpoint: keep it until tmp is in
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_sharded(path: str | Path, prefer: str = LATEST) -> Path:
    """A sharded checkpoint folder itself, or in a training out_dir the one named like `prefer`
    (ckpt.pt -> ckpt.dcp), including the copy a crash mid-rename left aside."""
    path = Path(path)
    if (path / RUN_STATE).is_file():
        return path
    folder = sharded_path(path / prefer)
    for candidate in (folder, folder.with_name(f".{folder.name}.old")):
        if (candidate / RUN_STATE).is_file():
            return candidate
    hint = f"; {path / prefer} was written with system.strategy=ddp" if (path / prefer).is_file() else ""
    raise CheckpointError(f"no sharded checkpoint {folder} (an FSDP run's){hint}")


def load_run_state(path: str | Path, prefer: str = LATEST) -> dict[str, Any]:
    """trainer.pt of a sharded checkpoint (no weights), with `checkpoint_dir` added for load_sharded."""
    folder = find_sharded(path, prefer)
    try:
        state = torch.load(folder / RUN_STATE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused to load {folder / RUN_STATE}: it holds pickled objects "
                              f"({str(e).splitlines()[0][:120]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{folder / RUN_STATE} is corrupt ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{folder} is not a nanogpt sharded checkpoint ({FORMAT})")
    return {**state, "checkpoint_dir": str(folder)}


def resume_model(out_dir: str | Path, **overrides: Any) -> tuple[dict[str, Any], GPT]:
    """The run state of out_dir's latest sharded checkpoint and a GPT of its shape, `overrides`
    applied; its weights are still random until load_sharded fills them (after sharding)."""
    run = load_run_state(out_dir, prefer=LATEST)
    return run, GPT(config_from_payload(run, **overrides))


def load_sharded(model: GPT, optimizer: torch.optim.Optimizer | None, run_state: dict[str, Any]) -> None:
    """Load weights (and optimizer state, when given and saved) into a model sharded over any
    number of ranks, or into a plain model in a single process. Collective under torchrun."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None and run_state["has_optimizer"]:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():  # without torchrun DCP warns that it loads in one process: intended
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load(state, checkpoint_id=run_state["checkpoint_dir"])  # in place, resharded to this world size
    set_model_state_dict(model, state["model"])
    if "optim" in state:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def convert(src: str | Path, out: str | Path | None = None, with_optimizer: bool = True) -> Path:
    """A sharded checkpoint folder -> one single-file checkpoint (default: ckpt.dcp -> ckpt.pt
    beside it), in one process without torchrun. With the optimizer it resumes like any other
    (system.strategy=ddp); without, it is a smaller file for sampling, eval and export."""
    run = load_run_state(src)
    model = GPT(config_from_payload(run))
    optimizer = build_optimizer(model, OptimConfig(**run["config"]["optim"]), "cpu")
    load_sharded(model, optimizer if with_optimizer else None, run)
    skip = ("format", "model_config", "has_optimizer", "checkpoint_dir")
    extra = {k: v for k, v in run.items() if k not in skip}
    if with_optimizer:
        extra["optimizer"] = optimizer.state_dict()
    else:  # no optimizer, so not resumable: keep what sampling, eval and export read
        extra = {k: extra[k] for k in ("config", "data_meta", "iter_num", "best_val_loss") if k in extra}
    folder = Path(run["checkpoint_dir"])
    out = Path(out) if out else folder.parent / f"{folder.name.lstrip('.').split('.')[0]}.pt"  # .ckpt.dcp.old too
    save_checkpoint(model_payload(model, **extra), out)
    log.info("converted %s (iter %s) to %s", run["checkpoint_dir"], run.get("iter_num"), out)
    return out
