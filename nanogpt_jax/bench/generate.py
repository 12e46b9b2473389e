"""Decode speed of `nanogpt_jax.generate`: tokens/s with the KV cache, and without it for comparison.

    python -m nanogpt_jax.bench.generate                      # gpt2 124M shape, random weights, this machine
    python -m nanogpt_jax.bench.generate --repeats 5 --cases fp32-b1,nocache-b1

Each case compiles once (the compile time is reported on its own), then generates max_new_tokens
from a prompt of prompt_len random tokens `repeats` times; tokens/s counts new tokens per row
(the speed a reader sees one sample stream at) and, for batches, over all rows. The timed call
includes the prefill of the prompt. "nocache" is a jitted recompute loop of the same length: each
step a full forward over a fixed (B, prompt_len + max_new_tokens) buffer (causal attention: the
padding after the newest token changes nothing), so it measures what the cache saves, not Python
overhead. A memory-bound bound for batch 1: every weight is read once per token, so tokens/s is at
most memory bandwidth / (4 bytes x parameters) in float32.

`run_bench.py --config.bench.mode=generate` runs `bench_rows(config)`: the model `init_from` names,
loaded as run_sample.py loads it (`restore.load_model`: out_dir's checkpoint with resume, a GPT-2 name
or an HF folder), or with init_from=scratch the config's model shape with random weights (the
report's `weights` column says which), float32 and bfloat16, batch sizes bench.batch_sizes (default 1 and 8) with the
KV cache and the smallest one without it; bench.warmup untimed and bench.steps timed calls per
case. The prompt is min(32, block_size // 4) random tokens, followed by min(sample.max_new_tokens,
block_size - prompt) new tokens (inside the context: the cached path). prefill_ms is the prompt's
pass alone (`generate._prefill`, timed apart); decode tokens/s counts the tokens after the first
over the median call's time minus the median prefill's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from absl import logging

from nanogpt_jax import generate as gen
from nanogpt_jax import restore
from nanogpt_jax.model import GPT, GPTConfig, init_params
from nanogpt_jax.progress import Progress

CASES = {  # name: (batch size, dtype, how): generate's jitted loop, stream's step per call, or no cache
    "fp32-b1": (1, "float32", "generate"),
    "fp32-b8": (8, "float32", "generate"),
    "bf16-b1": (1, "bfloat16", "generate"),
    "stream-b1": (1, "float32", "stream"),
    "nocache-b1": (1, "float32", "nocache"),
}


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def recompute_greedy(model: GPT, params: dict, idx_BT: jax.Array, max_new_tokens: int) -> jax.Array:
    """Greedy decoding without a cache: a full forward over the whole buffer for every new token."""
    B, T = idx_BT.shape
    tokens_BN = jnp.concatenate([idx_BT, jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)

    def step(i, tokens_BN):
        h_BND, _ = model.apply({"params": params}, tokens_BN, method=GPT.hidden)
        h_B1D = jax.lax.dynamic_slice_in_dim(h_BND, T + i - 1, 1, axis=1)  # the head on one position only
        logits_BV = model.apply({"params": params}, h_B1D, method=GPT.logits)[:, 0]
        return jax.lax.dynamic_update_slice(tokens_BN, jnp.argmax(logits_BV, -1).astype(jnp.int32)[:, None],
                                            (0, T + i))

    return jax.lax.fori_loop(0, max_new_tokens, step, tokens_BN)


def bench_case(config: GPTConfig, params: dict, batch_size: int, how: str, prompt_len: int,
               max_new_tokens: int, repeats: int, warmup: int = 1) -> dict:
    """Compile once, run `warmup` untimed calls (at least one: first-call allocations), time `repeats`
    calls; seconds and tokens/s (greedy: sampling costs ~nothing)."""
    model = GPT(config)
    idx_BT = jax.random.randint(jax.random.key(1), (batch_size, prompt_len), 0, config.vocab_size, jnp.int32)
    if how == "stream":  # stream compiles on its first pass: report that pass minus a warm one
        run = lambda: jnp.asarray(list(gen.stream(model, params, idx_BT, max_new_tokens, temperature=0)))
        t0 = time.perf_counter()
        run()
        compile_s = time.perf_counter() - t0
    elif how == "generate":
        sampling = gen.Sampling(0.0, None, None, config.vocab_size, None)
        args = dict(model=model, max_new_tokens=max_new_tokens)
        t0 = time.perf_counter()
        compiled = gen._generate_jit.lower(params=params, idx_BT=idx_BT, rng=jax.random.key(0),
                                           sampling=sampling, **args).compile()
        compile_s = time.perf_counter() - t0
        run = lambda: compiled(params=params, idx_BT=idx_BT, rng=jax.random.key(0))[0]
    else:
        t0 = time.perf_counter()
        compiled = recompute_greedy.lower(model, params, idx_BT, max_new_tokens).compile()
        compile_s = time.perf_counter() - t0
        run = lambda: compiled(params, idx_BT)
    t0 = time.perf_counter()
    run().block_until_ready()  # warm-up: first-call allocations
    if how == "stream":
        compile_s -= time.perf_counter() - t0
    for _ in range(warmup - 1):
        run().block_until_ready()
    times = _time_calls(run, repeats)
    best = min(times)
    return dict(batch_size=batch_size, dtype=config.dtype, how=how, compile_s=compile_s, times_s=times,
                tokens_per_s=max_new_tokens / best, tokens_per_s_worst=max_new_tokens / max(times),
                tokens_per_s_median=max_new_tokens / statistics.median(times),
                total_tokens_per_s=batch_size * max_new_tokens / best)


def time_prefill(config: GPTConfig, params: dict, idx_BT: jax.Array, max_new_tokens: int,
                 repeats: int) -> tuple[float, float]:
    """(compile seconds, median seconds) of the prefill alone: the prompt through the model into the
    KV cache and the first token sampled, as `generate` runs it."""
    model = GPT(config)
    B, T = idx_BT.shape
    tokens_BN = jnp.concatenate([idx_BT, jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)
    sampling = gen.Sampling(0.0, None, None, config.vocab_size, None)
    t0 = time.perf_counter()
    compiled = gen._prefill_jit.lower(model=model, params=params, tokens_BN=tokens_BN, rng=jax.random.key(0),
                                      prompt_len=T, sampling=sampling).compile()
    compile_s = time.perf_counter() - t0
    run = lambda: compiled(params=params, tokens_BN=tokens_BN, rng=jax.random.key(0))[1]  # noqa: E731
    run().block_until_ready()
    return compile_s, statistics.median(_time_calls(run, repeats))


def _time_calls(run: Callable[[], jax.Array], repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `run`, each waited for."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run().block_until_ready()
        times.append(time.perf_counter() - t0)
    return times


PROMPT_LEN = 32  # random prompt tokens (at most block_size // 4)


def bench_rows(config) -> list[dict]:
    """run_bench.py's generate mode (see the module docstring): rows of {settings, results} with
    results as `nanogpt_jax.bench.report.KEYS["generate"]`."""
    from nanogpt_jax import config as config_lib
    from nanogpt_jax.bench.train import model_vocab_size

    if config.init_from == "scratch":
        vocab = model_vocab_size(config)
        base = config_lib.gpt_config(config, **({"vocab_size": vocab} if vocab else {}))
        params = jax.jit(functools.partial(init_params, GPT(base)))(jax.random.key(config.seed))
        weights = "random (init_from=scratch)"
        logging.info("generate: random weights of the config's shape (init_from=scratch)")
    else:  # the model the user would sample from, the way run_sample.py loads it
        model, params, _, source = restore.load_model(config)
        base = dataclasses.replace(model.config, remat="none")
        weights = source.get("pretrained") or f"{source['checkpoint']} step {source['step']}"
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)  # each case casts to its own dtype
    prompt_len = max(1, min(PROMPT_LEN, base.block_size // 4))
    new = max(2, min(config.sample.max_new_tokens, base.block_size - prompt_len))
    sizes = tuple(config.bench.batch_sizes) or (1, 8)
    steps, warmup = config.bench.steps, config.bench.warmup
    rows = []
    cases = [(dtype, b, how) for dtype in ("float32", "bfloat16")
             for b, how in [(b, "generate") for b in sizes] + [(min(sizes), "nocache")]]
    progress = Progress("generate", len(cases), "cases")
    for dtype, batch_size, how in cases:
        cfg = dataclasses.replace(base, dtype=dtype)
        r = bench_case(cfg, params, batch_size, how, prompt_len, new, steps, warmup=warmup)
        call_s = statistics.median(r["times_s"])
        prefill_ms = None
        if how == "generate":
            idx_BT = jax.random.randint(jax.random.key(1), (batch_size, prompt_len), 0, cfg.vocab_size, jnp.int32)
            _, prefill_s = time_prefill(cfg, params, idx_BT, new, steps)
            prefill_ms = prefill_s * 1e3
            decode = (new - 1) / max(call_s - prefill_s, 1e-9)  # the tokens after the prefill's
        else:
            decode = new / call_s  # every token is a full forward: no prefill apart
        settings = {"model": f"{cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}", "weights": weights,
                    "params": cfg.num_params(), "vocab_size": cfg.vocab_size, "batch_size": batch_size, "dtype": dtype,
                    "kv_cache": how == "generate", "prompt_len": prompt_len, "new_tokens": new,
                    "block_size": cfg.block_size}
        results = {"compile_s": r["compile_s"], "prefill_ms": prefill_ms, "decode_tokens_per_s": decode,
                   "decode_tokens_per_s_all_rows": decode * batch_size, "ms_per_token": 1e3 / decode,
                   "call_s": call_s, "times_s": r["times_s"]}
        rows.append({"settings": settings, "results": results})
        progress.update(1, f"{dtype}, batch {batch_size}, {'KV cache' if how == 'generate' else 'no cache'}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="GPT-2 size whose shape to use (random weights)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--scan-layers", action="store_true")
    args = parser.parse_args(argv)

    base = GPTConfig.gpt2(args.model, scan_layers=args.scan_layers)
    t0 = time.perf_counter()
    params = jax.jit(functools.partial(init_params, GPT(base)))(jax.random.key(0))
    jax.block_until_ready(params)
    print(f"{args.model} shape, {base.num_params() / 1e6:.1f}M params, random init {time.perf_counter() - t0:.1f}s; "
          f"{jax.devices()[0].device_kind} x{jax.device_count()}; prompt {args.prompt_len} tokens, "
          f"{args.max_new_tokens} new, best of {args.repeats}")
    print(f"{'case':<12} {'compile s':>9} {'tok/s/row':>9} {'median':>7} {'worst':>7} {'tok/s all':>9}  run s")
    results = []
    for name in args.cases.split(","):
        batch_size, dtype, how = CASES[name]
        config = dataclasses.replace(base, dtype=dtype)
        r = bench_case(config, params, batch_size, how, args.prompt_len, args.max_new_tokens, args.repeats)
        results.append(dict(case=name, **r))
        print(f"{name:<12} {r['compile_s']:9.1f} {r['tokens_per_s']:9.1f} {r['tokens_per_s_median']:7.1f} "
              f"{r['tokens_per_s_worst']:7.1f} {r['total_tokens_per_s']:9.1f}  "
              + " ".join(f"{t:.2f}" for t in r["times_s"]), flush=True)
    return results


if __name__ == "__main__":
    main()
