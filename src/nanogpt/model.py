"""GPT-2, readable top to bottom.

The architecture is exactly OpenAI's GPT-2 (so its weights load and give the same logits as
Hugging Face transformers): learned token + position embeddings, pre-LayerNorm blocks, fused QKV
causal self-attention, a 4x MLP with the tanh GELU, a final LayerNorm and an lm_head tied to the
token embedding. This module imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    """Shape of a GPT model. Defaults are GPT-2 small (124M) with its real 50257-token vocabulary."""

    block_size: int = 1024  # longest context the position embedding covers
    vocab_size: int = 50257  # GPT-2's; 50304 (a multiple of 64) is faster to train
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2 has them


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The one language-modelling loss: cross-entropy over the vocabulary; target -1 is ignored.

    logits (B, T, V), targets (B, T). reduction "none" gives the per-token loss (B, T).
    """
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1, reduction=reduction
    )
    return loss.view_as(targets) if reduction == "none" else loss


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to block_size."""

    def __init__(self, cfg: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # number of positions filled; advanced by GPT after all layers have run

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values (B, nh, T, hs); return all keys/values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.layer, self.n_head, self.dropout = layer, cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs): every head attends independently
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, nh, past + T, hs)
        if past == 0:
            mask, causal = None, True  # the usual case: queries and keys start together
        elif T == 1:
            mask, causal = None, False  # one new token sees every cached one
        else:
            # queries sit at positions past..past+T-1, so query i may see keys up to past+i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 was trained with the tanh approximation; the exact erf GELU shifts its logits
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)  # pre-LN: normalise the input of each branch
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # residual projections add into the stream once per branch: scale them so the stream's
        # variance does not grow with depth (GPT-2 paper, section 2.3)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ---- forward passes -------------------------------------------------------------------

    def _hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> final hidden states (B, T, C)."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, V) and, when targets (B, T) are given, the mean loss."""
        logits = self.lm_head(self._hidden(idx))
        loss = lm_loss(logits, targets) if targets is not None else None
        return logits, loss

    def predict(self, idx: torch.Tensor, targets: bool = True) -> torch.Tensor:
        """Logits for every position (B, T, V); with targets=False only the last one (B, 1, V).

        targets=False skips the lm_head for all but the last position, which is what
        next-token sampling needs and is much cheaper for a 50k vocabulary.
        """
        h = self._hidden(idx)
        return self.lm_head(h if targets else h[:, -1:, :])

    # ---- generation -----------------------------------------------------------------------

    @torch.no_grad()
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_token: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token (B, 1) for every step; see generate for the arguments.

        With the KV cache each step feeds only the new token. Past block_size the context
        slides: each token then conditions on the last block_size tokens, recomputed in full
        (learned absolute positions make cached keys invalid once positions shift).
        """
        bs = self.config.block_size
        idx = idx[:, -bs:]  # a prompt longer than the context keeps its end
        cache, feed = None, idx
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if use_cache and cache is None and idx.size(1) < bs:
                cache = KVCache(self.config, idx.size(0), idx.device, self.transformer.wte.weight.dtype)
            if cache is None:
                feed = idx[:, -bs:]  # no cache, or the context is full: recompute the window
            logits = self.lm_head(self._hidden(feed, cache)[:, -1, :]).float()  # (B, V)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if stop_token is not None:
                nxt = torch.where(done.unsqueeze(1), torch.full_like(nxt, stop_token), nxt)
                done |= nxt.squeeze(1) == stop_token
            yield nxt
            idx, feed = torch.cat((idx, nxt), dim=1), nxt
            if cache is not None and cache.pos >= bs:
                cache = None  # full: fall back to the sliding window
                use_cache = False
            if stop_token is not None and bool(done.all()):
                return

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_token: int | None = None,
        generator: torch.Generator | None = None,
        callback: Callable[[torch.Tensor], None] | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue idx (B, T) by up to max_new_tokens tokens; returns (B, T + n).

        temperature=0 is greedy; top_k keeps the k likeliest tokens, top_p the smallest set whose
        probability reaches p. Generation stops early once every row has produced stop_token
        (rows that finished first are padded with it). callback receives each new (B, 1) token,
        for streaming; generator seeds the sampling.
        """
        was_training = self.training
        self.eval()
        out = [idx]
        for nxt in self.stream(idx, max_new_tokens, temperature, top_k, top_p, stop_token, generator, use_cache):
            out.append(nxt)
            if callback is not None:
                callback(nxt)
        self.train(was_training)
        return torch.cat(out, dim=1)

    # ---- utilities ------------------------------------------------------------------------

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context (e.g. to finetune GPT-2 with 256 tokens instead of 1024)."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
        wpe = self.transformer.wpe
        wpe.weight = nn.Parameter(wpe.weight[:block_size].detach().clone())
        wpe.num_embeddings = block_size

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once). non_embedding drops the position embedding;
        the token embedding stays because, tied to lm_head, it does real work in the output layer."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N for the matmuls with weights plus
        the attention scores and their use, 12 * n_layer * n_embd * T (PaLM paper, appendix B)."""
        T = seq_len or self.config.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * self.config.n_layer * self.config.n_embd * T

    @classmethod
    def from_pretrained(cls, name_or_path: str, **overrides) -> GPT:
        """GPT-2 weights by name (gpt2 ... gpt2-xl) or from a local HF-format folder."""
        from nanogpt.hf import load_pretrained  # lazy: keeps this module torch-only

        return load_pretrained(name_or_path, **overrides)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from logits (B, V) -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
