"""Finetune OpenAI's GPT-2 XL on TinyShakespeare (GPT-2 BPE): nanoGPT's finetune recipe.

    python data_prep/shakespeare.py
    python run_train.py --config configs/finetune_shakespeare.py

32 sequences x 1024 tokens = 32,768 tokens per step; one epoch of the 301,966 training tokens is
~9 steps, so 20 steps is about two epochs. A small constant learning rate: the model already knows
English, it only has to pick up the style.
"""

from configs import default


def get_config(arg: str | None = None):
    c = default.get_config(arg)
    c.init_from = "gpt2-xl"
    c.out_dir = "out-shakespeare"
    c.data.data_dir = "data/shakespeare"
    c.model.n_layer, c.model.n_head, c.model.n_embd = 48, 25, 1600  # gpt2-xl's (read from its weights)
    c.model.vocab_size = 50257
    c.model.dropout = 0.0
    c.train.batch_size = 1
    c.train.gradient_accumulation_steps = 32
    c.train.max_iters = 20
    c.train.eval_interval = 5
    c.train.eval_iters = 40
    c.train.always_save_checkpoint = False  # keep only improvements
    c.optim.learning_rate = 3e-5
    c.optim.decay_lr = False  # constant
    c.optim.warmup_iters = 0
    c.optim.min_lr = 3e-5
    c.sample.prompt = "ROMEO:"
    c.sample.max_new_tokens = 500
    c.sample.top_k = 200
    return c
