"""From an ml-collections config to the library's typed values, checked once at start-up.

`configs/default.py` declares every key. `validate(config)` checks the values no single key can
check alone (types are enforced by ml_collections itself) and raises `ConfigError` whose message
starts with the key, e.g. `model.n_embd=100: must be divisible by model.n_head=12`. The library
below this module takes `GPTConfig` and plain values, never a ConfigDict.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
from ml_collections import ConfigDict

from nanogpt_jax.errors import ConfigError
from nanogpt_jax.model import DTYPES, GPT2_SIZES, GPTConfig

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout", "bias", "dtype",
              "scan_layers", "remat", "attention", "loss", "loss_chunk")


def _check(ok: bool, key: str, config: ConfigDict, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={_get(config, key)!r}: {why}")


def _get(config: ConfigDict, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def _positive(config: ConfigDict, *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        if key.split(".")[0] in config and _has(config, key):
            v = _get(config, key)
            if v is not None:
                _check(v >= 0 if allow_zero else v > 0, key, config, "must be " + (
                    ">= 0" if allow_zero else "> 0"))


def _has(config: ConfigDict, key: str) -> bool:
    try:
        _get(config, key)
        return True
    except (KeyError, AttributeError):
        return False


def is_pretrained_name(init_from: str) -> bool:
    return init_from in GPT2_SIZES


def validate(config: ConfigDict) -> None:
    """Check cross-key constraints of a full config; raise ConfigError naming the first bad key."""
    m = config.model
    _positive(config, "model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.vocab_size")
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd={m.n_embd}: must be divisible by model.n_head={m.n_head}")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", config, "must be in [0, 1)")
    _check(m.dtype == "auto" or m.dtype in DTYPES, "model.dtype", config,
           f"must be auto or one of {', '.join(DTYPES)}")
    try:  # dtype left unresolved: "auto" would start JAX's backend before jax.distributed.initialize
        GPTConfig(**{**model_kwargs(config, resolve=False), "dtype": "float32"})
    except ValueError as e:
        raise ConfigError(f"model.{e}") from None
    init = config.init_from
    _check(bool(init), "init_from", config, "must be scratch, resume, a GPT-2 name or an HF folder")
    folder = os.path.isdir(init) or "://" in init  # a gs:// HF folder is checked when it is copied
    if init not in ("scratch", "resume") and not is_pretrained_name(init) and not folder:
        raise ConfigError(f"init_from={init!r}: not scratch, resume, a GPT-2 name ({', '.join(GPT2_SIZES)}) "
                          "or an existing Hugging Face folder")
    if (is_pretrained_name(init) or folder) and m.block_size > 1024 and init != "resume":
        raise ConfigError(f"model.block_size={m.block_size}: GPT-2 weights cover 1024 positions; use <= 1024")
    _positive(config, "train.batch_size", "train.gradient_accumulation_steps", "train.eval_interval",
              "train.eval_iters", "train.log_interval", "train.keep_checkpoints", "train.max_skipped")
    _positive(config, "train.max_iters", "optim.warmup_iters", "optim.lr_decay_iters", "optim.weight_decay",
              "optim.grad_clip", "optim.min_lr", allow_zero=True)
    _positive(config, "optim.learning_rate", "sample.num_samples", "sample.max_new_tokens", "sample.top_k",
              "eval.batch_size", "eval.stride", "eval.max_examples", "bench.steps")
    _positive(config, "sample.temperature", "bench.warmup", allow_zero=True)
    if _has(config, "optim.min_lr"):
        _check(config.optim.min_lr <= config.optim.learning_rate, "optim.min_lr", config,
               f"must be <= optim.learning_rate={config.optim.learning_rate}")
    for key in ("optim.beta1", "optim.beta2"):
        if _has(config, key):
            _check(0.0 <= _get(config, key) < 1.0, key, config, "must be in [0, 1)")
    if _has(config, "sample.top_p") and config.sample.top_p is not None:
        _check(0.0 < config.sample.top_p <= 1.0, "sample.top_p", config, "must be in (0, 1]")
    if _has(config, "sample.checkpoint"):
        _check(config.sample.checkpoint in ("latest", "best"), "sample.checkpoint", config, "must be latest or best")
    if _has(config, "mesh.data"):
        for key in ("mesh.data", "mesh.fsdp", "mesh.tensor"):
            v = _get(config, key)
            _check(v == -1 or v >= 1, key, config, "must be >= 1, or -1 for all remaining devices")
        if [config.mesh.data, config.mesh.fsdp, config.mesh.tensor].count(-1) > 1:
            raise ConfigError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    for check in EXTRA_CHECKS:
        check(config)


# Later modules (training, evaluation, benchmarks) register checks of their own sections here.
EXTRA_CHECKS: list[Callable[[ConfigDict], None]] = []
LM_EVAL_PREFIX = "lm_eval:"  # eval.tasks entries naming lm-evaluation-harness tasks: "lm_eval:arc_easy,piqa"


def resolve_dtype(name: str) -> str:
    """"auto" -> bfloat16 on GPU/TPU, float32 on CPU; other names pass through."""
    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def model_kwargs(config: ConfigDict, resolve: bool = True) -> dict[str, Any]:
    """The config's model section as GPTConfig keyword arguments (dtype resolved unless
    resolve=False, vocab default)."""
    kw = {k: config.model[k] for k in MODEL_KEYS}
    if resolve:
        kw["dtype"] = resolve_dtype(kw["dtype"])
    if kw["vocab_size"] is None:
        kw["vocab_size"] = 50304  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT trains
    return kw


def gpt_config(config: ConfigDict, **overrides: Any) -> GPTConfig:
    """A GPTConfig from the config's model section; overrides win (e.g. a checkpoint's shape)."""
    try:
        return GPTConfig(**{**model_kwargs(config), **overrides})
    except ValueError as e:
        raise ConfigError(f"model.{e}") from None
