"""Sample from GPT-2 or a training run: python run_sample.py --config <config> [--config.sample.prompt=...]

    python run_sample.py --config configs/gpt2_xl.py --config.sample.prompt="The meaning of life is"
    python run_sample.py --config configs/shakespeare_char.py:cpu --config.init_from=resume

All logic is in nanogpt_jax/sample.py; the sample section of configs/default.py lists the keys.
"""

from nanogpt_jax import cli, sample

if __name__ == "__main__":
    cli.main(sample.sample)
