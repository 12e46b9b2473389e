"""HellaSwag throughput: examples/s of a GPT-2-shaped model with random weights on the local devices.

    python -m nanogpt_jax.bench.eval [--model gpt2] [--examples 64] [--batch_size 8] [--dtype auto]

Two passes over the first --examples validation examples, --batch_size examples (x 4 endings) per
call, data-parallel over every local device: the first pass includes compilation (one per row-length
bucket), the second is the warm figure. The weights are random, so the accuracies are chance; the
work per example is a real model's. Figures only: nothing is asserted, and a shared machine's load
shows in them.
"""

from __future__ import annotations

import json
import time

import jax
from absl import app, flags

from nanogpt_jax import config as config_lib
from nanogpt_jax import hellaswag, sharding, tokenizer
from nanogpt_jax.model import GPT, GPT2_SIZES, GPTConfig, init_params
from nanogpt_jax.scoring import Scorer, hellaswag_accuracy
from nanogpt_jax.step import param_shardings


def main(argv: list[str]) -> None:
    del argv
    mesh = sharding.make_mesh()
    model = GPT(GPTConfig.gpt2(flags.FLAGS.model, dtype=config_lib.resolve_dtype(flags.FLAGS.dtype)))
    shards = param_shardings(model, mesh)  # replicated on a data-parallel mesh
    with sharding.activate(mesh):  # initialised in place
        params = jax.jit(lambda k: init_params(model, k), out_shardings=shards)(jax.random.key(0))
    T = model.config.block_size
    F = flags.FLAGS
    examples = [hellaswag.render(tokenizer.gpt2(), ex, T) for ex in hellaswag.load(F.cache_dir, F.examples)]
    batch = -(-flags.FLAGS.batch_size // sharding.batch_divisor(mesh)) * sharding.batch_divisor(mesh)
    scorer = Scorer(lambda p, x: model.apply({"params": p}, x), mesh)
    passes = []
    for _ in range(2):
        t0 = time.perf_counter()
        r = hellaswag_accuracy(scorer, params, examples, batch_size=batch, block_size=T)
        passes.append(time.perf_counter() - t0)
    n = r["examples"]
    tokens = sum(len(row) - 1 for ex in examples for row in ex.rows)
    out = {"model": flags.FLAGS.model, "params": model.num_params(), "dtype": model.config.dtype,
           "device_kind": jax.devices()[0].device_kind, "devices": mesh.size, "examples": n, "batch_size": batch,
           "row_lengths": r["row_lengths"], "compilations": scorer.jitted._cache_size(),
           "cold_seconds": passes[0], "warm_seconds": passes[1], "examples_per_sec": n / passes[1],
           "tokens_per_sec": tokens / passes[1], "acc_norm_token": r["acc_norm_token"]}
    print(f"HellaSwag, {flags.FLAGS.model} shape ({out['params'] / 1e6:.0f}M, random weights, {out['dtype']}) on "
          f"{mesh.size} x {out['device_kind']}: {n} examples, batch {batch} x 4 rows, padded lengths "
          f"{r['row_lengths']}, {out['compilations']} compilations")
    print(f"  first pass (with compilation): {passes[0]:.1f} s = {n / passes[0]:.2f} examples/s")
    print(f"  warm pass: {passes[1]:.1f} s = {out['examples_per_sec']:.2f} examples/s "
          f"({out['tokens_per_sec']:,.0f} unpadded tokens/s)")
    if flags.FLAGS.json:
        with open(flags.FLAGS.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    # absl flags are process-global: defined only when this module is the script, so that importing it
    # beside another module with a flag of the same name (e.g. --json) cannot fail
    flags.DEFINE_enum("model", "gpt2", list(GPT2_SIZES), "GPT-2 shape (random weights).")
    flags.DEFINE_integer("examples", 64, "HellaSwag validation examples per pass (the first N).")
    flags.DEFINE_integer("batch_size", 8, "Examples per call (each 4 rows); rounded up to the devices.")
    flags.DEFINE_string("dtype", "auto", "Compute dtype: auto (bfloat16 on GPU/TPU), float32 or bfloat16.")
    flags.DEFINE_string("cache_dir", "data", "Where hellaswag/hellaswag_val.jsonl is fetched to.")
    flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
    app.run(main)
