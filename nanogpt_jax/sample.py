"""Sampling behind `python run_sample.py`: a model from init_from, a prompt, streamed text.

init_from picks the weights: a GPT-2 name or HF folder (GPT-2's BPE), or `resume` (out_dir's
latest or best checkpoint, with the tokenizer of the data it was trained on, from its meta.json).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from nanogpt_jax import config as config_lib
from nanogpt_jax import data, metrics, storage, tokenizer
from nanogpt_jax.checkpoint import Checkpointer
from nanogpt_jax.errors import CheckpointError, ConfigError, UserError
from nanogpt_jax.model import GPT, GPTConfig, init_params
from nanogpt_jax.step import param_shardings
from nanogpt_jax.train import checkpoint_dir


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


def read_prompt(prompt: str) -> str:
    """The prompt text: the value itself, or the contents of FILE:path (a local path or a gs:// URL)."""
    if prompt.startswith("FILE:"):
        path = storage.path(prompt[5:])
        try:
            return path.read_text(encoding="utf-8")
        except OSError as e:
            why = e.strerror or " ".join(str(e).split())[:200]
            raise UserError(f"sample.prompt=FILE:{path}: cannot read it ({why})") from None
    return prompt


class _TextStream:
    """Writes the text of a growing token list, holding back an incomplete UTF-8 character."""

    def __init__(self, tok: tokenizer.Tokenizer, out: TextIO):
        self.tok, self.out, self.ids, self.shown = tok, out, [], 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)


def sample(config: ConfigDict, out: TextIO | None = None) -> list[str]:
    """Generate config.sample.num_samples continuations of the prompt as one batch.

    The first sample streams to `out` (stdout) as it is generated; the others follow when the
    batch is done. Returns the sampled texts (without the prompt).
    """
    out = out or sys.stdout
    s = config.sample
    model, params, tok, source = load_model(config)
    prompt = read_prompt(s.prompt)
    ids = tok.encode(prompt)
    if not ids:
        raise UserError("sample.prompt is empty; give some text (for GPT-2, e.g. '\\n' or 'Once upon a time')")
    logging.info("sampling %d x %d tokens from %s (%s, %s parameters)", s.num_samples, s.max_new_tokens,
                 source, model.config.dtype, metrics.format_params(model.num_params()))
    idx = jnp.asarray(np.tile(np.asarray(ids, np.int32), (s.num_samples, 1)))
    lm = model.bind({"params": params})
    rows: list[list[int]] = [[] for _ in range(s.num_samples)]
    streamer = _TextStream(tok, out)
    out.write(prompt)
    for tokens_B in lm.stream(idx, s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                              rng=jax.random.key(s.seed), stop_token=tok.eot_token, vocab_limit=tok.n_vocab):
        for row, t in zip(rows, tokens_B.tolist(), strict=True):
            row.append(t)
        if tok.eot_token is None or rows[0][-1] != tok.eot_token:
            streamer.add(rows[0][-1])
    texts = [tok.decode([t for t in row if t != tok.eot_token]) for row in rows]
    out.write("\n")
    for text in texts[1:]:
        out.write("---------------\n" + prompt + text + "\n")
    out.flush()
    return texts
