"""GPT-2 from scratch on OpenWebText with nanoGPT's recipe (124M by default).

    python data_prep/openwebtext.py
    python run_train.py --config configs/owt.py                 # gpt2 124M
    python run_train.py --config configs/owt.py:gpt2-medium     # or gpt2-large, gpt2-xl

Tokens per optimizer step, as nanoGPT's 8-GPU run: 12 sequences x 1024 tokens x 40 micro-steps
= 491,520 (~0.5M, GPT-3's batch for this size). batch_size is global: on 8 devices each holds
12 / 8 = 1.5 sequences per micro-step, so raise batch_size and lower gradient_accumulation_steps
together, e.g. 48 x 10 or 96 x 5, keeping their product at 480 sequences.
"""

from configs import default
from nanogpt_jax.model import GPT2_SIZES


def get_config(arg: str | None = None):
    c = default.get_config()  # default.py is this recipe: lr 6e-4 -> 6e-5 over 600k steps, warmup 2000,
    c.out_dir = "out-owt"  # weight_decay 0.1, betas (0.9, 0.95), grad_clip 1.0
    c.data.data_dir = "data/openwebtext"
    c.model.dtype = "auto"  # bfloat16 on GPU/TPU, float32 on a CPU
    size = arg or "gpt2"
    if size not in GPT2_SIZES:
        raise ValueError(f"configs/owt.py: unknown size {size!r}; choose one of {', '.join(GPT2_SIZES)}")
    c.model.n_layer, c.model.n_head, c.model.n_embd = GPT2_SIZES[size]
    c.out_dir = f"out-owt-{size}"
    return c
