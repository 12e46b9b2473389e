"""A model to run, from where it lives: a training run's checkpoint, a Hugging Face folder or a GPT-2 name.

`load_model` is the one way run_sample.py, run_eval.py, the lm-evaluation-harness model and run_bench.py's
generate mode get a model, its parameters and its tokenizer from `init_from`:

    resume            out_dir's latest or best checkpoint (`checkpoint.checkpoint_dir`), with the tokenizer
                      of the data it was trained on (data.data_dir when given, else the one its record names)
    gpt2 ... gpt2-xl  OpenAI's weights by name, or a Hugging Face GPT-2 folder (nanogpt_jax.convert),
                      with GPT-2's BPE

It sits below every command that runs a model and above the pieces it joins (checkpoint, convert, data,
model, step), so none of those commands imports another to get a model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from ml_collections import ConfigDict

from nanogpt_jax import config as config_lib
from nanogpt_jax import data, tokenizer
from nanogpt_jax.checkpoint import Checkpointer, checkpoint_dir
from nanogpt_jax.errors import CheckpointError, ConfigError
from nanogpt_jax.model import GPT, GPTConfig, init_params
from nanogpt_jax.step import param_shardings


def load_model(config: ConfigDict, mesh: jax.sharding.Mesh | None = None,
               checkpoint: str | None = None) -> tuple[GPT, Any, tokenizer.Tokenizer, dict]:
    """The model, its parameters, its tokenizer and a description of where they came from.

    mesh: None puts the parameters on the default device; a mesh places each one in its sharding
    there as it is read (every process reads its own shards: what multi-host evaluation needs).
    checkpoint: with init_from=resume, "latest" or "best" (default: config.sample.checkpoint).
    The description holds `pretrained`, or `checkpoint` (folder), `step` and `data_dir`: the
    folder of the tokenizer (and of run_eval's loss task), by `data.find_data_dir`'s rule:
    data.data_dir when given explicitly, else the one the run trained on.
    """
    init = config.init_from
    dtype = config_lib.resolve_dtype(config.model.dtype)
    options = {"dtype": dtype, "attention": config.model.attention, "loss": config.model.loss,
               "loss_chunk": config.model.loss_chunk}
    which = checkpoint or config.sample.checkpoint
    if init == "scratch":
        raise ConfigError("init_from='scratch': nothing to sample from; use resume (a training run's out_dir) "
                          "or a GPT-2 name such as gpt2")
    if init == "resume":
        ckpt = Checkpointer(checkpoint_dir(config.out_dir), keep=1, async_save=False, read_only=True)
        step = ckpt.best_step() if which == "best" else ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"init_from=resume: no {which} checkpoint in {ckpt.directory}; "
                                  "train first (run_train.py) or check --config.out_dir")
        record = ckpt.record(step)
        # the tokenizer's folder before any weight is read: data.data_dir if given, else the run's own
        data_dir = str(data.find_data_dir(config.data.data_dir, record.get("data_dir")))
        tok = data.tokenizer_for(data_dir)
        model = GPT(GPTConfig(**{**record["model"], **options, "dropout": 0.0, "remat": "none"}))
        if record.get("tokenizer") not in (None, tok.name) or tok.n_vocab > model.config.vocab_size:
            raise CheckpointError(f"{data_dir}'s {tok.n_vocab}-token {tok.name} tokenizer is not the checkpoint's "
                                  f"({record.get('tokenizer')}, vocab_size {model.config.vocab_size}); pass the data "
                                  "it was trained on as --config.data.data_dir")
        if mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shards = jax.tree.map(lambda _: device, jax.eval_shape(lambda: init_params(model, jax.random.key(0))))
        else:
            shards = param_shardings(model, mesh)
        abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                jax.eval_shape(lambda: init_params(model, jax.random.key(0))), shards)
        params, record = ckpt.restore_params(abstract, step)
        return model, params, tok, {"checkpoint": str(ckpt.directory), "step": step, "data_dir": data_dir}
    from nanogpt_jax import convert

    shape = convert.pretrained_config(init, **options)
    # the checkpoint's context, or a shorter one if the config asks (a longer one cannot exist)
    options["block_size"] = min(config.model.block_size, shape.block_size)
    shards = None if mesh is None else param_shardings(GPT(dataclasses.replace(shape, **options)), mesh)
    # bf16 parameters on an accelerator: half the memory, and sampling needs no fp32 master copy
    param_dtype = "bfloat16" if jax.default_backend() != "cpu" and dtype == "bfloat16" else "float32"
    model, params = convert.load_pretrained(init, shardings=shards, param_dtype=param_dtype, **options)
    return model, params, tokenizer.gpt2(), {"pretrained": init}
