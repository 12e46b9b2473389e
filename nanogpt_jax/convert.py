"""Hugging Face GPT-2 weights <-> our parameters, one tensor at a time.

    model, params = load_pretrained("gpt2")            # or gpt2-medium/-large/-xl, or an HF folder
    export_hf(model.config, params, "out/hf")          # GPT2LMHeadModel.from_pretrained("out/hf")

This module holds the mapping (names, shapes, config.json's fields) and the checks; finding, reading
and writing the files (the Hub cache, downloads, safetensors, pytorch_model.bin) is nanogpt_jax.hf_files'.

Our module names are HF GPT-2's, and HF's Conv1D weights are (in, out) like Flax kernels, so a
conversion is a rename plus two reshapes, never a transpose:

    HF key (prefix `transformer.` optional)     shape        our path                  shape
    wte.weight                                  (V, D)       wte/embedding             (V, D)
    wpe.weight                                  (P, D)       wpe/embedding             (block_size, D), cropped
    h.{i}.attn.c_attn.weight                    (D, 3D)      h_{i}/attn/c_attn/kernel  (D, 3, H, K)
    h.{i}.attn.c_attn.bias                      (3D,)        h_{i}/attn/c_attn/bias    (3, H, K)
    h.{i}.attn.c_proj.weight                    (D, D)       h_{i}/attn/c_proj/kernel  (H, K, D)
    h.{i}.{ln_1,ln_2}.{weight,bias}, ln_f.*     (D,)         .../{scale,bias}          (D,)
    h.{i}.mlp.{c_fc,c_proj}.{weight,bias}       as ours      .../{kernel,bias}
    h.{i}.attn.bias, h.{i}.attn.masked_bias     causal-mask buffers of old checkpoints: ignored
    lm_head.weight                              tied to wte: checked equal when present

The reshapes follow HF's GPT2Attention: c_attn's output splits into q, k, v of D each, and each
of those into H heads of K; c_proj's input is the heads concatenated head-major. With
scan_layers the blocks are one subtree `h` whose leaves stack the layers on a leading (L, ...) axis.

Memory: every key and shape is checked from the file's header before any data is read; then each
tensor is read, reshaped and placed on its device (or sharding) alone, so converting gpt2-xl
peaks near one copy of its weights plus one tensor (one stacked (L, ...) leaf with scan_layers).
`python -m nanogpt_jax.bench.convert_memory` measures it.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from nanogpt_jax import storage
from nanogpt_jax.errors import CheckpointError, ConfigError
from nanogpt_jax.hf_files import (
    SAFETENSORS,
    SafetensorsFiles,
    TorchFiles,
    read_json,
    resolve,
    write_folder,
    write_hf_files,
)
from nanogpt_jax.model import GPT, GPT2_SIZES, GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE, GPTConfig, init_params

EOT_TOKEN = 50256  # <|endoftext|> in GPT-2's BPE: HF's bos/eos id
# causal-mask buffers that old HF checkpoints (and OpenAI's pytorch_model.bin) store per layer
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# GPTConfig fields a checkpoint fixes; only equal values are accepted as overrides
_SHAPE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_embd", "bias")
# HF config.json values that change the function computed; anything else is not the GPT-2 we run
_HF_FIXED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both are the tanh-approximated GELU
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "tie_word_embeddings": (True,),
    "add_cross_attention": (False,),
}
# our path under the model or under a block -> HF key under `transformer.` or `transformer.h.{i}.`
_HF_NAMES = {
    "wte/embedding": "wte.weight", "wpe/embedding": "wpe.weight",
    "ln_f/scale": "ln_f.weight", "ln_f/bias": "ln_f.bias",
    "ln_1/scale": "ln_1.weight", "ln_1/bias": "ln_1.bias",
    "ln_2/scale": "ln_2.weight", "ln_2/bias": "ln_2.bias",
    "attn/c_attn/kernel": "attn.c_attn.weight", "attn/c_attn/bias": "attn.c_attn.bias",
    "attn/c_proj/kernel": "attn.c_proj.weight", "attn/c_proj/bias": "attn.c_proj.bias",
    "mlp/c_fc/kernel": "mlp.c_fc.weight", "mlp/c_fc/bias": "mlp.c_fc.bias",
    "mlp/c_proj/kernel": "mlp.c_proj.weight", "mlp/c_proj/bias": "mlp.c_proj.bias",
}


# ---- the mapping ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One parameter leaf and the HF tensor(s) it is made of.

    hf_keys has one key, or one per layer for a stacked (scan_layers) leaf; hf_shape is the shape
    of each of those tensors in the file; shape is ours, with the (L,) axis when stacked.
    """

    path: tuple[str, ...]
    hf_keys: tuple[str, ...]
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def stacked(self) -> bool:
        return self.path[0] == "h"


def _hf_shape(name: str, shape: tuple[int, ...], n_positions: int) -> tuple[int, ...]:
    """HF's shape of our leaf `name` (path below a block) of `shape` (one layer's)."""
    if name == "attn/c_attn/kernel":  # (D, 3, H, K) <- (D, 3D)
        return (shape[0], math.prod(shape[1:]))
    if name == "attn/c_attn/bias":  # (3, H, K) <- (3D,)
        return (math.prod(shape),)
    if name == "attn/c_proj/kernel":  # (H, K, D) <- (D, D)
        return (math.prod(shape[:-1]), shape[-1])
    if name == "wpe/embedding":  # the file's n_positions rows, cropped to block_size on load
        return (n_positions, shape[1])
    return shape


def _expected_params(config: GPTConfig) -> Any:
    """Our parameter tree for `config` as ShapeDtypeStructs (from init, so never out of date)."""
    return jax.eval_shape(functools.partial(init_params, GPT(config)), jax.random.key(0))


def _plan(config: GPTConfig, n_positions: int) -> tuple[list[_Leaf], Any]:
    """The leaves of `config`'s parameter tree in flattening order, and the tree's structure."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(_expected_params(config))
    leaves = []
    for keypath, struct in flat:
        path = tuple(k.key for k in keypath)
        if path[0].startswith("h"):  # h_{i}/... (one layer) or h/... (stacked layers)
            name = "/".join(path[1:])
            layers = range(config.n_layer) if path[0] == "h" else [int(path[0].removeprefix("h_"))]
            layer_shape = struct.shape[1:] if path[0] == "h" else struct.shape
            hf_keys = tuple(f"h.{i}.{_HF_NAMES[name]}" for i in layers)
        else:
            name = "/".join(path)
            layer_shape = struct.shape
            hf_keys = (_HF_NAMES[name],)
        leaves.append(_Leaf(path, hf_keys, _hf_shape(name, layer_shape, n_positions), tuple(struct.shape)))
    return leaves, treedef


def _from_hf(hf_key: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One HF tensor -> our layout (one layer's `shape`): a row crop of wpe, else a reshape (a view)."""
    if hf_key == "wpe.weight":
        x = x[: shape[0]]
    return x.reshape(shape)


def _to_hf(x: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    """One of our leaves (one layer) -> HF's layout: the inverse reshape."""
    return np.ascontiguousarray(x).reshape(hf_shape)


# ---- config ------------------------------------------------------------------------------------


def hf_to_gpt_config(hf_config: dict[str, Any], **overrides: Any) -> GPTConfig:
    """An HF GPT-2 `config.json` (as a dict) -> GPTConfig, with compute overrides.

    The shape comes from the HF config: n_layer, n_head, n_embd, vocab_size, and block_size =
    n_positions; bias is True and dropout 0.0 (inference; override it for finetuning).
    Overrides are GPTConfig fields: dtype, scan_layers, remat, attention, dropout freely;
    block_size up to n_positions (wpe is cropped on load); shape fields only equal to the file's.

    Raises:
        CheckpointError: the config is not GPT-2 as we run it (model_type, activation,
            layer_norm_epsilon != 1e-5, untied embeddings, n_inner != 4 n_embd, ...), a required
            key is missing, block_size exceeds n_positions, or a shape override differs.
        ConfigError: an override value GPTConfig rejects (e.g. dtype="float64").
        TypeError: an override that is not a GPTConfig field.
    """
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"config.json has model_type={hf_config['model_type']!r}; only GPT-2 ('gpt2') loads")
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
        if not isinstance(hf_config.get(key), int):
            raise CheckpointError(f"config.json has no integer {key}; is this a GPT-2 config?")
    for key, allowed in _HF_FIXED.items():
        if key in hf_config and hf_config[key] not in allowed:
            raise CheckpointError(f"config.json has {key}={hf_config[key]!r}; GPT-2 as nanogpt_jax runs it "
                                  f"needs {allowed[0]!r}")
    n_embd, n_inner = hf_config["n_embd"], hf_config.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise CheckpointError(f"config.json has n_inner={n_inner}; GPT-2's MLP is 4 * n_embd = {4 * n_embd}")
    eps = hf_config.get("layer_norm_epsilon", 1e-5)
    if not math.isclose(eps, 1e-5, rel_tol=1e-6):
        raise CheckpointError(f"config.json has layer_norm_epsilon={eps}; GPT-2's (and our LayerNorm's) is 1e-5")
    try:
        base = GPTConfig(block_size=hf_config["n_positions"], vocab_size=hf_config["vocab_size"],
                         n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=n_embd,
                         dropout=0.0, bias=True)
    except ValueError as e:
        raise CheckpointError(f"config.json: {e}") from None

    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    for key, value in overrides.items():
        if key not in fields:
            raise TypeError(f"unknown GPTConfig field {key!r}; fields are {', '.join(sorted(fields))}")
        have = getattr(base, key)
        if key == "block_size" and value > have:
            raise CheckpointError(f"block_size={value} exceeds the checkpoint's n_positions={have}: position "
                                  f"embeddings cannot grow; use block_size <= {have}")
        if key in _SHAPE_FIELDS and value != have:
            raise CheckpointError(f"{key}={value!r} differs from the checkpoint's {key}={have!r}: the weights fix "
                                  f"the shape; only block_size (smaller), dtype, scan_layers, remat, attention "
                                  f"and dropout can be chosen")
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as e:
        raise ConfigError(f"model.{e}") from None


def _gpt_to_hf_config(config: GPTConfig, vocab_size: int) -> dict[str, Any]:
    """The config.json of the GPT2LMHeadModel equal to `config` with `vocab_size` rows of wte."""
    eot = EOT_TOKEN if vocab_size > EOT_TOKEN else None  # GPT-2's BPE (padded or not)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
        "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
        "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True, "bos_token_id": eot, "eos_token_id": eot,
        "dtype": "float32",
    }


# ---- import -------------------------------------------------------------------------------------


def _normalize(keys: list[str], source: str) -> dict[str, str]:
    """Our HF-style key (no `transformer.` prefix) -> the key in the file; both prefixes occur."""
    names: dict[str, str] = {}
    for key in keys:
        name = key.removeprefix("transformer.")
        if name in names:
            raise CheckpointError(f"{source}: tensor {name} appears twice ({names[name]} and {key}); "
                                  f"the file is not a GPT-2 checkpoint")
        names[name] = key
    return names


def _check_keys(leaves: list[_Leaf], shapes: dict[str, tuple[int, ...]], names: dict[str, str], source: str):
    """Every key we need present with its shape, nothing unexpected; before any data is read."""
    wanted = {key: leaf.hf_shape for leaf in leaves for key in leaf.hf_keys}
    for name, key in names.items():
        if _IGNORED.fullmatch(name):
            continue
        if name == "lm_head.weight":
            want = wanted["wte.weight"]
        elif name not in wanted:
            raise CheckpointError(f"{source}: unexpected tensor {key!r}; is this an HF GPT-2 checkpoint of "
                                  f"this config.json?")
        else:
            want = wanted[name]
        if shapes[key] != want:
            raise CheckpointError(f"{source}: tensor {key} has shape {shapes[key]}, config.json implies {want}; "
                                  f"the weights do not match config.json, re-download or re-export the folder")
    for name in wanted:
        if name not in names:
            raise CheckpointError(f"{source}: tensor {name} is missing; the checkpoint is incomplete, "
                                  f"re-download or re-export it")


def _sharding_leaves(shardings: Any, treedef: Any, scan_layers: bool) -> list[Any]:
    if shardings is None:
        return [None] * treedef.num_leaves
    try:
        return treedef.flatten_up_to(shardings)
    except (ValueError, TypeError):
        raise ValueError(f"shardings must be a tree of jax.sharding.Sharding with the structure of the params "
                         f"(scan_layers={scan_layers}): {treedef}") from None


def pretrained_config(name_or_path: str | os.PathLike, **overrides: Any) -> GPTConfig:
    """The GPTConfig `load_pretrained(name_or_path, **overrides)` would build, from config.json
    alone (fetched, but no weights read): what the trainer needs to compute shardings before
    loading. Raises CheckpointError as load_pretrained does."""
    source = os.fspath(name_or_path)
    config_path, _ = resolve(source)
    try:
        return hf_to_gpt_config(read_json(config_path), **overrides)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    shardings: Any = None,
    param_dtype: str = "float32",
    **overrides: Any,
) -> tuple[GPT, dict]:
    """GPT-2 weights from the Hugging Face Hub or a local HF folder -> (GPT, params).

    Args:
        name_or_path: "gpt2", "gpt2-medium", "gpt2-large" or "gpt2-xl" (from the HF cache, else
            downloaded from openai-community/<name> with huggingface_hub; HF_HOME, HF_HUB_CACHE and
            HF_HUB_OFFLINE are honoured, read at call time), or a folder with config.json and
            model.safetensors (or its shards, or pytorch_model.bin when torch is installed).
        shardings: None (every array on the default device), or a tree of
            `jax.sharding.Sharding` with the structure of the params (mind scan_layers); each
            tensor is placed with its sharding as soon as it is read, so a large model goes
            straight onto an fsdp mesh without first gathering on one device.
        param_dtype: the parameters' dtype, cast tensor by tensor as read: "float32" (training),
            or "bfloat16" to halve the memory for sampling on an accelerator.
        **overrides: GPTConfig fields: dtype, scan_layers, remat, attention, dropout; block_size
            up to the checkpoint's n_positions (wpe is cropped). The architecture is the
            checkpoint's (config.json); see `hf_to_gpt_config`.

    Returns:
        The module and its params: a dict of jax arrays of param_dtype in our layout (module
        docstring), (L, ...)-stacked under `h` when scan_layers.

    Raises:
        CheckpointError: an unknown name, a model that is neither cached nor downloadable (the
            message says how to point at local weights), a config that is not GPT-2, a missing,
            unexpected or wrongly shaped tensor (named), lm_head.weight differing from wte, or
            block_size above n_positions. Checked from headers before any tensor is read.
    """
    source = os.fspath(name_or_path)
    config_path, weight_paths = resolve(source)
    hf_config = read_json(config_path)
    try:
        config = hf_to_gpt_config(hf_config, **overrides)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if source in GPT2_SIZES and (config.n_layer, config.n_head, config.n_embd) != GPT2_SIZES[source]:
        logging.warning("%s: the cached config.json (%s) is not %s's shape %s", source, config_path,
                        source, GPT2_SIZES[source])

    files = (TorchFiles if weight_paths[0].suffix == ".bin" else SafetensorsFiles)(weight_paths)
    names = _normalize(list(files.shapes), source)
    leaves, treedef = _plan(config, hf_config["n_positions"])
    _check_keys(leaves, {k: files.shapes[k] for k in names.values()}, names, source)
    target = _sharding_leaves(shardings, treedef, config.scan_layers)
    dtype = np.dtype(jax.numpy.dtype(param_dtype))

    def read(hf_key: str, shape: tuple[int, ...]) -> np.ndarray:
        x = files.read(names[hf_key])
        if hf_key == "wte.weight" and "lm_head.weight" in names:  # tied in GPT-2: must be the same matrix
            if not np.array_equal(files.read(names["lm_head.weight"]), x):
                raise CheckpointError(f"{source}: lm_head.weight differs from wte.weight; GPT-2's output head "
                                      f"is tied to the token embedding")
        return np.asarray(_from_hf(hf_key, x, shape), dtype=dtype)

    arrays: list[Any] = [None] * len(leaves)
    # largest leaves first: with scan_layers each stacked leaf is briefly held twice (host buffer
    # and device copy); doing the big ones while little else is resident keeps the peak lowest
    for i in sorted(range(len(leaves)), key=lambda i: -math.prod(leaves[i].shape)):
        leaf = leaves[i]
        if leaf.stacked:  # allocate the (L, ...) array once, fill it layer by layer
            x = np.empty(leaf.shape, dtype)
            for layer, hf_key in enumerate(leaf.hf_keys):
                x[layer] = read(hf_key, leaf.shape[1:])
        else:
            x = read(leaf.hf_keys[0], leaf.shape)
        arrays[i] = jax.device_put(x, target[i]).block_until_ready()
        # jax keeps the host array alive after the copy until its runtime's garbage cleanup,
        # which runs on a Python GC pass (jax-ml/jax#14882): without this, freed tensors
        # pile up until the next automatic collection. Generation 0 suffices and costs ~1 ms.
        del x
        gc.collect(0)
    params = jax.tree_util.tree_unflatten(treedef, arrays)
    logging.info("loaded %s from %s: %s parameters, scan_layers=%s", source, weight_paths[0].parent,
                 f"{sum(math.prod(leaf.shape) for leaf in leaves):,}", config.scan_layers)
    return GPT(config), params


# ---- export ------------------------------------------------------------------------------------


def export_hf(
    config: GPTConfig,
    params: dict,
    out_dir: str | os.PathLike,
    *,
    vocab_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `params` as an HF GPT-2 folder: config.json + model.safetensors (float32).

    `transformers.GPT2LMHeadModel.from_pretrained(out_dir)` then computes the same logits.
    Scanned (stacked) params are split into layers; a model without biases gets zero biases.
    No tokenizer files are written: GPT-2's BPE is HF's `AutoTokenizer.from_pretrained("gpt2")`.
    Host memory: one float32 copy of the params (none more for float32 arrays on the CPU).

    Args:
        config: the model's GPTConfig (its layout: scan_layers, bias, vocab_size, block_size).
        params: our parameter tree, jax or numpy arrays, all addressable by this process.
        out_dir: the folder to create; written in a temporary sibling and renamed when complete.
        vocab_size: rows of wte to keep; default 50257 (GPT-2's BPE) for a vocab padded to
            50304, else config.vocab_size. Padding rows are never predicted by a trained model.
        overwrite: replace a non-empty out_dir.

    Returns:
        The folder's path.

    Raises:
        CheckpointError: out_dir exists and is not empty (without overwrite), params do not match
            config (the leaf named), or vocab_size exceeds config.vocab_size.
    """
    out = storage.path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not empty: choose a new folder or pass overwrite=True")
    if vocab_size is None:
        vocab_size = GPT2_VOCAB_SIZE if config.vocab_size == PADDED_VOCAB_SIZE else config.vocab_size
    if not 0 < vocab_size <= config.vocab_size:
        raise CheckpointError(f"vocab_size={vocab_size} must be in 1..{config.vocab_size} (the model's rows)")

    params = nn.unbox(params)
    flat = {tuple(k.key for k in kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    # HF GPT-2 always has biases: plan with them, and write zeros where our model has none
    leaves, _ = _plan(dataclasses.replace(config, bias=True), config.block_size)
    tensors: dict[str, np.ndarray] = {}
    for leaf in leaves:
        x = flat.pop(leaf.path, None)
        if x is None and (config.bias or leaf.path[-1] != "bias"):
            raise CheckpointError(f"params have no {'/'.join(leaf.path)}; they do not match the config "
                                  f"(scan_layers={config.scan_layers})")
        x = np.zeros(leaf.shape, np.float32) if x is None else _host(x, leaf.path)
        if x.shape != leaf.shape:
            raise CheckpointError(f"params {'/'.join(leaf.path)} has shape {x.shape}, the config implies "
                                  f"{leaf.shape}")
        for layer, hf_key in enumerate(leaf.hf_keys):
            tensors[f"transformer.{hf_key}"] = _to_hf(x[layer] if leaf.stacked else x, leaf.hf_shape)
    if flat:
        raise CheckpointError(f"params have an unexpected leaf {'/'.join(next(iter(flat)))}; they do not match "
                              f"the config (scan_layers={config.scan_layers})")
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:vocab_size]

    hf_config = _gpt_to_hf_config(config, vocab_size)
    if storage.is_url(out_dir):  # a bucket has no renames: each file in one upload, config.json (what HF reads) last
        with tempfile.TemporaryDirectory(prefix="nanogpt_jax-export-") as tmp:
            write_hf_files(Path(tmp), tensors, hf_config)
            for name in (SAFETENSORS, "config.json"):
                storage.upload(Path(tmp) / name, out / name)
    else:
        write_folder(out, overwrite, lambda tmp: write_hf_files(tmp, tensors, hf_config))
    logging.info("exported %d tensors to %s (vocab %d)", len(tensors), out, vocab_size)
    return out


def _host(x: Any, path: tuple[str, ...]) -> np.ndarray:
    """A parameter as a float32 numpy array (no copy for float32 arrays on the CPU)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise ValueError(f"params {'/'.join(path)} spans processes; gather it first "
                         f"(jax.experimental.multihost_utils.process_allgather) and export from one process")
    return np.asarray(x, dtype=np.float32)
