"""Benchmark a config: python run_bench.py --config configs/<name>.py --config.bench.mode=<train|generate|data|profile>

    python run_bench.py --config configs/shakespeare_char.py:cpu                     # train step: ms, tokens/s, MFU
    python run_bench.py --config configs/owt.py --config.bench.batch_sizes=4,8,16     # a sweep, with a chart
    python run_bench.py --config configs/gpt2.py --config.bench.mode=generate         # prefill ms, decode tokens/s
    python run_bench.py --config configs/owt.py --config.bench.mode=data              # loader batches/s
    python run_bench.py --config configs/owt.py --config.bench.mode=profile --config.bench.steps=3   # a trace
    python run_bench.py --config ... --config.bench.compare=bench/old.json            # ratios against a run

All logic is in nanogpt_jax/bench/; the keys are under `bench` in configs/default.py.
"""

from nanogpt_jax import cli
from nanogpt_jax.bench import runner

if __name__ == "__main__":
    cli.main(runner.run)
