"""The one checkpoint format: a torch file written atomically and loaded safely.

A checkpoint is a dict of tensors and plain Python values (no pickled objects), so it loads with
`torch.load(weights_only=True)` and can never run code. Keys of the model's state dict are free of
the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes, so a checkpoint does not depend on
how the model was wrapped when it was saved.

Payload keys: format, model, model_config, and for training runs config, optimizer, scaler, rng,
sampler, iter_num, best_val_loss, data_meta.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import zipfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from nanogpt.errors import CheckpointError
from nanogpt.model import GPT, GPTConfig

log = logging.getLogger(__name__)

FORMAT = "nanogpt-checkpoint/1"
LATEST, BEST = "ckpt.pt", "best.pt"  # file names inside a training out_dir
_PREFIXES = ("_orig_mod.", "module.")


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (torch.compile's `_orig_mod.`, DDP's `module.`) from every key."""
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            key = key.replace(prefix, "")
        out[key] = value
    return out


def model_payload(model: torch.nn.Module, **extra: Any) -> dict[str, Any]:
    """A checkpoint dict for a (possibly wrapped) GPT: weights, its shape, and `extra` keys."""
    inner = unwrap(model)
    return {"format": FORMAT, "model": clean_state_dict(inner.state_dict()),
            "model_config": asdict(inner.config), **extra}


def unwrap(model: torch.nn.Module) -> GPT:
    """The GPT inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model  # type: ignore[return-value]


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`.

    A crash (or SIGKILL) while saving leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def find_checkpoint(path: str | Path, prefer: str = BEST) -> Path:
    """A checkpoint file, or inside a training out_dir the `prefer`red one (else the other)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in (prefer, LATEST if prefer == BEST else BEST):
            if (path / name).is_file():
                return path / name
        if list(path.glob("*.dcp")):  # an FSDP run's sharded checkpoints (nanogpt.fsdp), one folder each
            raise CheckpointError(f"{path} holds sharded (FSDP) checkpoints only; convert them to {LATEST}/{BEST} "
                                  f"with: python -m nanogpt.fsdp convert {path}")
        raise CheckpointError(f"no checkpoint ({BEST} or {LATEST}) in {path}; train first with nanogpt-train")
    raise CheckpointError(f"checkpoint {path} does not exist")


def load_checkpoint(path: str | Path, prefer: str = BEST) -> dict[str, Any]:
    """Load a checkpoint to CPU (no GPU memory spike on resume), refusing anything but data."""
    path = find_checkpoint(path, prefer)
    try:
        # mmap: tensors are paged in as they are used, so exporting or sampling from a large training
        # checkpoint does not read its optimizer state into memory
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it contains pickled code or objects, not plain tensors "
            f"({str(e).splitlines()[0][:120]}); only load checkpoints you trust with other tools"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        raise CheckpointError(f"{path} is not a nanogpt checkpoint (no 'model' / 'model_config' keys)")
    payload["model"] = clean_state_dict(payload["model"])  # also accept files saved by other tools
    return payload


def config_from_payload(payload: dict[str, Any], **overrides: Any) -> GPTConfig:
    """The GPTConfig a checkpoint was saved with, `overrides` (e.g. dropout) applied."""
    known = {f.name for f in fields(GPTConfig)}
    cfg = GPTConfig(**{k: v for k, v in payload["model_config"].items() if k in known})
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def model_from_payload(payload: dict[str, Any], **overrides: Any) -> GPT:
    """Build the GPT described by a checkpoint and load its weights (strictly)."""
    model = GPT(config_from_payload(payload, **overrides))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit the model: {str(e).splitlines()[1:2]}") from None
    return model


def load_model(path: str | Path, prefer: str = BEST, **overrides: Any) -> GPT:
    """A GPT from a checkpoint file or training out_dir, on CPU, in eval mode."""
    return model_from_payload(load_checkpoint(path, prefer), **overrides).eval()
