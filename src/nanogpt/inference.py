"""Load a model for inference from wherever it lives, and stream text from it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from nanogpt.checkpoint import load_checkpoint, model_from_payload
from nanogpt.data.tokenizer import Tokenizer, get_tokenizer, tokenizer_from_meta
from nanogpt.errors import DataError
from nanogpt.model import GPT

log = logging.getLogger(__name__)


def load_model_and_tokenizer(source: str, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer]:
    """A model in eval mode and its tokenizer, from a training out_dir, a checkpoint file,
    a GPT-2 name (gpt2 ... gpt2-xl) or a Hugging Face folder."""
    path = Path(source)
    if path.is_file() or (path.is_dir() and not (path / "config.json").is_file()):
        payload = load_checkpoint(path)
        model = model_from_payload(payload)
        meta = payload.get("data_meta")
        tok = tokenizer_from_meta(meta) if meta else get_tokenizer("gpt2")
    else:
        from nanogpt.hf import load_pretrained

        model, tok = load_pretrained(source), get_tokenizer("gpt2")
    return model.to(device).eval(), tok


def read_prompt(start: str) -> str:
    """The prompt text itself, or the contents of a file given as FILE:path."""
    if start.startswith("FILE:"):
        path = Path(start[5:])
        if not path.is_file():
            raise DataError(f"prompt file {path} does not exist (start=FILE:<path>)")
        return path.read_text(encoding="utf-8")
    return start


def encode_prompt(tok: Tokenizer, text: str, device: torch.device | str) -> torch.Tensor:
    ids = tok.encode(text)
    if not ids:
        if tok.eot_token is None:
            raise DataError("the prompt is empty and this tokenizer has no end-of-text token; pass start=...")
        ids = [tok.eot_token]  # GPT-2 convention: an empty prompt starts a new document
    return torch.tensor([ids], dtype=torch.long, device=device)


def stream_text(model: GPT, tok: Tokenizer, prompt: torch.Tensor, max_new_tokens: int,
                write: Callable[[str], None], stop: bool = True, **sampling) -> str:
    """Generate from prompt (1, T), passing each new piece of text to `write`; returns the text."""
    ids: list[int] = []
    shown = 0

    stop_token = tok.eot_token if stop else None

    def on_token(tok_ids: torch.Tensor) -> None:
        nonlocal shown
        if int(tok_ids[0, 0]) == stop_token:  # the end of the sample, not part of its text
            return
        ids.append(int(tok_ids[0, 0]))
        text = tok.decode(ids)
        end = len(text) - 1 if text.endswith("\ufffd") else len(text)  # hold back a split UTF-8 char
        if end > shown:
            write(text[shown:end])
            shown = end

    model.generate(prompt, max_new_tokens, stop_token=stop_token, callback=on_token, **sampling)
    text = tok.decode(ids)
    if len(text) > shown:
        write(text[shown:])
    return text
