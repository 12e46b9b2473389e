"""Train or finetune a GPT: python run_train.py --config configs/<name>.py [--config.key=value ...]

    python run_train.py --config configs/shakespeare_char.py:cpu
    python run_train.py --config configs/owt.py --config.mesh.fsdp=8 --config.mesh.data=1

All logic is in nanogpt_jax/train.py; see configs/default.py for every key.
"""

from nanogpt_jax import cli, train

if __name__ == "__main__":
    cli.main(train.train)
