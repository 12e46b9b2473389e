"""Sampling behind `python run_sample.py`: a model from init_from, a prompt, streamed text.

init_from picks the weights (`restore.load_model`): a GPT-2 name or HF folder (GPT-2's BPE), or `resume`
(out_dir's latest or best checkpoint, with the tokenizer of the data it was trained on, from its meta.json).
"""

from __future__ import annotations

import sys
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from nanogpt_jax import metrics, storage, tokenizer
from nanogpt_jax.errors import UserError
from nanogpt_jax.restore import load_model


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
