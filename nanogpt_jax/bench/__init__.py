"""Benchmarks: `python run_bench.py --config <config> --config.bench.mode=<train|generate|data|profile>`.

    train     the config's jitted train step: compile time, ms/step (median, p10, p90), tokens/s,
              tokens/s per device, MFU, memory (nanogpt_jax.bench.train)
    generate  prefill ms and decode tokens/s, batch 1 and 8, float32 and bfloat16, with and without
              the KV cache, of the model init_from names (random weights with scratch)
              (nanogpt_jax.bench.generate)
    data      the training loader's batches/s and host ms per batch (nanogpt_jax.bench.data)
    profile   a jax.profiler trace of a few train steps into <out_dir>/profile and the operations
              that take the most time (nanogpt_jax.bench.profile)

Every mode prints a markdown table and writes bench.out, by default bench/<mode>.json (JSON: the
figures, the environment, the config), a .md beside it and, for two rows or more (e.g. a sweep
over bench.batch_sizes), a .png chart. bench.compare=<an earlier report> prints new / old ratios
of the matching rows.
The modules also run alone with their own flags: `python -m nanogpt_jax.bench.<name>`.
`python -m nanogpt_jax.bench.optimizers --config ... --muon_lrs 0.01,0.02,0.04` trains a recipe with
AdamW and with Muon at each learning rate and reports steps and seconds to AdamW's final val loss
(nanogpt_jax.bench.optimizers; docs/training.md, "Muon").

`runner.run` picks the mode's module; this file imports nothing, so the modules may use each other
(profile builds on train) without an import circle through the package.
"""
