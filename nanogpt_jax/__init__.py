"""nanogpt_jax: GPT-2-class language models in JAX/Flax. See README.md."""

__all__ = ["GPT", "GPTConfig", "KVCache", "crop_block_size", "init_params", "lm_loss", "token_losses",
           "load_pretrained", "export_hf"]

_MODEL_NAMES = ("GPT", "GPTConfig", "KVCache", "crop_block_size", "init_params")


def __getattr__(name):
    # Imported on first use: data_prep/ scripts import nanogpt_jax.prepare and need neither jax nor
    # flax (2 s of start-up), and the HF converter pulls in huggingface_hub.
    if name in _MODEL_NAMES:
        from nanogpt_jax import model

        return getattr(model, name)
    if name in ("lm_loss", "token_losses"):
        from nanogpt_jax import loss

        return getattr(loss, name)
    if name in ("load_pretrained", "export_hf"):
        from nanogpt_jax import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'nanogpt_jax' has no attribute {name!r}")
