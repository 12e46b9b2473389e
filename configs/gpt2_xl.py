"""OpenAI's gpt2-xl (1.5B) from Hugging Face, for sampling and evaluation.

    python run_sample.py --config configs/gpt2_xl.py --config.sample.prompt="Hello, I'm a language model,"
"""

from configs import default


def get_config(arg: str | None = None):
    return default.pretrained("gpt2-xl", arg)
