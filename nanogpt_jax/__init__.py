"""nanogpt_jax: GPT-2-class language models in JAX/Flax. See README.md."""

from nanogpt_jax.model import GPT, GPTConfig, KVCache, crop_block_size, init_params, lm_loss, token_losses

__all__ = ["GPT", "GPTConfig", "KVCache", "crop_block_size", "init_params", "lm_loss", "token_losses",
           "load_pretrained", "export_hf"]


def __getattr__(name):  # the HF converter is imported on first use (it pulls in huggingface_hub)
    if name in ("load_pretrained", "export_hf"):
        from nanogpt_jax import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'nanogpt_jax' has no attribute {name!r}")
