"""nanogpt: train, finetune, evaluate, benchmark and sample GPT-2-class language models."""

from nanogpt.model import GPT, GPTConfig

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "__version__"]
