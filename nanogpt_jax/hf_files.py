"""Hugging Face GPT-2 files: finding them, reading their tensors one at a time, writing a folder.

    config_path, weight_paths = resolve("gpt2")        # or "gpt2-medium"..., an HF folder, a gs:// folder
    files = SafetensorsFiles(weight_paths)             # .shapes from the headers; .read(key) one tensor
    write_folder(out, overwrite, lambda tmp: write_hf_files(tmp, tensors, hf_config))

A GPT-2 name comes from the Hugging Face cache, else is downloaded into it with huggingface_hub
(openai-community/<name>; HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE are read at call time); a folder
holds config.json and model.safetensors (or its shards, or pytorch_model.bin when torch is
installed). Every failure is a one-line CheckpointError that says how to point at local weights.
What the tensors mean (the mapping onto our parameters) is nanogpt_jax.convert's concern, not this one's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nanogpt_jax import storage
from nanogpt_jax.errors import CheckpointError
from nanogpt_jax.model import GPT2_SIZES

HUB_ORG = "openai-community"  # the Hub's home of OpenAI's checkpoints; "gpt2" etc. are old aliases
SAFETENSORS, TORCH_BIN = "model.safetensors", "pytorch_model.bin"


# ---- finding the files -----------------------------------------------------------------------


def _offline() -> bool:
    # read at call time: huggingface_hub reads HF_HUB_OFFLINE once, when it is imported
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cache_dir() -> str:
    """HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default; read at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _local_hint(name: str, cache_dir: str) -> str:
    return (f"point it at local weights: pass an HF GPT-2 folder path (config.json + {SAFETENSORS}), or set "
            f"HF_HOME to a Hugging Face cache that holds {HUB_ORG}/{name} (looked in {cache_dir}; on a machine "
            f"with internet, `hf download {HUB_ORG}/{name} config.json {SAFETENSORS}` fills one)")


def _from_hub(name: str) -> tuple[Path, list[Path]]:
    """(config.json, [weights file]) of a named GPT-2, from the HF cache or downloaded into it."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cache_dir = _hub_cache_dir()
    weight_names = (SAFETENSORS, TORCH_BIN) if _torch_available() else (SAFETENSORS,)
    # a cached copy under either id first (transformers cached the old alias "gpt2"); no network
    for repo in (f"{HUB_ORG}/{name}", name):
        config = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir)
        for weights in weight_names:
            path = try_to_load_from_cache(repo, weights, cache_dir=cache_dir)
            if isinstance(config, str) and isinstance(path, str):
                return Path(config), [Path(path)]
    if _offline():
        raise CheckpointError(f"{name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                              + _local_hint(name, cache_dir))
    repo = f"{HUB_ORG}/{name}"
    try:
        config = hf_hub_download(repo, "config.json", cache_dir=cache_dir)
        try:
            weights = hf_hub_download(repo, SAFETENSORS, cache_dir=cache_dir)
        except EntryNotFoundError as e:  # not on the Hub (404): an old repo without safetensors
            if isinstance(e, LocalEntryNotFoundError):  # the Hub was not reached at all
                raise
            weights = hf_hub_download(repo, TORCH_BIN, cache_dir=cache_dir)
    except (EntryNotFoundError, OSError) as e:  # HTTP and connection errors are OSErrors too
        why = " ".join(str(e).split())[:200]
        raise CheckpointError(f"could not download {repo} ({why}); " + _local_hint(name, cache_dir)) from None
    return Path(config), [Path(weights)]


def _from_folder(folder: Path) -> tuple[Path, list[Path]]:
    """(config.json, weight files) of an HF folder: model.safetensors, its shards, or pytorch_model.bin."""
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder} has no config.json: an HF GPT-2 folder holds config.json and {SAFETENSORS}")
    for single in (SAFETENSORS, TORCH_BIN):
        if (folder / single).is_file():
            return config, [folder / single]
        index = folder / f"{single}.index.json"
        if index.is_file():  # a sharded save: the index maps every key to its file
            weight_map = read_json(index).get("weight_map", {})
            return config, [folder / f for f in sorted(set(weight_map.values()))]
    raise CheckpointError(f"{folder} has no {SAFETENSORS} (or {TORCH_BIN}): re-save it with "
                          f"save_pretrained or export_hf")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file (config.json, a shard index) as a dict; CheckpointError when unreadable or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {' '.join(str(e).split())}") from None


def resolve(source: str) -> tuple[Path, list[Path]]:
    """(config.json, weight files) of a GPT-2 name (HF cache or download), a local HF folder, or a
    gs:// one (copied first to storage.WEIGHTS_CACHE_DIR).

    Raises:
        CheckpointError: an unknown name, a file or missing folder, a folder without config.json or
            weights, or a model neither cached nor downloadable (the message says how to point at
            local weights).
    """
    if storage.is_url(source):
        return _from_folder(storage.local_folder(source))
    folder = Path(source).expanduser()
    if folder.is_dir():
        return _from_folder(folder)
    if source in GPT2_SIZES:
        return _from_hub(source)
    if folder.exists():
        raise CheckpointError(f"{source} is a file: pass the HF folder that holds config.json and {SAFETENSORS}")
    if os.sep in source or source.startswith((".", "~")):
        raise CheckpointError(f"no folder {source}: pass an HF GPT-2 folder (config.json + {SAFETENSORS}) or one "
                              f"of the names {', '.join(GPT2_SIZES)}")
    raise CheckpointError(f"{source!r} is neither a GPT-2 name ({', '.join(GPT2_SIZES)}) nor a folder: pass one "
                          f"of those names or the path of an HF GPT-2 folder (config.json + {SAFETENSORS})")


# ---- reading tensors ----------------------------------------------------------------------------


class SafetensorsFiles:
    """Tensors of one or more .safetensors files, read one at a time with safetensors' numpy API."""

    def __init__(self, paths: list[Path]):
        from safetensors import safe_open

        self._open = safe_open
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in paths:
            try:
                with safe_open(path, framework="numpy") as f:
                    for key in f.keys():
                        self.file_of[key] = path
                        self.shapes[key] = tuple(f.get_slice(key).get_shape())
            except Exception as e:  # safetensors raises its own SafetensorError for a damaged header
                raise CheckpointError(f"cannot read {path}: {' '.join(str(e).split())[:200]}") from None

    def read(self, key: str) -> np.ndarray:
        # A fresh mapping per tensor: pages a mapping has touched count towards this process's
        # resident memory until it is closed, so one mapping open for the whole file would add a
        # second copy of the weights to the peak.
        with self._open(self.file_of[key], framework="numpy") as f:
            return f.get_tensor(key)


class TorchFiles:
    """Tensors of pytorch_model.bin file(s): torch.load(weights_only=True), memory-mapped."""

    def __init__(self, paths: list[Path]):
        if not _torch_available():
            raise CheckpointError(f"{paths[0]} is a PyTorch file and torch is not installed: pip install "
                                  f"'nanogpt_jax[hf]', or re-save the weights as {SAFETENSORS}")
        import torch

        self.state: dict[str, Any] = {}
        for path in paths:
            try:
                try:  # mmap: tensors stay on disk until read (files from torch >= 1.6's zip format)
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # the legacy (pre-zip) format cannot be mapped
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickle and zip errors come in many classes
                raise CheckpointError(f"cannot read {path}: {' '.join(str(e).split())[:200]}") from None
            self.state.update({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
        self.shapes = {k: tuple(v.shape) for k, v in self.state.items()}

    def read(self, key: str) -> np.ndarray:
        import torch

        t = self.state[key]
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no torch bf16


# ---- writing --------------------------------------------------------------------------------------


def write_hf_files(folder: Path, tensors: dict[str, np.ndarray], hf_config: dict[str, Any]) -> None:
    """Write `tensors` (HF key -> array) as folder/model.safetensors and `hf_config` as folder/config.json."""
    from safetensors.numpy import save_file

    # transformers refuses safetensors files whose metadata lacks a known "format"
    save_file(tensors, folder / SAFETENSORS, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def write_folder(out: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` in a temporary sibling of `out`, then rename it to `out` (atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists():  # overwrite: move the old one aside first, delete it once replaced
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
