"""OpenAI's gpt2-medium (350M) from Hugging Face, for sampling and evaluation.

    python run_sample.py --config configs/gpt2_medium.py --config.sample.prompt="Hello, I'm a language model,"
"""

from configs import default


def get_config(arg: str | None = None):
    return default.pretrained("gpt2-medium", arg)
